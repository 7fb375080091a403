"""MemoryStore: the memories of ingested documents, persisted in LMDB.

A document is stored as it was streamed: one record per segment (its token ids, the UTF-8 text whose
tokens it completed, and the keys/values that entered each memory layer's kNN index when it closed),
plus the stream's local state at the last commit (XL caches, counters, RMT memory), so that an
interrupted ingestion resumes exactly where it stopped and a session can continue a document or
answer over several. Tensors are stored as safetensors bytes in their own dtype (the memory dtype
of the model; float16/bfloat16 halve the disk); nothing is pickled.

LMDB gives the guarantees the store needs: a segment record, the stream state and the document's
progress are written in one transaction, so a crash at any instant leaves every document at its last
committed segment; readers never block the writer. The map grows when full. An environment must not
cross ``fork()``; every call checks it is still in the process that opened the store.

Layout (named databases): ``meta`` (format version, fingerprint), ``documents`` (doc id -> JSON
metadata), ``segments`` (doc id, 0, segment number -> record), ``checksums`` (same key -> sha256 of
the record), ``states`` (doc id -> stream state).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from memlm.config import BLOCK_FIELDS, check_integer

from .records import (
    SHADOW,
    STATUSES,
    Document,
    DocumentConflict,
    DocumentNotFound,
    FingerprintMismatch,
    Segment,
    StoreError,
    check_doc_id,
)
from .sessions import load_documents, save_session

FORMAT_VERSION = 1
#: 2: the search-only settings left out of the fingerprint (stores of version 1 are upgraded on bind)
FINGERPRINT_VERSION = 2


#: MemoryConfig fields that only change how stored memory is searched, never what is stored: a stored corpus
#: may be opened with other values (top_k too when there is one memory layer: with several, what a lower layer
#: retrieves shapes the hidden states, hence the keys, of the layers above it).
SEARCH_ONLY = ("index", "index_kwargs", "memory_capacity")


def shaping_config(config) -> dict:
    """The MemoryConfig fields that shape the stored keys, values and stream state (``fingerprint`` hashes them).

    With one memory layer, how it retrieves (top_k, token or block retrieval) shapes nothing stored: no layer below
    it retrieves. The block fields are left out when retrieval is by tokens (where they mean nothing), so stores
    made before block retrieval existed keep their fingerprint."""
    retrieval_fields = ("top_k", "retrieval", *BLOCK_FIELDS)
    search_only = SEARCH_ONLY + (retrieval_fields if len(config.memory_layers) == 1 else ())
    return {name: value for name, value in config_fields(config).items() if name not in search_only}


def config_fields(config) -> dict:
    """``config.to_dict()`` as stores made before block retrieval saw it: without the retrieval fields when they hold
    their defaults (token retrieval), and as block stores made before ``exact_block_queries``, ``hold_blocks`` and
    ``block_neighbours`` saw it when they are 0, False and 0 (how those stores selected), and ``pooled_selection_from``
    when it is None."""
    values = config.to_dict()
    if values["retrieval"] == "tokens":
        for name in ("retrieval", *BLOCK_FIELDS):
            values.pop(name)
        return values
    if not values["hold_blocks"]:
        values.pop("hold_blocks")
    if values["block_neighbours"] == 0:
        values.pop("block_neighbours")
    if values["pooled_selection_from"] is None:
        values.pop("pooled_selection_from")
    if values["exact_block_queries"] == 0:
        values.pop("exact_block_queries")
    return values


def fingerprint(mem_model, legacy: bool = False) -> dict:
    """What must match for stored memories to be valid: the model (config, and a sample of every weight, so
    that two checkpoints of one architecture differ), memlm's parameters and the config fields that shape what is
    stored (``shaping_config``), the tokenizer. ``legacy``: the fingerprint of stores made before the search-only
    fields were set apart (every field hashed), so such a store can be recognised and upgraded."""
    model = mem_model.model
    model_config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_attn_implementation", "attn_implementation",
                     "_commit_hash", "dtype", "torch_dtype"):
        model_config.pop(volatile, None)
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.startswith("memlm_"):
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        weights.update(f"{name}{list(tensor.shape)}{tensor.dtype}".encode())
        weights.update(sample.numpy().tobytes())
    config = mem_model.config
    memory_dtype = config.memory_dtype or str(mem_model.dtype).removeprefix("torch.")  # the stored tensors' dtype
    fields = config_fields(config) if legacy else shaping_config(config)
    memlm = hashlib.sha256(json.dumps({**fields, "memory_dtype": memory_dtype}, sort_keys=True).encode())
    for name, tensor in sorted(mem_model.memory_module.state_dict().items()):
        memlm.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
    tokenizer = mem_model.tokenizer
    if tokenizer is None:
        vocab = "none"
    elif hasattr(tokenizer, "backend_tokenizer"):
        vocab = tokenizer.backend_tokenizer.to_str()
    else:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "version": FINGERPRINT_VERSION,
        "model": hashlib.sha256(json.dumps(model_config, sort_keys=True, default=str).encode()).hexdigest()[:16]
        + weights.hexdigest()[:16],
        "memlm": memlm.hexdigest()[:32],
        "tokenizer": hashlib.sha256(vocab.encode()).hexdigest()[:32],
    }


def stored_documents(store: MemoryStore, doc_ids, allow_incomplete: bool = False) -> list[Document]:
    """The documents ``doc_ids`` of ``store``: valid ids, each once, stored, complete (unless ``allow_incomplete``)."""
    if not isinstance(store, MemoryStore):
        raise TypeError(f"store must be a memlm.store.MemoryStore, got {type(store).__name__}")
    if isinstance(doc_ids, str) or not doc_ids or not all(isinstance(d, str) for d in doc_ids):
        raise ValueError(f"documents must be a non-empty list of document ids, got {doc_ids!r}")
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError(f"documents lists a document twice: {doc_ids!r}")
    documents = [store.document(check_doc_id(doc_id)) for doc_id in doc_ids]
    for document in documents:
        if document.status != "complete" and not allow_incomplete:
            raise DocumentConflict(f"document {document.id!r} is {document.status}, not complete: finish its upload "
                                   "(resume at its committed offset) before asking over it")
    return documents


class MemoryStore:
    """Documents' memories in an LMDB environment at ``path`` (a directory, created with mode 0700).

    Args:
        path: the store's directory.
        map_size: initial LMDB map size in bytes; it doubles whenever a write finds it full.
        create: make the store if ``path`` holds none (else FileNotFoundError).
        cache_bytes: the memory of recently loaded documents kept decoded (least recently used out first), so
            that asking over a document again reads only its metadata; 0 = no cache.
    """

    def __init__(self, path: str | os.PathLike, map_size: int = 1 << 30, create: bool = True,
                 cache_bytes: int = 0) -> None:
        check_integer("cache_bytes", cache_bytes, 0)
        self.path = Path(path)
        if not create and not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"{self.path} is not a memlm store (no data.mdb)")
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._pid = os.getpid()
        self._bound = None  # weakref to the model whose fingerprint was checked
        self._cache = _MemoryCache(cache_bytes)
        self._lock = _ResizeLock()  # transactions share it; set_mapsize (no transaction in flight) takes it alone
        self._pinned = threading.local()  # a thread's snapshot() transaction
        self._env = lmdb.open(str(self.path), map_size=map_size, max_dbs=8, mode=0o600, readahead=False)
        self._db = {name: self._env.open_db(name.encode())
                    for name in ("meta", "documents", "segments", "checksums", "states")}
        stored = self._get("meta", b"format")
        if stored is None:
            self._write(lambda txn: txn.put(b"format", str(FORMAT_VERSION).encode(), db=self._db["meta"]))
        elif stored is not None and int(stored) != FORMAT_VERSION:
            raise StoreError(f"{self.path} has store format {int(stored)}; this memlm reads format {FORMAT_VERSION}")

    # ----------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemoryStore({str(self.path)!r})"

    # ----------------------------------------------------------------------------- fingerprint

    def bind(self, mem_model) -> None:
        """Record ``mem_model``'s fingerprint in a new store, or check it against the stored one. The fingerprint
        is computed once per model and store (later calls with the same model only compare identities)."""
        if self._bound is not None and self._bound() is mem_model:
            return
        mine = fingerprint(mem_model)
        stored = self._get("meta", b"fingerprint")
        if stored is None:
            self._write(lambda txn: txn.put(b"fingerprint", json.dumps(mine).encode(), db=self._db["meta"]))
        else:
            stored = json.loads(stored)
            earlier = stored.get("version") != FINGERPRINT_VERSION
            if earlier and stored.get("memlm") == fingerprint(mem_model, legacy=True)["memlm"]:
                # a store of an earlier memlm made with these very settings: its fingerprint is upgraded in place
                stored = {**stored, "version": FINGERPRINT_VERSION, "memlm": mine["memlm"]}
                self._write(lambda txn: txn.put(b"fingerprint", json.dumps(stored).encode(), db=self._db["meta"]))
            differ = [part for part in ("model", "memlm", "tokenizer") if stored.get(part) != mine[part]]
            if differ:
                raise FingerprintMismatch(
                    f"{self.path} holds memories made with another {' and '.join(differ)} (stored {stored}, this "
                    f"model {mine}); memories of different models cannot be mixed: use another store directory "
                    f"(only {', '.join(SEARCH_ONLY)} and, with one memory layer, top_k may differ)"
                )
        self._bound = weakref.ref(mem_model)

    # ----------------------------------------------------------------------------- documents

    def documents(self, replacements: bool = False) -> list[Document]:
        """Every document, in id order (``replacements``: with the unfinished replacements of documents)."""
        with self._read() as txn:
            documents = [Document(**json.loads(value)) for _, value in txn.cursor(db=self._db["documents"])]
        return [d for d in documents if replacements or not d.id.endswith(SHADOW)]

    def document(self, doc_id: str) -> Document:
        value = self._get("documents", _check_id(doc_id).encode())
        if value is None:
            raise DocumentNotFound(f"no document {doc_id!r} in {self.path}")
        return Document(**json.loads(value))

    def __contains__(self, doc_id: str) -> bool:
        return self._get("documents", _check_id(doc_id).encode()) is not None

    def delete(self, doc_id: str) -> Document:
        """Remove a document and everything stored for it, in one transaction."""
        document = self.document(doc_id)

        def delete(txn):
            self._delete_records(txn, document.key)
            txn.delete(doc_id.encode(), db=self._db["documents"])

        self._write(delete)
        return document

    def segments(self, doc_id: str) -> Iterator[Segment]:
        """The document's segments in order, read from one snapshot: a delete or a commit meanwhile changes
        nothing of what this iteration yields."""
        with self._read() as txn:
            value = txn.get(_check_id(doc_id).encode(), db=self._db["documents"])
            if value is None:
                raise DocumentNotFound(f"no document {doc_id!r} in {self.path}")
            document = Document(**json.loads(value))
            for number in range(document.segments):
                value = txn.get(_segment_key(document.key, number), db=self._db["segments"])
                if value is None:
                    raise StoreError(f"segment {number} of {doc_id!r} is missing; run store.check()")
                yield _decode_segment(value)

    def tokens(self, doc_id: str) -> torch.Tensor:
        """All stored token ids of a document, [tokens] int64."""
        parts = [segment.ids for segment in self.segments(doc_id)]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def memory(self, doc_id: str, chunk_bytes: int = 64 << 20) -> Iterator[tuple[dict[int, tuple], int]]:
        """A document's stored memory entries, in order, as ``({layer: (keys, values)}, entries)`` chunks of about
        ``chunk_bytes`` (keys, values [kv_heads, n, head_dim] concatenated over segments). From the cache when the
        document, as it is stored now, was loaded before; else read from one snapshot (and cached if it fits)."""
        with self.snapshot():  # the record (the cache's key) and the segments it caches: one state
            yield from self._memory(doc_id, chunk_bytes)

    def _memory(self, doc_id: str, chunk_bytes: int) -> Iterator[tuple[dict[int, tuple], int]]:
        document = self.document(doc_id)
        cached = self._cache.get(document)
        if cached is not None:
            yield from cached
            return
        chunks, keys, values, held, entries, total = [], defaultdict(list), defaultdict(list), 0, 0, 0

        def chunk():
            return ({layer: (torch.cat(keys[layer], dim=1), torch.cat(values[layer], dim=1)) for layer in keys},
                    entries)

        for segment in self.segments(doc_id):
            for layer, (k, v) in segment.memory.items():
                keys[layer].append(k)
                values[layer].append(v)
                held += k.nbytes + v.nbytes
            entries += segment.entries
            if held >= chunk_bytes:
                chunks.append(chunk())
                yield chunks[-1]
                total, held, entries = total + held, 0, 0
                keys.clear()
                values.clear()
        if keys or not chunks:
            chunks.append(chunk())
            yield chunks[-1]
        self._cache.put(document, chunks, total + held)

    def state(self, doc_id: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The stream state at the document's last commit: tensors and counters (``StreamState.local_state``)."""
        value = self._get("states", self.document(doc_id).key.encode())
        if value is None:
            return {}, {}
        return _decode_state(value)

    # ----------------------------------------------------------------------------- sessions

    def restore(self, session, doc_ids, allow_incomplete: bool = False) -> None:
        """Load stored documents into a fresh batch-1 session (``mem_model.session(store=..., documents=...)``)."""
        load_documents(self, session, stored_documents(self, doc_ids, allow_incomplete))

    def save(self, session, doc_id: str) -> Document:
        """Store what a batch-1 session has read as the complete document ``doc_id`` (``Session.save_document``)."""
        return save_session(self, session, doc_id)

    # ----------------------------------------------------------------------------- writing

    def begin(self, doc_id: str, key: str | None = None) -> Document:
        """Create an empty document with status ``ingesting``, its records stored under ``key`` (default: its
        id); it must not exist."""
        document = Document(id=_check_id(doc_id), key=key or doc_id)

        def begin(txn):
            if not txn.put(doc_id.encode(), _encode_document(document), overwrite=False, db=self._db["documents"]):
                raise DocumentConflict(f"document {doc_id!r} already exists")

        self._write(begin)
        return document

    def commit(self, document: Document, segment: Segment | None, state: tuple[dict, dict]) -> None:
        """Append ``segment`` (if any) as the document's next segment, replace its stream state and write its
        metadata (``document``, already advanced by the caller), all in one transaction.

        Compare-and-swap: the stored document must still hold the segments this writer started from (one fewer
        than ``document.segments`` when a segment is appended), else DocumentConflict and nothing is written; so
        two writers of one document, in one process or several, never interleave: the second gets the conflict.
        """
        document.updated = time.time()
        state_value = _encode_state(*state)
        segment_value = None if segment is None else _encode_segment(segment)

        def commit(txn):
            stored = txn.get(document.id.encode(), db=self._db["documents"])
            stored = None if stored is None else Document(**json.loads(stored))
            expected = document.segments - (segment is not None)
            if stored is None or stored.key != document.key or stored.segments != expected:
                found = "no such document" if stored is None else f"{stored.segments} segments under {stored.key!r}"
                raise DocumentConflict(f"document {document.id!r} changed under this writer (expected {expected} "
                                       f"segments under {document.key!r}, found {found}): another upload or a delete "
                                       "got there first; nothing was written")
            if segment_value is not None:
                key = _segment_key(document.key, document.segments - 1)
                txn.put(key, segment_value, db=self._db["segments"])
                txn.put(key, hashlib.sha256(segment_value).digest(), db=self._db["checksums"])
            txn.put(document.key.encode(), state_value, db=self._db["states"])
            txn.put(document.id.encode(), _encode_document(document), db=self._db["documents"])

        self._write(commit)

    def promote(self, replacement: Document, doc_id: str) -> Document:
        """A complete replacement takes the place of ``doc_id`` (whose records are deleted), in one transaction."""
        promoted = Document(**{**replacement.to_dict(), "id": doc_id, "updated": time.time()})

        def promote(txn):
            old = txn.get(doc_id.encode(), db=self._db["documents"])
            if old is not None:
                self._delete_records(txn, Document(**json.loads(old)).key)
            txn.put(doc_id.encode(), _encode_document(promoted), db=self._db["documents"])
            txn.delete(replacement.id.encode(), db=self._db["documents"])

        self._write(promote)
        return promoted

    def set_status(self, doc_id: str, status: str, error: str | None = None) -> Document:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        document = self.document(doc_id)
        document.status, document.error, document.updated = status, error, time.time()
        self._write(lambda txn: txn.put(doc_id.encode(), _encode_document(document), db=self._db["documents"]))
        return document

    # ----------------------------------------------------------------------------- verification

    def check(self) -> list[str]:
        """Verify every document: its segments are all there and nothing else is, each record matches its
        checksum and parses, sizes add up to the metadata, the text hashes to the stored sha256. Returns the
        problems found (an empty list: the store is sound)."""
        problems = []
        known = set()
        for document in self.documents(replacements=True):
            known.add(document.key)
            problems += [f"{document.id}: {p}" for p in self._check_document(document)]
        with self._read() as txn:
            for key, _ in txn.cursor(db=self._db["segments"]):
                name = key.split(b"\0")[0].decode(errors="replace")
                if name not in known:
                    problems.append(f"{name}: segment records of a document that does not exist")
                    known.add(name)
        return problems

    def _check_document(self, document: Document) -> list[str]:
        problems, tokens, entries, text_bytes, text = [], 0, 0, 0, hashlib.sha256()
        with self._read() as txn:
            stored = len(self._segment_keys(txn, document.key))
        if stored != document.segments:
            problems.append(f"{stored} segment records, metadata says {document.segments}")
        for number in range(document.segments):
            key = _segment_key(document.key, number)
            value, checksum = self._get("segments", key), self._get("checksums", key)
            if value is None:
                problems.append(f"segment {number} is missing")
                continue
            if checksum != hashlib.sha256(value).digest():
                problems.append(f"segment {number} does not match its checksum (corrupted)")
                continue
            try:
                segment = _decode_segment(value)
            except Exception as error:  # a record that passes its checksum but does not parse
                problems.append(f"segment {number} does not parse: {error}")
                continue
            tokens += segment.ids.numel()
            counts = {k.shape[1] for k, _ in segment.memory.values()}
            if len(counts) > 1:
                problems.append(f"segment {number}: memory layers hold different entry counts {sorted(counts)}")
            entries += segment.entries
            text.update(segment.text)
            text_bytes += len(segment.text)
        if tokens != document.tokens:
            problems.append(f"segments hold {tokens} tokens, metadata says {document.tokens}")
        if entries != document.entries:
            problems.append(f"segments hold {entries} memory entries, metadata says {document.entries}")
        if text_bytes != document.bytes:
            problems.append(f"segments hold {text_bytes} text bytes, metadata says {document.bytes}")
        if document.status == "complete" and document.sha256 not in (None, text.hexdigest()):
            problems.append("the stored text does not hash to the document's sha256")
        if document.segments:
            try:
                self.state(document.id)
            except Exception as error:
                problems.append(f"stream state does not parse: {error}")
        return problems

    # ----------------------------------------------------------------------------- LMDB plumbing

    def _check_process(self) -> None:
        if self._env is None:
            raise RuntimeError(f"{self} is closed")
        if os.getpid() != self._pid:
            raise RuntimeError(f"{self} was opened in process {self._pid}; an LMDB environment must not cross fork(): "
                               "open the store again in this process")

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Inside the block, every read of this thread sees one snapshot of the store (one LMDB read transaction),
        whatever other threads or processes commit or delete meanwhile (``ask`` answers from one)."""
        if getattr(self._pinned, "txn", None) is not None:  # already inside one
            yield
            return
        with self._read() as txn:
            self._pinned.txn = txn
            try:
                yield
            finally:
                self._pinned.txn = None

    @contextlib.contextmanager
    def _read(self) -> Iterator:
        """A read transaction: one snapshot of the store, whatever commits meanwhile (use as a context manager);
        this thread's ``snapshot`` when it is inside one. Concurrent readers and writers share the lock; only a
        map resize waits for them (and they for it)."""
        self._check_process()
        pinned = getattr(self._pinned, "txn", None)
        if pinned is not None:
            yield pinned
            return
        with self._lock.shared():
            txn = self._env.begin(buffers=False)
            try:
                yield txn
            finally:
                txn.abort()

    def _get(self, db: str, key: bytes) -> bytes | None:
        with self._read() as txn:
            return txn.get(key, db=self._db[db])

    def _write(self, body: Callable):
        """Run ``body(txn)`` in one write transaction; grow the map and retry when it is full."""
        self._check_process()
        while True:
            try:
                with self._lock.shared(), self._env.begin(write=True) as txn:
                    return body(txn)
            except lmdb.MapFullError:
                with self._lock.exclusive():
                    self._env.set_mapsize(self._env.info()["map_size"] * 2)
            except lmdb.MapResizedError:  # another process grew it: adopt its size
                with self._lock.exclusive():
                    self._env.set_mapsize(0)

    def _delete_records(self, txn, key: str) -> None:
        """Delete the segments, checksums and state stored under ``key``."""
        for segment_key in self._segment_keys(txn, key):
            txn.delete(segment_key, db=self._db["segments"])
            txn.delete(segment_key, db=self._db["checksums"])
        txn.delete(key.encode(), db=self._db["states"])

    def _segment_keys(self, txn, key: str) -> list[bytes]:
        prefix = key.encode() + b"\0"
        cursor = txn.cursor(db=self._db["segments"])
        keys = []
        if cursor.set_range(prefix):
            for key in cursor.iternext(values=False):
                if not key.startswith(prefix):
                    break
                keys.append(key)
        return keys


class _MemoryCache:
    """Decoded memory of recently loaded documents, at most ``capacity`` bytes, least recently used evicted first.
    An entry is valid for the document exactly as stored when it was read (id, record key, segments, update time):
    any commit, replacement or delete makes it a miss."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.held = capacity, 0
        self._entries: OrderedDict[str, tuple[tuple, list, int]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def version(document: Document) -> tuple:
        return document.key, document.segments, document.updated

    def get(self, document: Document) -> list | None:
        with self._lock:
            entry = self._entries.get(document.id)
            if entry is None or entry[0] != self.version(document):
                return None
            self._entries.move_to_end(document.id)
            return entry[1]

    def put(self, document: Document, chunks: list, size: int) -> None:
        with self._lock:
            old = self._entries.pop(document.id, None)
            self.held -= old[2] if old else 0
            if size > self.capacity:
                return
            while self.held + size > self.capacity:
                self.held -= self._entries.popitem(last=False)[1][2]
            self._entries[document.id] = (self.version(document), chunks, size)
            self.held += size


class _ResizeLock:
    """Shared by every transaction of this process, exclusive for ``set_mapsize``, which LMDB allows only while the
    process has no transaction in flight. Readers never wait for each other or for writers (LMDB serialises
    writers itself); a resize waits for the transactions in flight, and new ones wait for the resize. A thread
    already holding it shared (a read inside a read) does not wait, so it cannot deadlock on a pending resize."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._active = 0
        self._resizing = False
        self._held = threading.local()

    @contextlib.contextmanager
    def shared(self):
        depth = getattr(self._held, "depth", 0)
        with self._condition:
            if not depth:
                self._condition.wait_for(lambda: not self._resizing)
            self._active += 1
        self._held.depth = depth + 1
        try:
            yield
        finally:
            self._held.depth = depth
            with self._condition:
                self._active -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        if getattr(self._held, "depth", 0):
            raise RuntimeError("the store's map must grow, but this thread is inside a read of the store (iterating "
                               "segments?): write outside the read")
        with self._condition:
            self._condition.wait_for(lambda: not self._resizing)
            self._resizing = True
            self._condition.wait_for(lambda: self._active == 0)
        try:
            yield
        finally:
            with self._condition:
                self._resizing = False
                self._condition.notify_all()


def _check_id(doc_id: object) -> str:
    """A document id, or the id of a document's replacement in progress."""
    check_doc_id(doc_id.removesuffix(SHADOW) if isinstance(doc_id, str) else doc_id)
    return doc_id


def _segment_key(key: str, number: int) -> bytes:
    return key.encode() + b"\0" + number.to_bytes(8, "big")


def _encode_document(document: Document) -> bytes:
    return json.dumps(document.to_dict()).encode()


def _encode_segment(segment: Segment) -> bytes:
    tensors = {"ids": segment.ids.to(torch.int32).cpu().contiguous(),
               "text": torch.frombuffer(bytearray(segment.text), dtype=torch.uint8) if segment.text
               else torch.empty(0, dtype=torch.uint8)}
    for layer, (keys, values) in segment.memory.items():
        tensors[f"keys.{layer}"] = keys.cpu().contiguous()
        tensors[f"values.{layer}"] = values.cpu().contiguous()
    return save_tensors(tensors)


def _decode_segment(value: bytes) -> Segment:
    tensors = load_tensors(value)
    layers = sorted(int(name.split(".")[1]) for name in tensors if name.startswith("keys."))
    return Segment(ids=tensors["ids"].long(), text=tensors["text"].numpy().tobytes(),
                   memory={layer: (tensors[f"keys.{layer}"], tensors[f"values.{layer}"]) for layer in layers})


def _encode_state(tensors: dict[str, torch.Tensor], counters: dict[str, int]) -> bytes:
    return save_tensors({name: t.detach().cpu().contiguous() for name, t in tensors.items()},
                        metadata={"counters": json.dumps(counters)})


def _decode_state(value: bytes) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    # safetensors' format: an 8-byte little-endian header size, then the JSON header holding the metadata
    header_size = int.from_bytes(value[:8], "little")
    metadata = json.loads(value[8 : 8 + header_size]).get("__metadata__", {})
    return load_tensors(value), json.loads(metadata.get("counters", "{}"))
