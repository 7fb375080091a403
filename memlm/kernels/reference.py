"""Memory attention in plain torch, built from blocks (``blocks.py``): the reference every faster kernel matches.

One segment's queries attend to their local context (Transformer-XL cache + the segment itself,
causally) and to memory entries, fused in one of two ways:

* ``fusion="gate"`` (Memorizing Transformers, Wu et al. 2022): two separate softmaxes, mixed per
  head by a learned gate: ``sigmoid(g) * memory_block.out + (1 - sigmoid(g)) * local_block.out``.
* ``fusion="joint"`` (Focused Transformer, Tworkowski et al. 2023): one softmax over local and memory
  keys together, i.e. ``merge_blocks(local_block, memory_block)``.

Memory comes in two layouts: *retrieved* (each query its own top-k entries, as a kNN search gives
them) and *shared* (one block of entries every query sees, as in Focused-Transformer training).
A query with no valid memory entry gets the local result alone. A learned attention sink (gpt-oss)
joins the local softmax as a block of its own.
"""

from __future__ import annotations

import math

import torch

from .blocks import (
    attention_block,
    attention_output,
    causal_mask,
    check_block_args,
    merge_blocks,
    shape_of,
    sink_block,
)

FUSIONS = ("gate", "joint")


def memory_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mem_k: torch.Tensor | None = None,
    mem_v: torch.Tensor | None = None,
    mem_mask: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    fusion: str = "gate",
    scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    dropout: float = 0.0,
    capped: torch.Tensor | None = None,
    capped_q: torch.Tensor | None = None,
    capped_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """Local attention fused with memory attention; see the module docstring.

    Args:
        q: [batch, q_heads, seq, head_dim] queries of the segment (positions applied).
        k, v: [batch, kv_heads, ctx, head_dim] local keys/values (cache + segment); q_heads must be a
            multiple of kv_heads (grouped-query attention: query head h reads kv head h // group).
        mem_k, mem_v: retrieved layout [batch, q_heads, seq, top_k, head_dim], or shared layout
            [batch, kv_heads, mem_len, head_dim]; None for no memory.
        mem_mask: bool, [batch, q_heads, seq, top_k] or [batch, kv_heads, mem_len]; False = absent.
        gate: [q_heads] gate logits, required by ``fusion="gate"`` when memory is given.
        fusion: ``"gate"`` or ``"joint"``.
        scale: softmax scale; default 1/sqrt(head_dim).
        causal: query i of the segment sees local keys 0 .. ctx - seq + i.
        window: sliding window (Mistral): query i sees only the ``window`` latest of those local keys.
        softcap: logit soft-capping (Gemma 2) of local and memory scores alike.
        sinks: [q_heads] learned sink logits (gpt-oss), one more term of the local softmax.
        dropout: attention dropout (training), on local and memory weights alike.
        capped: bool [seq, ctx]: local pairs scored ``capped_q[i] . capped_k[j]`` instead of ``q[i] . k[j]``
            (LM-Infinite's distance cap: q rotated to the cap, [batch, q_heads, seq, head_dim]; k unrotated,
            [batch, kv_heads, ctx, head_dim]); one more local block, merged.

    Retrieved memory is stop-gradient; shared memory (Focused-Transformer training) gets gradients.

    Returns:
        [batch, q_heads, seq, head_dim] in the dtype of ``q``.
    """
    check_memory_attention_args(q, k, v, mem_k, mem_v, mem_mask, gate, fusion, causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    options = {"scale": scale, "softcap": softcap, "dropout": dropout}
    seq, ctx = q.shape[2], k.shape[2]
    local_args = {"mask": causal_mask(seq, ctx, window, q.device) if causal and window is not None else None,
                  "causal": causal and window is None}
    if capped is not None:  # the visible pairs split in two blocks: exact, and scored at the cap
        visible = causal_mask(seq, ctx, window, q.device) if causal else torch.ones(seq, ctx, dtype=torch.bool,
                                                                                     device=q.device)
        local_args = {"mask": visible & ~capped, "causal": False}
    memory = None if mem_k is None else memory_block(q, mem_k, mem_v, mem_mask, **options)
    if (memory is None or fusion == "gate") and softcap is None and sinks is None and capped is None:
        local_out = attention_output(q, k, v, **local_args, scale=scale, dropout=dropout)  # no local lse needed
    else:
        local = attention_block(q, k, v, **local_args, **options)
        if capped is not None:
            local = merge_blocks(*local, *attention_block(capped_q, capped_k, v, mask=visible & capped, **options))
        if sinks is not None:
            local = merge_blocks(*local, *sink_block(sinks, local[0]))
        if memory is not None and fusion == "joint":
            return merge_blocks(*local, *memory)[0]
        local_out = local[0]
    if memory is None:
        return local_out
    has_memory = torch.isfinite(memory[1]).unsqueeze(-1)
    g = torch.sigmoid(gate.to(local_out.dtype)).view(1, -1, 1, 1)
    return torch.where(has_memory, g * memory[0] + (1 - g) * local_out, local_out)


def memory_block(q, mem_k, mem_v, mem_mask=None, scale=None, softcap=None, dropout=0.0):
    """The block of memory entries: (out [b, hq, seq, d], lse [b, hq, seq]) for either layout."""
    if mem_k.dim() == 4:  # shared: one key set for every query, as the local context
        mask = None if mem_mask is None else mem_mask.repeat_interleave(q.shape[1] // mem_k.shape[1], dim=1)[:, :, None]
        return attention_block(q, mem_k.to(q.dtype), mem_v.to(q.dtype), mask=mask, scale=scale, softcap=softcap,
                               dropout=dropout)
    # retrieved: each query its own top_k entries from a kNN index, stop-gradient; a block with one query per row
    batch, q_heads, seq, top_k, dim = mem_k.shape
    rows = (batch * q_heads * seq, 1)
    out, lse = attention_block(
        q.reshape(*rows, 1, dim), mem_k.detach().to(q.dtype).reshape(*rows, top_k, dim),
        mem_v.detach().to(q.dtype).reshape(*rows, top_k, dim),
        mask=None if mem_mask is None else mem_mask.reshape(*rows, 1, top_k),
        scale=scale, softcap=softcap, dropout=dropout,
    )
    return out.reshape(batch, q_heads, seq, dim), lse.reshape(batch, q_heads, seq)


def check_memory_attention_args(q, k, v, mem_k, mem_v, mem_mask, gate, fusion, causal) -> None:
    """Raise a ValueError/TypeError that says what was expected when an argument does not fit."""
    check_block_args(q, k, v)
    batch, q_heads, seq, dim = q.shape
    kv_heads, ctx = k.shape[1], k.shape[2]
    if causal and ctx < seq:
        raise ValueError(f"causal attention needs ctx >= seq (the segment ends the context), got {ctx} < {seq}")
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if (mem_k is None) != (mem_v is None):
        raise ValueError("mem_k and mem_v must be given together")
    if mem_k is None:
        return
    retrieved = (batch, q_heads, seq)
    if mem_k.dim() == 5 and tuple(mem_k.shape[:3]) == retrieved and mem_k.shape[4] == dim:
        mask_shape = tuple(mem_k.shape[:4])
    elif mem_k.dim() == 4 and tuple(mem_k.shape[:2]) == (batch, kv_heads) and mem_k.shape[3] == dim:
        mask_shape = tuple(mem_k.shape[:3])
    else:
        raise ValueError(
            f"mem_k must be [batch={batch}, q_heads={q_heads}, seq={seq}, top_k, head_dim={dim}] (retrieved) or "
            f"[batch={batch}, kv_heads={kv_heads}, mem_len, head_dim={dim}] (shared), got {shape_of(mem_k)}"
        )
    if mem_v.shape != mem_k.shape:
        raise ValueError(f"mem_v must have mem_k's shape {shape_of(mem_k)}, got {shape_of(mem_v)}")
    for name, t in (("mem_k", mem_k), ("mem_v", mem_v)):
        if t.device != q.device or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor on {q.device}, got {t.dtype} on {t.device}")
    if mem_mask is not None and (mem_mask.dtype != torch.bool or tuple(mem_mask.shape) != mask_shape):
        raise ValueError(
            f"mem_mask must be a bool tensor of shape {list(mask_shape)}, got {mem_mask.dtype} {shape_of(mem_mask)}"
        )
    if fusion == "gate" and (not isinstance(gate, torch.Tensor) or tuple(gate.shape) != (q_heads,)):
        raise ValueError(f"fusion='gate' needs gate logits of shape [q_heads={q_heads}], got {shape_of(gate)}")
    if fusion == "gate" and (gate.device != q.device or not gate.is_floating_point()):
        raise ValueError(f"gate must be a floating-point tensor on {q.device}, got {gate.dtype} on {gate.device}")
