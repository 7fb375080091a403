"""Session: one stream of documents through a memory model (feed, generate, reset).

A session owns all per-document state (``StreamState``); leaving the ``with`` block frees it, even
when the body raised. Two sessions of one model are independent.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from memlm.config import check_integer
from memlm.memory.rmt import RecurrentMemory

from .stream import StreamState

IGNORE_INDEX = -100


@dataclass
class FeedResult:
    """What ``Session.feed`` returns.

    tokens: tokens fed per sequence; segments: forward passes run; loss: mean next-token loss over
    the labels (None without labels); logits: [batch, tokens, vocab] when asked for.
    """

    tokens: int
    segments: int
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class Session:
    """Streams documents through ``mem_model``; see ``MemoryModel.session``."""

    def __init__(self, mem_model, batch_size: int = 1, crossbatch=None, store=None, documents=None) -> None:
        check_integer("batch_size", batch_size, 1)
        self.mem_model = mem_model
        self.batch_size = batch_size
        self.state = StreamState(
            mem_model.config,
            batch_size=batch_size,
            memory_layers=mem_model.memory_layers,
            gates=mem_model.memory_module.gates,
            rotary=mem_model.rotary,
            max_positions=mem_model.max_positions,
            devices=mem_model.layer_devices,
            dtype=mem_model.dtype,
            previous_attention=mem_model.previous_attention,
            crossbatch=crossbatch,
        )
        config = mem_model.config
        self.rmt = None
        if config.rmt_tokens:
            self.rmt = RecurrentMemory(mem_model.memory_module.rmt_memory, batch_size, config.rmt_bptt_depth)
        self._last_logits: torch.Tensor | None = None  # [batch, vocab] of the last token fed
        self._closed = False
        self._keep_logits_arg = "logits_to_keep" in inspect.signature(mem_model.model.forward).parameters
        self.history: list[torch.Tensor] = []  # ids [1, n] of every forward (batch 1), for save_document
        self.sources: list = []  # the stored documents this session's memory was loaded from (store.Source)
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
        self.state.reset()
        if self.rmt is not None:
            self.rmt.reset()
        self._last_logits = None
        self.history, self.sources = [], []

    def save_document(self, store, doc_id: str):
        """Store what this session has read as a complete document ``doc_id`` of ``store`` (a
        ``memlm.store.MemoryStore``): its token ids, memory and local state; ``mem_model.session(store=store,
        documents=[doc_id])`` continues it later, in any process. Batch 1 only. Returns the ``Document``."""
        self._check_open()
        if not callable(getattr(store, "save", None)):
            raise TypeError(f"store must be a memlm.MemoryStore, got {type(store).__name__}")
        return store.save(self, doc_id)

    @property
    def tokens_seen(self) -> int:
        """Tokens fed (and generated) per sequence since the session started or was reset."""
        return self.state.tokens_seen

    # ----------------------------------------------------------------------------------------- feed

    def feed(self, ids_or_text, labels: torch.Tensor | None = None, return_logits: bool = False,
             progress: bool = False) -> FeedResult:
        """Stream tokens through the model segment by segment, filling XL caches and memory.

        ids_or_text: a string (batch 1; same text for every row otherwise), a list of strings (one per
            row), or ids [batch, tokens] / [tokens].
        labels: [batch, tokens] token ids (-100 = ignore); the loss is the mean loss of predicting
            labels[t + 1] from tokens up to t, as transformers computes it, over the whole feed. With
            [batch, tokens + 1], the last column is the token after the feed, which the feed's last
            token predicts (so a document fed in windows loses no target at the window edges).
            With gradients enabled, the loss has a graph.
        """
        self._check_open()
        ids = self._as_ids(ids_or_text)
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.shape[0] != ids.shape[0] or (
                labels.shape[1] not in (ids.shape[1], ids.shape[1] + 1)
            ):
                raise ValueError(f"labels must be a tensor of the ids' shape {list(ids.shape)} (or one column "
                                 "more: the token after the feed), got "
                                 f"{list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
            labels = labels.to(self.mem_model.device)
        total = ids.shape[1]
        self.state.check_room(total)
        grad = torch.is_grad_enabled() and labels is not None
        loss_sum, loss_count, all_logits, segments = 0.0, 0, [], 0
        bar = tqdm(total=total, unit="tok", disable=not progress, desc="memlm feed")
        with torch.set_grad_enabled(grad):
            start = 0
            while start < total:
                n = min(total - start, self.mem_model.config.segment_length - self.state.local.open_length)
                keep_all = labels is not None or return_logits
                logits = self._forward(ids[:, start : start + n], keep_all)
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
        return FeedResult(tokens=total, segments=segments, loss=loss,
                          logits=torch.cat(all_logits, dim=1) if return_logits and all_logits else None)

    def feed_stream(self, chunks: Iterable[str], progress: bool = False) -> FeedResult:
        """Feed text that arrives in pieces; tokens are the same as feeding the joined text.

        Text after the last whitespace of what has arrived is held back until more comes, so no token
        is split at a chunk edge.
        """
        self._check_open()
        self._tokenizer()  # fail before reading the stream
        buffer, tokens, segments = "", 0, 0
        for chunk in chunks:
            if not isinstance(chunk, str):
                raise TypeError(f"feed_stream expects text chunks (str), got {type(chunk).__name__}")
            buffer += chunk
            cut = last_whitespace(buffer)
            if cut > 0:
                result = self.feed(buffer[:cut], progress=progress)
                tokens, segments, buffer = tokens + result.tokens, segments + result.segments, buffer[cut:]
        if buffer:
            result = self.feed(buffer, progress=progress)
            tokens, segments = tokens + result.tokens, segments + result.segments
        return FeedResult(tokens=tokens, segments=segments)

    # ------------------------------------------------------------------------------------- generate

    def generate(self, prompt_ids_or_text, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                 streamer=None):
        """Feed the prompt, then decode token by token with the same caches and memory.

        Returns the new text (a string, or one per row for batch > 1) for a text prompt, or the new
        ids [batch, new_tokens] for an ids prompt. Rows that finished are padded with their EOS id.
        ``streamer``: an object with ``put(ids)``/``end()`` (transformers' streamers) or a callable,
        given the new ids [batch] at every step. ``eos_token_id`` defaults to the model's
        ``generation_config``.
        """
        self._check_open()
        check_integer("max_new_tokens", max_new_tokens, 0)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        prompt = self._as_ids(prompt_ids_or_text)
        self.state.check_room(prompt.shape[1] + max_new_tokens - 1)  # the last new token is never forwarded
        self.feed(prompt)
        if eos_token_id is None:
            eos_token_id = self.mem_model.model.generation_config.eos_token_id
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                           device=self.mem_model.device)
        warpers = LogitsProcessorList()
        if do_sample:
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
        put = _streamer_callback(streamer)
        new = torch.empty(self.batch_size, 0, dtype=torch.long, device=self.mem_model.device)
        finished = torch.zeros(self.batch_size, dtype=torch.bool, device=new.device)
        with torch.no_grad():
            for step in range(max_new_tokens):
                scores = warpers(new, self._last_logits.float())
                if do_sample:
                    token = torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
                else:
                    token = scores.argmax(dim=-1)
                if eos.numel():
                    token = torch.where(finished, eos[0], token)
                    finished |= torch.isin(token, eos)
                new = torch.cat((new, token[:, None]), dim=1)
                if put is not None:
                    put(token)
                if bool(finished.all()) or step == max_new_tokens - 1:
                    break
                self._forward(token[:, None], keep_all=False)
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
        if not _is_text(prompt_ids_or_text):
            return new
        texts = self._tokenizer().batch_decode(new, skip_special_tokens=True)
        return texts[0] if self.batch_size == 1 else texts

    # ------------------------------------------------------------------------------------ internals

    def _forward(self, ids: torch.Tensor, keep_all: bool) -> torch.Tensor:
        """One forward of ids [batch, n] (n fits the open segment) -> logits [batch, n or 1, vocab].

        With RMT, the segment's first forward starts with the read tokens and the forward that
        completes it ends with the write tokens (``rmt.py``); their logits are cut off here.
        """
        n, model, rmt, state = ids.shape[1], self.mem_model.model, self.rmt, self.state
        opened = state.local.open_length
        read = rmt.tokens if rmt is not None and opened == 0 else 0
        write = rmt.tokens if rmt is not None and opened + n == self.mem_model.config.segment_length else 0
        inputs = {"input_ids": ids}
        if read or write:
            memory = rmt.read(model.dtype)
            parts = [memory] * bool(read) + [model.get_input_embeddings()(ids)] + [memory] * bool(write)
            inputs = {"inputs_embeds": torch.cat(parts, dim=1), "output_hidden_states": bool(write)}
        if not keep_all and self._keep_logits_arg:
            inputs["logits_to_keep"] = write + 1  # the last text token and the write tokens after it
        positions = self.state.begin(n, read=read, write=write)
        try:
            out = model(**inputs, position_ids=positions, use_cache=False, memlm_state=self.state)
        except BaseException:
            self.state.abort()
            raise
        self.state.commit()
        if self.batch_size == 1:  # what save_document stores (it takes batch-1 sessions only)
            self.history.append(ids.detach())
        if write:
            rmt.write(out.hidden_states[-1][:, -write:])
        logits = out.logits[:, read : read + n] if keep_all else out.logits[:, -1 - write : out.logits.shape[1] - write]
        self._last_logits = logits[:, -1].detach()
        return logits

    def _as_ids(self, ids_or_text) -> torch.Tensor:
        """ids [batch, tokens] on the model's device, from text or ids; checks the batch shape."""
        if isinstance(ids_or_text, str):
            ids = self._encode(ids_or_text, self._tokenizer())
        elif _is_text(ids_or_text):
            rows = [self._encode(t, self._tokenizer()) for t in ids_or_text]
            if len({r.shape[1] for r in rows}) != 1:
                raise ValueError("texts of one feed must have the same number of tokens in every row; "
                                 f"got {[r.shape[1] for r in rows]}")
            ids = torch.cat(rows)
        else:
            ids = torch.as_tensor(ids_or_text)
            if ids.dtype not in (torch.int64, torch.int32) or ids.dim() not in (1, 2):
                raise ValueError(f"expected text or integer ids [batch, tokens], got {ids.dtype} {list(ids.shape)}")
            if ids.dim() == 1:
                ids = ids.unsqueeze(0)
        if ids.shape[0] == 1 and self.batch_size > 1 and isinstance(ids_or_text, str):
            ids = ids.expand(self.batch_size, -1)
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"this session has batch_size {self.batch_size}, got ids for {ids.shape[0]} rows "
                             f"(shape {list(ids.shape)})")
        if ids.shape[1] == 0:
            raise ValueError("nothing to feed: the input has no tokens")
        vocab = self.mem_model.model.get_input_embeddings().num_embeddings
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}), got values in [{int(ids.min())}, {int(ids.max())}]")
        return ids.long().to(self.mem_model.device)

    def _encode(self, text: str, tokenizer) -> torch.Tensor:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.state.tokens_seen == 0 and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]  # a document starts with BOS where the tokenizer has one
        return torch.tensor([ids], dtype=torch.long)

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


def last_whitespace(text: str) -> int:
    """Index of the last whitespace character (0 if none): text before it tokenizes on its own."""
    match = re.search(r"\s\S*\Z", text)
    return match.start() if match else 0


def _streamer_callback(streamer) -> Callable | None:
    if streamer is None:
        return None
    if hasattr(streamer, "put"):
        return lambda token: streamer.put(token.cpu())
    if callable(streamer):
        return streamer
    raise TypeError(f"streamer must have put()/end() or be callable, got {type(streamer).__name__}")
