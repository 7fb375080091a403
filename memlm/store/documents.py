"""Documents in a MemoryStore: ingest a text stream segment by segment, continue or ask over stored ones.

``DocumentWriter`` turns arriving UTF-8 bytes into segments: bytes are decoded incrementally (a
character split between chunks waits for its end), text is tokenized in *pieces* that end at safe cuts
(``memlm/runtime/text.py``: the tokens equal the tokenizer's output on the whole text, as in
``Session.feed``), and every full segment is fed to a session and committed to the store with the
document's progress in one transaction. Progress is a byte offset plus the number of tokens past it
already stored (``Document.skip``: a segment may end inside a piece); resuming at that offset
re-tokenizes from that piece's start (with the stored text before it as context) and drops those
tokens, so a resumed ingestion stores exactly what an uninterrupted one does.

Large corpora: a session over several documents loads all their entries into one index of
``memory_capacity`` entries per memory layer (the oldest are evicted beyond it). Size the capacity to
the corpus and, past a few hundred thousand entries, use an approximate index
(``index="faiss", index_kwargs={"kind": "ivf"}``) so that each query searches a fraction of them.
"""

from __future__ import annotations

import codecs
import hashlib
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from memlm.config import check_integer
from memlm.runtime.text import Piece, TextStream

from .records import SHADOW, Document, DocumentConflict, Segment, check_doc_id
from .sessions import session_state
from .store import MemoryStore

#: characters per piece of text tokenized at once (pieces end at safe cuts; the committed offset is a piece
#: start, so an interrupted upload re-sends at most about this much)
PIECE = 4096
#: characters of text without a safe cut held back before it is cut anyway
MAX_PIECE = 1 << 16


class InvalidText(ValueError):
    """The bytes are not UTF-8; ``offset`` is the document byte offset of the first bad byte."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class DocumentTooLarge(ValueError):
    """A document exceeds the configured maximum size."""


@dataclass
class Answer:
    """What ``ask`` returns: the generated text, its token count, and the memory entries the answer drew on
    most: ``{"document", "token_offset", "score"}``, best first; ``score`` is the entry's share of the memory
    attention (0..1) averaged over heads, memory layers and answer tokens."""

    text: str
    tokens: int
    retrieved: list[dict]


# ------------------------------------------------------------------------------------------ writing


class DocumentWriter:
    """Streams one document's UTF-8 bytes into ``store`` through ``mem_model``.

    ``write(data)`` (or ``push`` + repeated ``step``, to interleave other work between segments), then
    ``finish()``. An existing document: ``offset`` must equal its committed ``bytes`` (resume); a complete
    document re-sent whole is compared, not re-ingested; ``replace=True`` writes a new version beside it,
    which takes its place when complete (until then, and if the replacement fails, the old one stays).
    """

    def __init__(self, store: MemoryStore, mem_model, doc_id: str, *, offset: int = 0, replace: bool = False,
                 max_bytes: int | None = None) -> None:
        check_doc_id(doc_id)
        check_integer("offset", offset, 0)
        store.bind(mem_model)
        self.store, self.mem_model, self.max_bytes = store, mem_model, max_bytes
        self.segment_length = mem_model.config.segment_length
        self.tokenizer = mem_model.tokenizer
        if self.tokenizer is None:
            raise ValueError("ingesting text needs a tokenizer: attach(model, config, tokenizer=...)")
        self.doc_id = doc_id
        existing = store.document(doc_id) if doc_id in store else None
        self.replacing = existing is not None and replace
        if self.replacing:  # written beside the stored document, which it replaces once complete
            if offset:
                raise DocumentConflict(f"a replacement of {doc_id!r} starts at offset 0, got {offset}")
            if doc_id + SHADOW in store:  # an earlier replacement that never finished
                store.delete(doc_id + SHADOW)
            generation = int(existing.key.rpartition("~")[2]) + 1 if "~" in existing.key else 1
            existing = store.begin(doc_id + SHADOW, key=f"{doc_id}~{generation}")
        self.comparing = existing is not None and existing.status == "complete"
        if existing is None:
            if offset:
                raise DocumentConflict(f"document {doc_id!r} does not exist: an upload starts at offset 0, got "
                                       f"{offset}")
            existing = store.begin(doc_id)
        elif self.comparing and offset:
            raise DocumentConflict(f"document {doc_id!r} is complete; re-send it whole (offset 0) to compare, or "
                                   "replace it")
        elif not self.comparing and offset != existing.bytes:
            raise DocumentConflict(f"document {doc_id!r} is committed up to byte {existing.bytes}; resume with offset "
                                   f"{existing.bytes} (got {offset}) or replace it")
        self.document: Document = existing
        if not self.comparing:  # a failed document resumes like an interrupted one
            self.document.status, self.document.error = "ingesting", None
        self.received = offset  # document offset of the next byte to arrive
        self.hash = hashlib.sha256()
        self.session = None
        if self.comparing:
            return
        self.session = mem_model.session()
        stored, before = [], b""  # the stored token ids (to check the skipped ones below) and the text's tail
        if self.document.segments:
            with store.snapshot():  # the record and its segments as one state, whatever another writer commits
                current = store.document(doc_id)
                if (current.segments, current.bytes) != (self.document.segments, self.document.bytes):
                    self.close()
                    raise DocumentConflict(f"document {doc_id!r} changed while this writer opened it (another writer "
                                           f"committed up to byte {current.bytes}); resume from there")
                store.restore(self.session, [doc_id], allow_incomplete=True)
                for segment in store.segments(doc_id):
                    self.hash.update(segment.text)
                    stored += segment.ids.tolist()
                    before = (before + segment.text)[-4 * TextStream.CONTEXT :]
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = TextStream(self.tokenizer, document_start=offset == 0,
                               context=before.decode("utf-8", errors="ignore"), piece_length=PIECE, max_held=MAX_PIECE)
        self.text_start = offset  # byte offset of the text not yet tokenized
        self.unstored = bytearray()  # bytes from the committed offset on, not yet in a segment record
        self.pieces: deque[list] = deque()  # [byte offset of the piece, its token ids], in order
        self.used = 0  # tokens of pieces[0] already fed
        self.pending = 0  # tokens of ``pieces`` not fed
        # Tokens after the committed offset that are already stored: the re-sent text must give them again.
        skip = self.document.skip
        self.expected = stored[-skip:] if skip else []

    # ----------------------------------------------------------------------------------- stream

    def write(self, data: bytes) -> None:
        """Take the next bytes and ingest every segment they complete."""
        self.push(data)
        while self.step():
            pass

    def push(self, data: bytes) -> None:
        """Take the next bytes (decode and tokenize; no model work)."""
        if self.max_bytes is not None and self.received + len(data) > self.max_bytes:
            if not self.comparing:  # a rejected document (or replacement) leaves nothing behind
                self.close()
                self.store.delete(self.document.id)
            raise DocumentTooLarge(f"document {self.doc_id!r} exceeds the maximum of {self.max_bytes:,} bytes")
        start, self.received = self.received, self.received + len(data)
        if self.comparing:
            self.hash.update(data)
            if self.received > self.document.bytes:
                raise DocumentConflict(self._differs())
            return
        buffered = len(self.decoder.getstate()[0])
        try:
            text = self.decoder.decode(data)
        except UnicodeDecodeError as error:
            self._invalid(start - buffered + error.start, error)
        self.unstored += data
        self.hash.update(data)
        for piece in self.text.push(text):
            self._add(piece)

    def step(self, seconds: float = 0.0) -> bool:
        """Feed and commit the next full segment if one is ready, and more while ``seconds`` last; True if it
        fed any."""
        start, fed = time.perf_counter(), False
        while not self.comparing and self.pending >= self.segment_length:
            self._feed(self.segment_length)
            fed = True
            if time.perf_counter() - start >= seconds:
                break
        return fed

    def finish(self) -> Document:
        """The text has ended: ingest the rest (a last, partial segment) and mark the document complete."""
        if self.comparing:
            if self.received != self.document.bytes or self.hash.hexdigest() != self.document.sha256:
                raise DocumentConflict(self._differs())
            return self.document
        buffered = len(self.decoder.getstate()[0])
        try:
            rest = self.decoder.decode(b"", final=True)
        except UnicodeDecodeError as error:
            self._invalid(self.received - buffered + error.start, error)
        for piece in self.text.push(rest) + self.text.flush():
            self._add(piece)
        while self.step():
            pass
        self.document.status, self.document.sha256, self.document.error = "complete", self.hash.hexdigest(), None
        self._feed(self.pending)  # always a last record (maybe empty), so the segment count depends on the tokens only
        self.close()
        if self.replacing:
            self.document = self.store.promote(self.document, self.doc_id)
        return self.document

    def close(self) -> None:
        """Free the session; what is committed stays (an unfinished document resumes later)."""
        if self.session is not None:
            self.session.close()
            self.session = None

    # ------------------------------------------------------------------------------- internals

    def _add(self, piece: Piece) -> None:
        ids = piece.ids
        self.pieces.append([self.text_start, ids])
        self.pending += len(ids)
        self.text_start += len(piece.text.encode())
        if self.expected:  # resuming inside a piece: its first tokens are stored already
            head, self.expected = self.expected[: len(ids)], self.expected[len(ids) :]
            if ids[: len(head)] != head:
                raise DocumentConflict(f"the text sent from byte {self.document.bytes} does not continue document "
                                       f"{self.doc_id!r}: its tokens differ from the stored ones")
            self.used += len(head)
            self.pending -= len(head)
            self._drop_used()

    def _drop_used(self) -> None:
        while self.pieces and self.used == len(self.pieces[0][1]):
            self.pieces.popleft()
            self.used = 0

    def _feed(self, n: int) -> None:
        """Feed the next ``n`` pending tokens (a full segment, or the document's last partial one, maybe empty)
        and commit them as a segment record with the document's progress and text up to the committed offset."""
        ids = []
        while len(ids) < n:
            piece = self.pieces[0][1]
            take = min(n - len(ids), len(piece) - self.used)
            ids += piece[self.used : self.used + take]
            self.used += take
            self._drop_used()
        self.pending -= n
        state = self.session.state
        memory = {}
        if ids:
            state.last_added = {}
            self.session.feed(torch.tensor([ids], device=self.mem_model.device))
            memory = {layer: (k[0], v[0]) for layer, (k, v) in state.last_added.items()}
        # Committed offset: the start of the first piece with unfed tokens, or all tokenized text.
        committed = self.pieces[0][0] if self.pieces else self.text_start
        if self.document.status == "complete":
            committed = self.received
        stored = committed - self.document.bytes
        text, self.unstored = bytes(self.unstored[:stored]), self.unstored[stored:]
        document = self.document
        document.bytes, document.skip = committed, self.used
        segment = Segment(ids=torch.tensor(ids, dtype=torch.long), text=text, memory=memory)
        document.tokens += len(ids)
        document.segments += 1
        document.entries += segment.entries
        self.store.commit(document, segment, session_state(self.session))

    def _invalid(self, offset: int, error: UnicodeDecodeError):
        message = f"invalid UTF-8 at byte {offset} of document {self.doc_id!r} ({error.reason})"
        self.close()
        if self.replacing:  # the stored document stays as it was
            self.store.delete(self.document.id)
        else:
            self.store.set_status(self.document.id, "failed", error=message)
        raise InvalidText(message, offset) from None

    def _differs(self) -> str:
        return (f"document {self.doc_id!r} is stored complete with other content ({self.document.bytes:,} "
                "bytes, a different sha256); send replace=true to replace it")


def ingest_file(store: MemoryStore, mem_model, doc_id: str, path, *, replace: bool = False,
                chunk_size: int = 1 << 16, progress: Callable[[int], None] | None = None) -> Document:
    """Ingest a UTF-8 text file; a partly ingested document resumes at its committed offset."""
    stored = store.document(doc_id) if doc_id in store else None
    offset = stored.bytes if stored is not None and not replace and stored.status != "complete" else 0
    writer = DocumentWriter(store, mem_model, doc_id, offset=offset, replace=replace)
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            if progress is not None:
                progress(offset)
            while data := file.read(chunk_size):
                writer.write(data)
                if progress is not None:
                    progress(len(data))
        return writer.finish()
    finally:
        writer.close()


def ask(mem_model, store: MemoryStore, documents: list[str], prompt: str, *, max_new_tokens: int = 64,
        temperature: float = 0.0, streamer: Callable[[torch.Tensor], None] | None = None, top: int = 8,
        **generation) -> Answer:
    """Answer ``prompt`` over stored documents: greedy when ``temperature`` is 0, sampled otherwise;
    ``generation``: more ``GenerationConfig`` fields (``top_k``, ``stop_strings``, ...; ``Session.generate``).

    ``retrieved`` lists the ``top`` memory entries that took the largest share of the memory attention of the
    answer's tokens (the last prompt token and each new one; every head of every memory layer).
    """
    tokenizer = mem_model.tokenizer
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt has no tokens")
    with store.snapshot(), mem_model.session(store=store, documents=documents) as session:  # one snapshot throughout
        if len(ids) > 1:
            session.feed(torch.tensor([ids[:-1]], device=mem_model.device))
        session.state.knn.retrievals = []  # record what the last prompt token and the new tokens retrieve
        new = session.generate(torch.tensor([ids[-1:]], device=mem_model.device), max_new_tokens=max_new_tokens,
                               do_sample=temperature > 0, temperature=temperature or 1.0, streamer=streamer,
                               **generation)
        retrieved = _best_retrieved(session, top)
    return Answer(text=tokenizer.decode(new[0], skip_special_tokens=True), tokens=new.shape[1], retrieved=retrieved)


def _best_retrieved(session, top: int) -> list[dict]:
    """The entries with the largest share of the memory attention: each head's softmax over its retrieved
    entries, averaged over heads, layers and answer tokens (raw inner products rank entries that every query
    scores high, such as frequent tokens, above the one a head singles out)."""
    share: dict[int, float] = defaultdict(float)
    searches = 0
    for ids, logits in session.state.knn.retrievals:
        ids, weights = ids[0, :, -1], torch.softmax(logits[0, :, -1], dim=-1).nan_to_num(0.0)  # [q_heads, k]
        searches += ids.shape[0]
        for entry, weight in zip(ids.flatten().tolist(), weights.flatten().tolist(), strict=True):
            if entry >= 0:
                share[entry] += weight
    best = {entry: weight / max(searches, 1) for entry, weight in share.items()}
    found = []
    for entry, score in sorted(best.items(), key=lambda item: -item[1])[:top]:
        source = next((s for s in session.sources if s.first_entry <= entry < s.first_entry + s.entries), None)
        if source is not None:
            offset = source.first_token + entry - source.first_entry
            found.append({"document": source.document, "token_offset": offset, "score": round(score, 5)})
    return found
