"""Attention as blocks of (out, lse), and their exact merge: the one algebra every memlm attention uses.

A *block* is the attention of some queries over one set of keys: the normalised output
``out [b, hq, n, d]`` and the log of its softmax denominator ``lse [b, hq, n]``. Two blocks over
disjoint key sets merge exactly into the block over their union (Milakov & Gimelshein 2018, "Online
normalizer calculation for softmax"; flash attention's inner loop):

    lse = logaddexp(lse_a, lse_b);  out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

That merge is Focused Transformer's joint softmax (local + memory), Ring Attention's ring step,
LongNet's mixing of dilation patterns and a learned attention sink (a block with ``out = 0``).

Precision: scores, softmax and lse are float32 for 16/32-bit inputs and float64 for float64 inputs;
``out`` comes back in the dtype of ``q``. Grouped-query attention groups the query heads of each
key/value head (``[b, hkv, group, n, d]``); keys are never repeated in memory.
"""

from __future__ import annotations

import math

import torch


def attention_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q over k, v as a block.

    Args:
        q: [batch, q_heads, n, head_dim]; q_heads a multiple of kv_heads (query head h reads kv head
            h // (q_heads // kv_heads)).
        k, v: [batch, kv_heads, ctx, head_dim].
        mask: bool, True = visible, broadcastable to [batch, q_heads, n, ctx]; None = all visible.
        causal: query i also sees only keys 0 .. ctx - n + i (the queries are the last n keys).
        scale: score scale, default 1 / sqrt(head_dim).
        softcap: Gemma-2 logit soft-capping, ``softcap * tanh(scores / softcap)``, before masking.
        dropout: probability of dropping an attention weight (training); lse is the undropped one, so
            dropped blocks still merge exactly.

    Returns:
        out [batch, q_heads, n, head_dim] in q's dtype (0 where a query sees no key) and
        lse [batch, q_heads, n] (-inf where a query sees no key).
    """
    check_block_args(q, k, v)
    batch, q_heads, n, head_dim = q.shape
    kv_heads, ctx = k.shape[1], k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    grouped_q = q.to(compute).view(batch, kv_heads, q_heads // kv_heads, n, head_dim)
    scores = grouped_q @ k.to(compute).unsqueeze(2).transpose(-1, -2) * scale  # [b, hkv, g, n, ctx]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    visible = causal_mask(n, ctx, device=q.device) if causal else None
    if mask is not None:
        mask = grouped_mask(mask, batch, kv_heads, q_heads, n, ctx)
        visible = mask if visible is None else visible & mask
    probs, lse = softmax_with_lse(scores, visible)
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = probs @ v.to(compute).unsqueeze(2)
    return out.flatten(1, 2).to(q.dtype), lse.flatten(1, 2)


def softmax_with_lse(scores: torch.Tensor, visible: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim of the visible scores (0 where none is visible) and its log-sum-exp (-inf there).

    Without a graph to keep, it works in place on ``scores`` (a score matrix is the largest tensor of an
    attention; each pass over it costs as much as a matrix product here).
    """
    inplace = not (torch.is_grad_enabled() and scores.requires_grad)
    if visible is not None:
        scores = scores.masked_fill_(~visible, -math.inf) if inplace else scores.masked_fill(~visible, -math.inf)
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)  # rows that see nothing: exp(-inf - 0) = 0
    probs = scores.sub_(top).exp_() if inplace else (scores - top).exp()
    total = probs.sum(dim=-1, keepdim=True)
    probs = probs.div_(total.clamp_min(1e-38)) if inplace else probs / total.clamp_min(1e-38)
    return probs, (top + total.log()).squeeze(-1)


def attention_output(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``attention_block(...)[0]`` where the lse is not needed: the same attention by ``scaled_dot_product_attention``
    (its fused kernels: twice as fast as the block on this CPU). Arguments and shapes as ``attention_block``."""
    check_block_args(q, k, v)
    n, ctx = q.shape[2], k.shape[2]
    square_causal = causal and n == ctx and mask is None  # SDPA's is_causal: no mask to build
    visible = causal_mask(n, ctx, device=q.device) if causal and not square_causal else None
    if mask is not None:
        visible = mask if visible is None else visible & mask
    bias = None if visible is None else additive_mask(visible, q.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=square_causal, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.nan_to_num(0.0) if visible is not None else out  # a query that sees no key gets 0, as in a block


def merge_blocks(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block over the union of two disjoint key sets: out [b, hq, n, d] (out_a's dtype), lse [b, hq, n].

    A query that saw no key in one block (lse -inf) keeps the other's result; in neither: out 0, lse -inf.
    """
    seen_a, seen_b = torch.isfinite(lse_a), torch.isfinite(lse_b)
    # -inf (no key) enters the arithmetic as a finite floor: the same values, and gradients through a query that
    # saw nothing stay 0 instead of NaN (exp(-inf - -inf)); LongNet queries outside a pattern meet this every step
    floor = torch.finfo(lse_a.dtype).min / 2
    lse_a, lse_b = torch.where(seen_a, lse_a, floor), torch.where(seen_b, lse_b, floor)
    lse = torch.logaddexp(lse_a, lse_b)
    seen = (seen_a | seen_b).unsqueeze(-1)
    compute = lse.dtype
    out = (lse_a - lse).exp().unsqueeze(-1) * out_a.to(compute) + (lse_b - lse).exp().unsqueeze(-1) * out_b.to(compute)
    out, lse = torch.where(seen, out, 0.0), torch.where(seen.squeeze(-1), lse, -math.inf)
    return out.to(out_a.dtype), lse


def sink_block(sinks: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A learned attention sink (gpt-oss's ``s_aux``: one logit per query head, no value) as a block.

    sinks: [q_heads]; like: a block's out [b, hq, n, d]. Returns out zeros like it and lse [b, hq, n] = sinks.
    """
    compute = torch.float64 if like.dtype == torch.float64 else torch.float32
    lse = sinks.detach().to(like.device, compute) if not sinks.requires_grad else sinks.to(like.device, compute)
    return torch.zeros_like(like), lse.view(1, -1, 1).expand(like.shape[0], -1, like.shape[2])


def causal_mask(n: int, ctx: int, window: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """[n, ctx] bool: query i (the queries are the last n of ctx keys) sees keys j <= ctx - n + i and, with a
    sliding ``window``, only the ``window`` latest of them (j > ctx - n + i - window)."""
    rows = torch.arange(n, device=device).unsqueeze(1) + (ctx - n)
    cols = torch.arange(ctx, device=device).unsqueeze(0)
    visible = cols <= rows
    if window is not None:
        visible &= cols > rows - window
    return visible


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = visible) as the additive float mask eager attention adds to its scores (0 / -inf); SDPA's
    CPU kernel also takes its fast path with it, not with a bool one."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, -math.inf)


def grouped_mask(mask: torch.Tensor, batch: int, kv_heads: int, q_heads: int, n: int, ctx: int) -> torch.Tensor:
    """A mask broadcastable to [b, hq, n, ctx] as a view broadcastable to [b, hkv, group, n, ctx]."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = visible), got {mask.dtype}")
    try:
        mask = mask.expand(batch, q_heads, n, ctx) if mask.dim() < 4 or mask.shape[1] != 1 else mask
    except RuntimeError as error:
        raise ValueError(f"mask of shape {list(mask.shape)} does not broadcast to [batch={batch}, q_heads={q_heads}, "
                         f"n={n}, ctx={ctx}]") from error
    if mask.shape[1] == 1:
        return mask.unsqueeze(1)
    return mask.reshape(mask.shape[0], kv_heads, q_heads // kv_heads, n, ctx)


def check_block_args(q, k, v) -> None:
    """Raise a ValueError/TypeError that says what was expected when q, k, v do not fit one another."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [batch, heads, seq, head_dim], got {shape_of(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: all inputs must share one device")
    batch, q_heads, _, dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(
            f"k and v must both be [batch={batch}, kv_heads, ctx, head_dim={dim}], got {shape_of(k)} and {shape_of(v)}"
        )
    if q_heads % k.shape[1]:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({k.shape[1]})")


def shape_of(t: object) -> str:
    """A tensor's shape as a list, or the repr of something that is not a tensor (for error messages)."""
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else repr(t)
