"""memlm.index: FIFO kNN memories of keys and values, one per sequence and key/value head.

    index = create_index("torch", dim=64, capacity=65536, batch_size=2, num_heads=8)
    index.add(keys, values)             # [batch, heads, n, dim]
    result = index.search(queries, k)   # queries [batch, heads, q, dim] -> SearchResult

Backends: ``"torch"`` (exact, on the tensors' device; the default everywhere; ``search="two-stage"`` screens
in bfloat16 first, the same answer faster, and ``"auto"`` picks it where the hardware has bfloat16), ``"faiss"`` with
``kind="flat"`` (exact, faiss' brute-force kNN) or ``kind="ivf"`` (approximate, ``nlist`` /
``nprobe`` / ``train_size`` / ``evict_block``). This package never imports the memlm runtime.
"""

from __future__ import annotations

import torch

from .base import MemoryIndex, SearchResult
from .faiss_index import FaissFlatIndex, FaissIVFIndex
from .torch_index import TorchIndex

__all__ = ["FaissFlatIndex", "FaissIVFIndex", "MemoryIndex", "SearchResult", "TorchIndex", "create_index"]

BACKENDS = ("torch", "faiss")
FAISS_KINDS = {"flat": FaissFlatIndex, "ivf": FaissIVFIndex}


def create_index(
    backend: str = "torch",
    *,
    dim: int,
    capacity: int,
    batch_size: int = 1,
    num_heads: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **backend_kwargs,
) -> MemoryIndex:
    """Make an empty FIFO kNN memory.

    Args:
        backend: ``"torch"`` or ``"faiss"``.
        dim, capacity, batch_size, num_heads, device, dtype: see ``MemoryIndex``.
        backend_kwargs: for ``"torch"``: ``search`` (``"auto"``, ``"exact"``, ``"two-stage"``, see
            ``TorchIndex``); for ``"faiss"``: ``kind`` (``"flat"`` or ``"ivf"``) and, for IVF,
            ``nlist``, ``nprobe``, ``train_size``, ``evict_block``, ``mips`` (see ``FaissIVFIndex``).
    """
    common = {"dim": dim, "capacity": capacity, "batch_size": batch_size, "num_heads": num_heads,
              "device": device, "dtype": dtype}
    if backend == "torch":
        if set(backend_kwargs) - {"search"}:
            raise ValueError(f"the 'torch' backend takes only 'search', got {sorted(backend_kwargs)}")
        return TorchIndex(**common, **backend_kwargs)
    if backend == "faiss":
        kind = backend_kwargs.pop("kind", "flat")
        if kind not in FAISS_KINDS:
            raise ValueError(f"faiss kind must be one of {sorted(FAISS_KINDS)}, got {kind!r}")
        if kind == "flat" and backend_kwargs:
            raise ValueError(f"faiss kind 'flat' takes no extra arguments, got {sorted(backend_kwargs)}")
        return FAISS_KINDS[kind](**common, **backend_kwargs)
    raise ValueError(f"index backend must be one of {BACKENDS}, got {backend!r}")
