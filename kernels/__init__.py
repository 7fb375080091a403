"""memlm.kernels: fused memory attention.

``memory_attention`` is the one entry point the runtime calls at every layer. It runs the fused
Triton kernels (``fused.py``) on CUDA tensors when Triton is installed and the pure-torch reference
(``reference.py``, SDPA for the local part) everywhere else. ``MEMLM_KERNEL=ref`` or ``=triton``
forces one path; a forced Triton path raises on inputs it cannot take instead of falling back. The
choice is made per call: importing this package imports neither Triton nor ``memlm.index``.
"""

from __future__ import annotations

import importlib.util
import os

from .reference import check_memory_attention_args, memory_attention_ref

__all__ = ["KERNELS", "memory_attention", "memory_attention_ref", "select_kernel"]

KERNELS = ("auto", "ref", "triton")


def memory_attention(
    q, k, v, mem_k=None, mem_v=None, mem_mask=None, gate=None, fusion="gate", scale=None, causal=True
):
    """Local attention fused with memory attention; arguments and shapes as ``memory_attention_ref``.

    Retrieved memory (the 5-d layout) is stop-gradient on every path; shared memory gets gradients.
    """
    if select_kernel(q, k, v, mem_k, mem_v, mem_mask, gate, fusion, causal) == "triton":
        from .fused import memory_attention_triton

        return memory_attention_triton(q, k, v, mem_k, mem_v, mem_mask, gate, fusion, scale, causal)
    return memory_attention_ref(q, k, v, mem_k, mem_v, mem_mask, gate, fusion, scale, causal)


def select_kernel(q, k, v, mem_k=None, mem_v=None, mem_mask=None, gate=None, fusion="gate", causal=True) -> str:
    """``"triton"`` or ``"ref"``: which path ``memory_attention`` takes for these inputs (reads MEMLM_KERNEL)."""
    choice = os.environ.get("MEMLM_KERNEL", "auto").strip().lower() or "auto"
    if choice not in KERNELS:
        raise ValueError(f"MEMLM_KERNEL must be one of {KERNELS}, got {choice!r}")
    if choice != "auto":
        return choice
    if not getattr(q, "is_cuda", False) or importlib.util.find_spec("triton") is None:
        return "ref"
    check_memory_attention_args(q, k, v, mem_k, mem_v, mem_mask, gate, fusion, causal)
    from .fused import unsupported

    return "ref" if unsupported(q, k, v, mem_k, mem_v, mem_mask, gate) else "triton"
