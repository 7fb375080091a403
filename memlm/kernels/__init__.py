"""memlm.kernels: attention as blocks of (out, lse), their merge, and fused memory attention.

``attention_block`` / ``merge_blocks`` (``blocks.py``) are the algebra every attention of memlm is
built from; ``lambda_attention`` (``lambda_attention.py``) is LM-Infinite's Λ pattern built from it, ``ring_attention``
(``ring_attention.py``) exact attention over a sequence sharded across ``torch.distributed`` ranks.
``memory_attention`` is the one entry point the runtime calls at a memory layer. It runs the fused
Triton kernels (``fused.py``) on CUDA tensors when Triton is installed and the inputs are ones they
take; on CPU, a joint softmax over shared memory (block retrieval) without a graph runs as torch's flash
kernel blocks (``flash_block.joint_memory_attention``); the pure-torch reference (``reference.py``) runs everywhere
else. ``MEMLM_KERNEL=ref``, ``=flash`` or ``=triton`` forces one path; a forced path raises on inputs it cannot take
instead of falling back. The choice is made per call: importing this package imports neither Triton nor ``memlm.index``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .blocks import additive_mask, attention_block, attention_output, causal_mask, merge_blocks, sink_block
from .dilated_attention import dilated_attention, dilated_attention_ref
from .flash_block import cpu_kernels, flash_block, joint_memory_attention
from .lambda_attention import lambda_attention, lambda_attention_ref
from .reference import check_memory_attention_args, memory_attention_ref
from .ring_attention import ring_attention, ring_shard, ring_unshard
from .shifted_sparse_attention import shifted_sparse_attention, shifted_sparse_attention_ref

__all__ = ["KERNELS", "additive_mask", "attention_block", "attention_output", "causal_mask", "dilated_attention",
           "dilated_attention_ref", "flash_block", "lambda_attention",
           "lambda_attention_ref", "memory_attention", "memory_attention_ref", "merge_blocks", "ring_attention",
           "ring_shard", "ring_unshard", "select_kernel",
           "shifted_sparse_attention", "shifted_sparse_attention_ref", "sink_block"]

KERNELS = ("auto", "ref", "flash", "triton")


def memory_attention(
    q, k, v, mem_k=None, mem_v=None, mem_mask=None, gate=None, fusion="gate", scale=None, causal=True,
    window=None, softcap=None, sinks=None, dropout=0.0, capped=None, capped_q=None, capped_k=None,
):
    """Local attention fused with memory attention; arguments and shapes as ``memory_attention_ref``.

    Retrieved memory (the 5-d layout) is stop-gradient on every path; shared memory gets gradients.
    """
    plain = window is None and softcap is None and sinks is None and not dropout and capped is None
    kernel = select_kernel(q, k, v, mem_k, mem_v, mem_mask, gate, fusion, causal, plain)
    if kernel == "triton":
        from .fused import memory_attention_triton

        return memory_attention_triton(q, k, v, mem_k, mem_v, mem_mask, gate, fusion, scale, causal)
    if kernel == "flash":
        return joint_memory_attention(q, k, v, mem_k, mem_v, mem_mask, scale)
    return memory_attention_ref(q, k, v, mem_k, mem_v, mem_mask, gate, fusion, scale, causal, window, softcap, sinks,
                                dropout, capped, capped_q, capped_k)


def select_kernel(q, k, v, mem_k=None, mem_v=None, mem_mask=None, gate=None, fusion="gate", causal=True,
                  plain=True) -> str:
    """``"triton"``, ``"flash"`` or ``"ref"``: which path ``memory_attention`` takes for these inputs (reads
    MEMLM_KERNEL).

    ``plain``: no sliding window, soft-capping, sinks, dropout or distance cap (the fused kernels compute none).
    """
    choice = os.environ.get("MEMLM_KERNEL", "auto").strip().lower() or "auto"
    if choice not in KERNELS:
        raise ValueError(f"MEMLM_KERNEL must be one of {KERNELS}, got {choice!r}")
    if choice in ("triton", "flash") and not plain:
        raise ValueError(f"MEMLM_KERNEL={choice}: the fused kernels compute no sliding window, softcap, sinks or "
                         "dropout; unset MEMLM_KERNEL to use the reference for this model")
    # flash: joint fusion over shared memory (block retrieval), causal, without a graph (inference), on CPU
    flash = (fusion == "joint" and causal and mem_k is not None and mem_k.dim() == 4 and cpu_kernels(q) is not None
             and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, mem_k, mem_v))))
    if choice == "flash" and not flash:
        raise ValueError("MEMLM_KERNEL=flash runs the joint fusion over shared memory (block retrieval), causal, "
                         "without gradients, on CPU tensors (float32, float64, bfloat16, float16); unset MEMLM_KERNEL "
                         "for these inputs")
    if choice != "auto":
        return choice
    if flash and plain:
        return "flash"
    if not plain or not getattr(q, "is_cuda", False) or importlib.util.find_spec("triton") is None:
        return "ref"
    check_memory_attention_args(q, k, v, mem_k, mem_v, mem_mask, gate, fusion, causal)
    from .fused import unsupported

    return "ref" if unsupported(q, k, v, mem_k, mem_v, mem_mask, gate) else "triton"
