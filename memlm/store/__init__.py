"""Persistent memory: the LMDB MemoryStore, document ingestion and resume (``memlm.store.documents``)."""

from .records import DOC_ID, Document, DocumentConflict, DocumentNotFound, FingerprintMismatch, Segment, StoreError
from .store import MemoryStore

__all__ = ["DOC_ID", "Document", "DocumentConflict", "DocumentNotFound", "FingerprintMismatch", "MemoryStore",
           "Segment", "StoreError"]
