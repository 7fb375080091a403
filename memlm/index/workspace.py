"""Scratch buffers a search reuses from one call to the next.

A search over 65K keys per head needs tens of MB of scratch (score blocks, group maxima, the survivors' keys and
queries). A fresh tensor of that size is a fresh mapping whose every page the kernel faults in and zeroes on first
touch: measured on a 2-core CPU, gathering 205K rows of 64 floats into a new tensor takes 22 ms, into a kept one
5 ms. Kept buffers also keep the resident memory of a long stream flat (no allocator fragmentation from tensors
made anew every segment).
"""

from __future__ import annotations

import math

import torch


class Workspace:
    """Named flat buffers, each grown by half again (or to ``limit``) when a call needs more, never shrunk (freed with
    their owner). Not thread-safe: one per index, whose searches are serial."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *,
            limit: int | None = None) -> torch.Tensor:
        """A contiguous tensor of ``shape`` whose contents are undefined, valid until the next ``get(name, ...)``.
        ``limit``: the most elements this buffer will ever be asked for (caps the growth)."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            grown = 0 if buffer is None or buffer.dtype != dtype else buffer.numel() * 3 // 2
            if limit is not None:
                grown = min(grown, limit)
            buffer = self._buffers[name] = torch.empty(max(numel, grown), dtype=dtype, device=device)
        return buffer[:numel].view(shape)
