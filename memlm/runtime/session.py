"""Session: one stream of documents through a memory model (feed, generate, reset).

A session owns all per-document state (``StreamState``); leaving the ``with`` block frees it, even
when the body raised. Two sessions of one model are independent.
"""

from __future__ import annotations

import codecs
import contextlib
import copy
import inspect
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig

from memlm.config import check_integer
from memlm.memory.rmt import RecurrentMemory

from .generation import Conversation, decoding_pieces, next_tokens, streamer_callback
from .generation import generation_config as generation_config_for
from .history import IdHistory
from .rows import RowStreams
from .stream import StreamState
from .text import TextStream
from .threads import ThreadPolicy, forward_work

IGNORE_INDEX = -100
#: the attributes that hold one document's state (what ``_forget`` resets and ``branch`` restores)
DOCUMENT_STATE = ("state", "rmt", "_last_logits", "history", "text_streams", "pending", "chat", "sources")
#: token ids a session keeps by default (generation's logits processors see them; save_document needs them all):
#: 8 MiB per row at most, however long the stream
HISTORY_TOKENS = 2**20


@dataclass
class FeedResult:
    """What ``Session.feed`` returns.

    tokens: tokens fed per sequence; segments: forward passes run; loss: mean next-token loss over
    the labels (None without labels); loss_sum: their sum (0 with a graph when no label is scored, so a
    data-parallel rank without scored tokens still joins the step's backward); logits: [batch, tokens, vocab]
    when asked for.
    """

    tokens: int
    segments: int
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None


class Session:
    """Streams documents through ``mem_model``; see ``MemoryModel.session``."""

    def __init__(self, mem_model, batch_size: int = 1, crossbatch=None, store=None, documents=None,
                 history_tokens: int | None = HISTORY_TOKENS, threads: int | ThreadPolicy | None = None) -> None:
        check_integer("batch_size", batch_size, 1)
        self.threads = ThreadPolicy.of(threads)
        self._work_per_token, self._work_per_row = forward_work(mem_model.model)
        if history_tokens is not None:
            check_integer("history_tokens", history_tokens, 1)
        self.history_tokens = history_tokens
        self.mem_model = mem_model
        self.batch_size = batch_size
        self.crossbatch = crossbatch
        self.state: StreamState | RowStreams = self._new_state(batch_size)
        config = mem_model.config
        self.rmt = None
        if config.rmt_tokens:
            self.rmt = RecurrentMemory(mem_model.memory_module.rmt_memory, batch_size, config.rmt_bptt_depth)
        self._closed = False
        self._keep_logits_arg = "logits_to_keep" in inspect.signature(mem_model.model.forward).parameters
        self._forget()
        if store is not None or documents is not None:
            if not callable(getattr(store, "restore", None)):
                raise TypeError(f"store must be a memlm.MemoryStore, got {type(store).__name__}")
            try:
                store.restore(self, documents)
            except BaseException:
                self.close()
                raise

    # ------------------------------------------------------------------------------ context manager

    def __enter__(self) -> Session:
        self._check_open()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Free the document state (memories emptied, caches dropped); the session cannot be used after."""
        if not self._closed:
            self._forget()
            self._closed = True

    def reset(self) -> None:
        """Forget the document (XL caches, memories, positions) and keep the session open."""
        self._check_open()
        self._forget()

    def detach_graph(self) -> None:
        """Training across optimizer steps: cut the autograd graph behind what the session carries (XL
        caches, CrossBatch memory, RMT memory) after a backward; their values stay."""
        self._check_open()
        self.state.detach_graph()
        if self.rmt is not None:
            self.rmt.detach_graph()

    def _forget(self) -> None:
        if isinstance(self.state, RowStreams):  # a new document starts with its rows in lockstep again
            self.state = self._new_state(self.batch_size)
        self.state.reset()
        if self.rmt is not None:
            self.rmt.reset()
        self._last_logits: torch.Tensor | None = None  # [batch, vocab] of the last token fed
        self.history = IdHistory(self.batch_size, self.history_tokens)  # the stream's last ids (generation, saving)
        self.text_streams: list[TextStream] | None = None  # the text being fed: one for every row, or one per row
        self.pending: torch.Tensor | None = None  # [batch, 1] the last generated token, fed with the next input
        self.chat: Conversation | None = None  # the chat so far, when generate was given messages
        self.sources: list = []  # the stored documents this session's memory was loaded from (store.Source)

    @contextlib.contextmanager
    def branch(self):
        """A context manager: the stream as it is now comes back when the block ends, whatever the block fed or
        generated. A haystack fed once then serves every question asked of it:

            session.feed(haystack)
            for question in questions:
                with session.branch():
                    answers.append(session.generate(question, max_new_tokens=8))

        Entering copies the document state (local context, memory entries, history, held-back text): memory
        costs what the stream holds, time a copy of it. Not while training (the copy keeps no graph) and not with
        a faiss index (its native index is not copied)."""
        self._check_open()
        if torch.is_grad_enabled() and self.crossbatch is not None:
            raise RuntimeError("branch() copies the stream without its graph: use it under torch.no_grad()")
        if self.mem_model.config.index != "torch":
            raise ValueError(f"branch() copies the memory index; index={self.mem_model.config.index!r} cannot be "
                             "copied: use index='torch'")
        saved = self._document_state()
        try:
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    def _document_state(self) -> dict:
        """A copy of everything ``_forget`` resets, sharing the model, its tokenizer and the config (never copied)."""
        model = self.mem_model.model
        shared = [self.mem_model, model, self.mem_model.config, self.mem_model.tokenizer, self.crossbatch,
                  *model.modules(), *model.parameters(), *model.buffers()]
        memo = {id(obj): obj for obj in shared if obj is not None}
        return copy.deepcopy({name: getattr(self, name) for name in DOCUMENT_STATE}, memo)

    def save_document(self, store, doc_id: str):
        """Store what this session has read as a complete document ``doc_id`` of ``store`` (a
        ``memlm.store.MemoryStore``): its token ids, memory and local state; ``mem_model.session(store=store,
        documents=[doc_id])`` continues it later, in any process. Batch 1 only. Returns the ``Document``."""
        self._check_open()
        if not callable(getattr(store, "save", None)):
            raise TypeError(f"store must be a memlm.MemoryStore, got {type(store).__name__}")
        self.flush()  # the document ends here
        if self.history.dropped:
            raise ValueError(f"this session kept only its last {self.history_tokens:,} token ids (history_tokens) of "
                             f"{self.stream_length:,}: open it with history_tokens=None to save a document this "
                             "long, or ingest it with a memlm.store.DocumentWriter")
        return store.save(self, doc_id)

    @property
    def tokens_seen(self) -> int | list[int]:
        """Tokens fed (and generated) per sequence since the session started or was reset (per row, a list, once
        rows of different lengths made each row a stream of its own)."""
        return self.state.tokens_seen

    # ----------------------------------------------------------------------------------------- feed

    def feed(self, ids_or_text, labels: torch.Tensor | None = None, return_logits: bool = False,
             progress: bool = False, attention_mask: torch.Tensor | None = None, final: bool = False) -> FeedResult:
        """Stream tokens through the model segment by segment, filling XL caches and memory.

        ids_or_text: text (a string: batch 1, or the same text for every row; a list of strings: one per row),
            or ids [batch, tokens] / [tokens]. Text continues the text fed before it, and its tokens are the
            tokenizer's tokens of all that text joined: the tail whose tokens could still change when more text
            follows is held back (``text.py``) until more text comes, ``flush()``, ``generate`` or an ids feed.
            Rows of different lengths are left-padded; each row is then a stream of its own (``rows.py``).
        labels: [batch, tokens] token ids (-100 = ignore); the loss is the mean loss of predicting
            labels[t + 1] from tokens up to t, as transformers computes it, over the whole feed. With
            [batch, tokens + 1], the last column is the token after the feed, which the feed's last
            token predicts (so a document fed in windows loses no target at the window edges).
            With gradients enabled, the loss has a graph. Ids input only.
        attention_mask: [batch, tokens] with ids: 0 at left padding, 1 at real tokens.
        final: the text ends with this feed (its held-back tail is fed too, as ``flush()`` does).
        """
        self._check_open()
        if labels is not None and _is_text(ids_or_text):
            raise ValueError("labels need token ids (text is tokenized as it streams); pass ids [batch, tokens]")
        if _is_text(ids_or_text):
            return self._run(*self._text_tokens(ids_or_text, final=final), return_logits=return_logits,
                             progress=progress)
        ids, real = self._ids(ids_or_text, attention_mask)
        return self._run(ids, real, labels=labels, return_logits=return_logits, progress=progress)

    def feed_stream(self, chunks: Iterable[str | bytes], progress: bool = False, final: bool = True) -> FeedResult:
        """Feed text that arrives in pieces (str, or UTF-8 bytes split anywhere); its tokens are the joined
        text's, as with ``feed``. The text ends with the iterator (``flush``), unless ``final=False``: then its
        unstable tail is held back for the text that follows."""
        self._check_open()
        self._tokenizer()  # fail before reading the stream
        decoder = codecs.getincrementaldecoder("utf-8")()  # a character split between chunks waits for its end
        tokens = segments = 0

        def run(text: str) -> None:
            nonlocal tokens, segments
            result = self._run(*self._text_tokens(text, eager=False), progress=progress)
            tokens, segments = tokens + result.tokens, segments + result.segments

        for chunk in chunks:
            if isinstance(chunk, (bytes, bytearray)):
                chunk = decoder.decode(chunk)
            elif not isinstance(chunk, str):
                raise TypeError(f"feed_stream expects text chunks (str or UTF-8 bytes), got {type(chunk).__name__}")
            if chunk:
                run(chunk)
        if rest := decoder.decode(b"", final=True):
            run(rest)
        if final:
            result = self.flush(progress=progress)
            tokens, segments = tokens + result.tokens, segments + result.segments
        return FeedResult(tokens=tokens, segments=segments)

    def flush(self, progress: bool = False) -> FeedResult:
        """The text fed so far ends here: feed the tokens held back (and the last generated token)."""
        self._check_open()
        ids, real = self._tokens(self._flush_text())
        return self._run(ids, real, progress=progress)

    @property
    def held_text(self) -> list[str]:
        """Per row, the text received but not yet tokenized (its tokens could still change)."""
        streams = self.text_streams or []
        return [streams[min(r, len(streams) - 1)].held if streams else "" for r in range(self.batch_size)]

    # ------------------------------------------------------------------------------------- generate

    def generate(self, prompt=None, generation_config: GenerationConfig | None = None, streamer=None,
                 attention_mask: torch.Tensor | None = None, **kwargs):
        """Feed the prompt, then decode token by token with the same caches and memory, as ``model.generate``.

        prompt: text (a string, or one per row), ids [batch, tokens], chat messages (a list of
            ``{"role", "content"}`` dicts, batch 1: rendered with the tokenizer's chat template; the session
            keeps the conversation, so pass only the new messages), or None (continue the stream).
        generation_config, kwargs: a ``transformers.GenerationConfig`` (default: the model's) and fields that
            override it (``max_new_tokens`` (default 64), ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
            ``min_p``, ``typical_p``, ``repetition_penalty``, ``no_repeat_ngram_size``, ``bad_words_ids``,
            ``eos_token_id``, ``stop_strings``, ``max_time``, ...), meaning what they mean there (``generation.py``).
        streamer: an object with ``put(ids)``/``end()`` (transformers' streamers) or a callable, given the new
            ids [batch] at every step.
        attention_mask: [batch, tokens] with an ids prompt: 0 at left padding (as in ``feed``).

        Returns the new text (a string, or one per row) for a text or messages prompt, else the new ids
        [batch, new_tokens]; rows that finished are padded with the pad token (transformers' rule). Every
        new token enters the stream (the last one with the next input), so the next turn continues it.
        """
        self._check_open()
        config = generation_config_for(self.mem_model.model, generation_config, kwargs)
        chat = _is_messages(prompt)
        if chat:
            if self.batch_size != 1:
                raise ValueError("chat messages need a batch-1 session")
            if self.chat is None:
                self.chat = Conversation(self._tokenizer())
            if self.text_streams is None and self._fresh():  # the template writes the BOS itself
                self.text_streams = [TextStream(self._tokenizer(), prefix=[])]
            prompt = self.chat.extend(prompt)
        if prompt is None:
            ids, real = self._tokens(self._flush_text())
        elif _is_text(prompt):
            ids, real = self._text_tokens(prompt, final=True)
        else:
            ids, real = self._ids(prompt, attention_mask)
        new_tokens = config.max_new_tokens
        if new_tokens is None:  # max_length given: it counts the whole stream
            new_tokens = max(0, config.max_length - self.stream_length - ids.shape[1])
        self.state.check_room(ids.shape[1] + new_tokens - 1)  # the last new token is not forwarded here
        self._run(ids, real)
        if self._last_logits is None:
            raise ValueError("nothing to generate from: the stream is empty; pass a prompt")
        stream, mask = self.stream_ids()
        device = self.mem_model.device
        decoding = decoding_pieces(self.mem_model.model, self.mem_model.tokenizer, config, stream.shape[1], mask,
                                   device)
        put = streamer_callback(streamer)
        unfinished = torch.ones(self.batch_size, dtype=torch.long, device=device)
        sequence = stream  # the stream and the new tokens, as transformers' processors see input_ids
        with torch.no_grad():
            for step in range(new_tokens):
                scores = decoding.processors(sequence, self._last_logits.to(dtype=torch.float32, copy=True))
                token = next_tokens(scores, config.do_sample)
                if decoding.pad is not None:
                    token = token * unfinished + decoding.pad * (1 - unfinished)
                sequence = torch.cat((sequence, token[:, None]), dim=1)
                if put is not None:
                    put(token)
                unfinished = unfinished & ~decoding.criteria(sequence, scores)
                if unfinished.max() == 0 or step == new_tokens - 1:
                    self.pending = token[:, None]  # enters the stream with the next input
                    break
                self._forward(token[:, None], keep_all=False)
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
        new = sequence[:, stream.shape[1] :]
        if not (chat or _is_text(prompt)):
            return new
        texts = self._tokenizer().batch_decode(new, skip_special_tokens=True)
        if chat:
            self.chat.answered(texts[0], new[0])
        return texts[0] if self.batch_size == 1 and not isinstance(prompt, list) else texts

    @property
    def conversation(self) -> list[dict]:
        """The chat messages so far (the assistant's answers included)."""
        return [] if self.chat is None else list(self.chat.messages)

    @property
    def stream_length(self) -> int:
        """Ids in the stream so far (fed, generated, and padding), per row."""
        return self.history.total + (0 if self.pending is None else 1)

    def stream_ids(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stream's last ids [batch, n] (padding included; at most ``history_tokens`` and the token pending)
        and their mask of real ids [batch, n] (None: all real)."""
        device = self.mem_model.device
        ids, real = self.history.stream()
        ids, real = ids.to(device), None if real is None else real.to(device)
        if self.pending is not None:  # a generated token: real
            pending = self.pending.to(device)
            ids = torch.cat((ids, pending), dim=1)
            real = None if real is None else torch.cat((real, torch.ones_like(pending, dtype=torch.bool)), dim=1)
        return ids, None if real is None else real.long()

    # ------------------------------------------------------------------------------------ internals

    def _run(self, ids: torch.Tensor, real: torch.Tensor | None, labels: torch.Tensor | None = None,
             return_logits: bool = False, progress: bool = False) -> FeedResult:
        """Stream ids [batch, tokens] (``real``: [batch, tokens] mask of real tokens, None: all) segment by segment."""
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.shape[0] != ids.shape[0] or (
                labels.shape[1] not in (ids.shape[1], ids.shape[1] + 1)
            ):
                raise ValueError(f"labels must be a tensor of the ids' shape {list(ids.shape)} (or one column "
                                 "more: the token after the feed), got "
                                 f"{list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
            if self.pending is not None or real is not None or isinstance(self.state, RowStreams):
                raise ValueError("labels need rows of equal length, without padding or a pending generated token")
            labels = labels.to(self.mem_model.device)
        if self.pending is not None:  # the last generated token enters the stream first
            ids = torch.cat((self.pending, ids), dim=1)
            real = None if real is None else torch.cat((torch.ones_like(self.pending, dtype=torch.bool), real), dim=1)
            self.pending = None
        if real is not None and self.batch_size == 1:  # one row: padding is just left out
            ids, real = ids[:, real[0]], None
        if real is not None and not isinstance(self.state, RowStreams):
            if self.rmt is not None or self.state.crossbatch is not None:
                raise ValueError("rows of different lengths (padding) are not supported with RMT tokens or "
                                 "CrossBatch training")
            self.state = RowStreams(lambda: self._new_state(1), self.batch_size, lockstep=self.state)
        if isinstance(self.state, RowStreams) and real is None:
            real = torch.ones_like(ids, dtype=torch.bool)
        total = ids.shape[1]
        if total == 0:
            vocab = self.mem_model.model.get_input_embeddings().num_embeddings
            empty = torch.empty(self.batch_size, 0, vocab, device=self.mem_model.device) if return_logits else None
            return FeedResult(tokens=0, segments=0, logits=empty)
        self.state.check_room(total)
        grad = torch.is_grad_enabled() and labels is not None
        loss_sum, loss_count, all_logits, segments = 0.0, 0, [], 0
        bar = tqdm(total=total, unit="tok", disable=not progress, desc="memlm feed")
        with torch.set_grad_enabled(grad):
            start = 0
            while start < total:
                n = self._chunk(start, total, real)
                keep_all = labels is not None or return_logits
                logits = self._forward(ids[:, start : start + n], keep_all,
                                       None if real is None else real[:, start : start + n])
                if labels is not None:
                    targets = labels[:, start + 1 : start + n + 1]  # the last token of the feed predicts nothing
                    loss_sum = loss_sum + F.cross_entropy(
                        logits[:, : targets.shape[1]].flatten(0, 1).float(), targets.flatten(),
                        ignore_index=IGNORE_INDEX, reduction="sum",
                    )
                    loss_count += int((targets != IGNORE_INDEX).sum())
                if return_logits:
                    all_logits.append(logits.detach())
                start += n
                segments += 1
                bar.update(n)
        bar.close()
        loss = None
        if labels is not None:
            loss = loss_sum / loss_count if loss_count else torch.tensor(float("nan"), device=ids.device)
        return FeedResult(tokens=total, segments=segments, loss=loss, loss_sum=loss_sum if labels is not None else None,
                          logits=torch.cat(all_logits, dim=1) if return_logits and all_logits else None)

    def _chunk(self, start: int, total: int, real: torch.Tensor | None) -> int:
        """Tokens of the next forward: as many as fit every row's open segment (a padded row's pads take no room)."""
        if not isinstance(self.state, RowStreams):
            return min(total - start, self.mem_model.config.segment_length - self.state.local.open_length)
        first_real = torch.where(real.any(dim=1), real.int().argmax(dim=1), total).tolist()
        return min(total - start, *(room + max(0, first - start) for room, first in
                                    zip(self.state.room(), first_real, strict=True)))

    def _forward(self, ids: torch.Tensor, keep_all: bool, real: torch.Tensor | None = None) -> torch.Tensor:
        """One forward of ids [batch, n] (n fits the open segment) -> logits [batch, n or 1, vocab].

        ``real`` [batch, n]: the real tokens of a padded forward (``RowStreams``); a row's real tokens end at the
        last column (left padding). With RMT, the segment's first forward starts with the read tokens and the
        forward that completes it ends with the write tokens (``rmt.py``); their logits are cut off here.
        """
        n, model, rmt, state = ids.shape[1], self.mem_model.model, self.rmt, self.state
        inputs, read, write = {"input_ids": ids}, 0, 0
        if isinstance(state, RowStreams):
            positions = state.begin(torch.ones_like(ids, dtype=torch.bool) if real is None else real)
        else:
            opened = state.local.open_length
            read = rmt.tokens if rmt is not None and opened == 0 else 0
            write = rmt.tokens if rmt is not None and opened + n == self.mem_model.config.segment_length else 0
            if read or write:
                memory = rmt.read(model.dtype)
                parts = [memory] * bool(read) + [model.get_input_embeddings()(ids)] + [memory] * bool(write)
                inputs = {"inputs_embeds": torch.cat(parts, dim=1), "output_hidden_states": bool(write)}
            positions = state.begin(n, read=read, write=write)
        if not keep_all and self._keep_logits_arg:
            inputs["logits_to_keep"] = write + 1  # the last text token and the write tokens after it
        work = ids.shape[0] * (self._work_per_token * (n + read + write) + self._work_per_row * (write + 1))
        try:
            with self.threads.forward(work):
                out = model(**inputs, position_ids=positions, use_cache=False, memlm_state=state)
        except BaseException:
            state.abort()
            raise
        state.commit()
        self.history.append(ids.detach(), None if real is None else real.detach())
        if write:
            rmt.write(out.hidden_states[-1][:, -write:])
        logits = out.logits[:, read : read + n] if keep_all else out.logits[:, -1 - write : out.logits.shape[1] - write]
        last = logits[:, -1].detach()
        if real is not None and self._last_logits is not None:  # a row without real tokens here keeps its logits
            last = torch.where(real[:, -1:].to(last.device), last, self._last_logits)
        self._last_logits = last
        return logits

    def _fresh(self) -> bool:
        """Nothing entered the stream yet (text fed now starts the document)."""
        seen = self.state.tokens_seen
        return (max(seen) if isinstance(seen, list) else seen) == 0 and self.pending is None

    def _new_state(self, batch_size: int) -> StreamState:
        mem_model = self.mem_model
        return StreamState(
            mem_model.config, batch_size=batch_size, memory_layers=mem_model.memory_layers,
            memory_module=mem_model.memory_module, rotary=mem_model.rotary, max_positions=mem_model.max_positions,
            devices=mem_model.layer_devices, dtype=mem_model.dtype, previous_attention=mem_model.previous_attention,
            crossbatch=self.crossbatch, pooled_from=mem_model.pooled_from,
        )

    # -------------------------------------------------------------------------------- input to ids

    def _text_tokens(self, text, final: bool = False, eager: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Push text (one string for every row, or one per row) through the rows' text streams; ``eager``: tokenize
        it now (else once a window has arrived)."""
        tokenizer = self._tokenizer()
        if isinstance(text, list) and len(text) != self.batch_size:
            raise ValueError(f"this session has batch_size {self.batch_size}, got {len(text)} texts")
        per_row = isinstance(text, list) and self.batch_size > 1
        if self.text_streams is None:
            self.text_streams = [TextStream(tokenizer, document_start=self._fresh())]
        if per_row and len(self.text_streams) == 1 < self.batch_size:  # rows part: each continues the shared text
            self.text_streams = [copy.copy(self.text_streams[0]) for _ in range(self.batch_size)]
        texts = text if isinstance(text, list) else [text] * len(self.text_streams)
        rows = []
        for stream, piece in zip(self.text_streams, texts, strict=True):
            pieces = stream.push(piece, eager=eager) + (stream.flush() if final else [])
            rows.append([i for p in pieces for i in p.ids])
        if final:  # the text ends (a prompt: new tokens follow, and text after them tokenizes on its own)
            self.text_streams = None
        return self._tokens(rows)

    def _flush_text(self) -> list[list[int]]:
        """Ids per row of the text held back; the text streams end (text after ids tokenizes on its own)."""
        streams, self.text_streams = self.text_streams or [], None
        rows = [[i for p in stream.flush() for i in p.ids] for stream in streams]
        return rows or [[] for _ in range(self.batch_size)]

    def _tokens(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids [batch, n] from per-row id lists (one list: every row), left-padded with a mask when they differ."""
        rows = rows * self.batch_size if len(rows) == 1 else rows
        width = max(len(r) for r in rows)
        device = self.mem_model.device
        if all(len(r) == width for r in rows):
            return torch.tensor(rows, dtype=torch.long, device=device).reshape(self.batch_size, width), None
        pad = self.mem_model.tokenizer.pad_token_id if self.mem_model.tokenizer is not None else None
        pad = 0 if pad is None else pad
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
        real = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=device)
        return ids, real

    def _ids(self, ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids [batch, tokens] on the model's device (checked) and their mask of real tokens (None: all real),
        after the text held back (which ends: ids follow it)."""
        ids = torch.as_tensor(ids)
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() not in (1, 2):
            raise ValueError(f"expected text or integer ids [batch, tokens], got {ids.dtype} {list(ids.shape)}")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"this session has batch_size {self.batch_size}, got ids for {ids.shape[0]} rows "
                             f"(shape {list(ids.shape)})")
        if ids.shape[1] == 0:
            raise ValueError("nothing to feed: the input has no tokens")
        vocab = self.mem_model.model.get_input_embeddings().num_embeddings
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}), got values in [{int(ids.min())}, {int(ids.max())}]")
        ids = ids.long().to(self.mem_model.device)
        real = None
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask).to(ids.device)
            if mask.shape != ids.shape or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"attention_mask must be 0/1 of the ids' shape {list(ids.shape)}, got "
                                 f"{list(mask.shape)}")
            if bool((mask[:, 1:] < mask[:, :-1]).any()):
                raise ValueError("attention_mask must be left padding: zeros before the ones in every row")
            real = None if bool(mask.all()) else mask.bool()
        held, _ = self._tokens(self._flush_text())
        if held.shape[1]:
            ids = torch.cat((held, ids), dim=1)
            real = None if real is None else torch.cat((torch.ones_like(held, dtype=torch.bool), real), dim=1)
        return ids, real

    def _tokenizer(self):
        if self.mem_model.tokenizer is None:
            raise ValueError("text input needs a tokenizer: attach(model, config, tokenizer=...) or pass token ids")
        return self.mem_model.tokenizer

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this session is closed (its with-block ended); open a new one: mem_model.session()")
        self.mem_model.check_attached()


def _is_text(x) -> bool:
    """A string, or a non-empty list of strings (one per batch row)."""
    return isinstance(x, str) or (isinstance(x, list) and bool(x) and all(isinstance(t, str) for t in x))


def _is_messages(x) -> bool:
    """Chat messages: a non-empty list of {"role", "content"} dicts."""
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) and "role" in m for m in x)
