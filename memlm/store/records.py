"""What a MemoryStore holds: document metadata, segment records, ids, and the store's errors."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

import torch

DOC_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
#: a replacement is written as document ``id + SHADOW`` and takes the id's place when complete
SHADOW = "~replacement"
STATUSES = ("ingesting", "complete", "failed")


class StoreError(Exception):
    """Base class of the store's errors; the service maps each kind to an HTTP status."""


class DocumentNotFound(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DocumentConflict(StoreError):
    """The request does not fit the document's stored state (offset, content, status)."""


class FingerprintMismatch(StoreError):
    """The store holds memories of another model, memlm config or tokenizer."""


@dataclass
class Document:
    """A stored document's metadata.

    bytes: UTF-8 bytes committed (the offset an interrupted upload resumes at); tokens: tokens fed and
    stored; skip: tokens of the text after ``bytes`` that are already stored (a segment may end inside a
    word); entries: memory entries stored per memory layer; memory_start: document position of the
    first stored entry (> 0 only for a session saved after its memory evicted entries); key: the name its
    segments and state are stored under (the id, or ``id~N`` after N replacements).
    """

    id: str
    key: str = ""
    status: str = "ingesting"
    bytes: int = 0
    tokens: int = 0
    segments: int = 0
    entries: int = 0
    skip: int = 0
    memory_start: int = 0
    sha256: str | None = None  # of the whole text, once complete
    error: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.key = self.key or self.id

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Segment:
    """One stored segment: ids [n] int64, the text bytes it completed, and layer -> keys, values
    [kv_heads, entries, head_dim] that entered memory when it closed."""

    ids: torch.Tensor
    text: bytes
    memory: dict[int, tuple[torch.Tensor, torch.Tensor]]

    @property
    def entries(self) -> int:
        """Memory entries per memory layer."""
        return next(iter(self.memory.values()))[0].shape[1] if self.memory else 0


def check_doc_id(doc_id: object) -> str:
    if not isinstance(doc_id, str) or not DOC_ID.fullmatch(doc_id):
        raise ValueError(f"document id must match [A-Za-z0-9._-]{{1,128}}, got {doc_id!r}")
    return doc_id
