"""What lies beyond the local context: the kNN memory reader, CrossBatch training memory, RMT tokens."""

from .crossbatch import CrossBatch

__all__ = ["CrossBatch"]
