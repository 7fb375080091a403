"""memlm.kernels: fused memory attention.

``memory_attention`` is the one entry point the runtime calls at every layer; today it runs the
pure-torch reference (``memory_attention_ref``), which uses ``scaled_dot_product_attention`` for
the local part. This package never imports ``memlm.index``.
"""

from .reference import memory_attention_ref

__all__ = ["memory_attention", "memory_attention_ref"]


def memory_attention(
    q, k, v, mem_k=None, mem_v=None, mem_mask=None, gate=None, fusion="gate", scale=None, causal=True
):
    """Local attention fused with memory attention; arguments and shapes as ``memory_attention_ref``."""
    return memory_attention_ref(q, k, v, mem_k, mem_v, mem_mask, gate, fusion, scale, causal)
