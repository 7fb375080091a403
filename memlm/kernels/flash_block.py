"""``attention_block`` at the speed of torch's fused attention, differentiable in both outputs: ``flash_block``.

Methods that mix attention blocks by their softmax denominators (LongNet's patterns, Ring Attention's ring steps)
need each block's lse *with its gradient*: the mixing weights depend on it. ``scaled_dot_product_attention`` returns
no lse, and the kernels that compute one (flash attention, Dao et al. 2022) give it no gradient. ``flash_block``
runs the forward with torch's fused attention kernels that return the lse (memory O(n), no score matrix):

* CPU (float32, float64, bfloat16, float16): ``aten::_scaled_dot_product_flash_attention_for_cpu`` (the lse in
  float32 for the half types);
* CUDA (float16, bfloat16, float32; no mask, or the causal one): ``aten::_scaled_dot_product_efficient_attention``
  (xFormers' memory-efficient attention, the one torch's own context parallelism runs its ring with);

and ``attention_block`` elsewhere (float64 on CUDA, masks on CUDA, other devices). Its backward is flash
attention's (P recomputed from the saved lse) with the lse's own gradient term:

    dS = P * (dP - rowsum(dO * O) + dlse),  dQ = scale dS K,  dK = scale dS^T Q,  dV = P^T dO,

by the same kernels' backward (the dlse term carried in one more head-dim column, ``fused_backward``) or in pure
torch in chunks of at most ``BLOCK_SCORES`` scores (``reference_backward``, the same equations; on CPU for bfloat16
and float16 too, in float32, where the fused backward would carry dlse and return the gradients rounded to the half
type). Memory stays O(n)
in training too. Grouped-query attention reads kv head h // (hq / hkv); keys are never repeated on CPU (the CUDA
kernel wants as many key/value heads as query heads: they are repeated there, and their gradients summed).
"""

from __future__ import annotations

import math

import torch

from .blocks import additive_mask, attention_block, check_block_args, merge_blocks

#: the most score elements the pure-torch backward computes at once (16 MiB in float32)
BLOCK_SCORES = 1 << 22
#: head-dim columns the CUDA backward adds for the lse's gradient (the kernel wants multiples of 8)
WIDEN = 8


def flash_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                causal: bool = False, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_block(q, k, v, mask, causal, scale)``: out [b, hq, n, d] (q's dtype), lse [b, hq, n] (float32,
    float64 for float64; -inf where a query sees no key). ``causal`` needs as many queries as keys."""
    check_block_args(q, k, v)
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"flash_block's causal mask is square: {q.shape[2]} queries, {k.shape[2]} keys (split the "
                         "keys into a full block and a causal one and merge them)")
    if mask is not None:  # [b, hq, n or 1, ctx] as an expanded view: a key mask is never copied per query
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool (True = visible), got {mask.dtype}")
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
        try:
            mask = mask.expand(q.shape[0], q.shape[1], mask.shape[2], k.shape[2])
        except RuntimeError as error:
            raise ValueError(f"mask of shape {list(mask.shape)} does not broadcast to [batch, q_heads, n, ctx] = "
                             f"{[q.shape[0], q.shape[1], q.shape[2], k.shape[2]]}") from error
        if mask.shape[2] not in (1, q.shape[2]):
            raise ValueError(f"mask has {mask.shape[2]} query rows for {q.shape[2]} queries")
    return FlashBlock.apply(q, k, v, mask, causal, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)


def cuda_kernels(q: torch.Tensor, mask: torch.Tensor | None):
    """torch's memory-efficient attention forward and backward ops for ``q`` on CUDA, or None."""
    if q.device.type != "cuda" or mask is not None or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    return (torch.ops.aten._scaled_dot_product_efficient_attention,
            torch.ops.aten._scaled_dot_product_efficient_attention_backward)


def cpu_kernels(q: torch.Tensor):
    """torch's CPU flash attention forward and backward ops for ``q``'s device and dtype (the backward None for
    bfloat16 and float16: ``reference_backward`` runs theirs), or None."""
    forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if (forward is None or backward is None or q.device.type != "cpu"
            or q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16)):
        return None
    return forward, backward if q.dtype in (torch.float32, torch.float64) else None


def fused_forward(q, k, v, mask, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward pass, without a graph: torch's fused kernels where they exist, else ``attention_block``."""
    if cuda_kernels(q, mask) is not None:
        return cuda_forward(q, k, v, causal, scale)
    kernels = cpu_kernels(q)
    if kernels is None:
        return attention_block(q, k, v, mask, causal, scale)
    bias = None if mask is None else additive_mask(mask, q.dtype)
    out, lse = kernels[0](q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
    if mask is not None:  # a query that sees no key: out 0, lse -inf (the kernel leaves NaN / +-inf there)
        if not causal:
            seen = mask.any(-1)
        elif mask.shape[2] == 1:  # query i sees a key iff one of keys 0..i is visible
            seen = mask.squeeze(2).cummax(-1).values
        else:
            seen = (mask & torch.ones(mask.shape[-2:], dtype=torch.bool, device=q.device).tril()).any(-1)
        out, lse = torch.where(seen[..., None], out, 0.0), torch.where(seen, lse, -math.inf)
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def cuda_forward(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory-efficient attention on CUDA: out [b, hq, n, d] (q's dtype), lse [b, hq, n] float32."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (k, v))
    out, lse, _, _ = cuda_kernels(q, None)[0](q, k, v, None, True, 0.0, causal, scale=scale)
    return out, lse[..., : q.shape[2]].float()  # the kernel pads the lse to whole tiles of 32 queries


def cuda_backward(q, k, v, out, lse, d_out, d_lse, causal: bool, scale: float):
    """dq, dk, dv (float32) by the memory-efficient backward on CUDA, dlse carried as in ``fused_backward`` in
    eight more head-dim columns (the kernel's alignment), key/value heads repeated and their gradients summed."""
    q_heads, n = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    group = q_heads // kv_heads

    def widen(t, column=None):  # [..., d] -> [..., d + 8]: ``column`` in the first new column, zeros after
        extra = t.new_zeros(*t.shape[:-1], WIDEN)
        if column is not None:
            extra[..., 0] = column
        return torch.cat((t, extra), dim=-1)

    k, v = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (k, v))
    tiles = -(-n // 32) * 32  # the lse as the forward kernel lays it out: whole tiles, +inf past the end (P = 0)
    lse = torch.nn.functional.pad(lse.float(), (0, tiles - n), value=math.inf).contiguous()
    unused = torch.zeros((), dtype=torch.long, device=q.device)  # the dropout RNG state: no dropout here
    dq, dk, dv, _ = cuda_kernels(q, None)[1](
        widen(d_out.to(q.dtype), -d_lse.to(q.dtype)), widen(q), widen(k), widen(v), None,
        widen(out.to(q.dtype), 1.0), lse, unused, unused, 0.0, [True, True, True, False], causal, scale=scale)
    dq, dk, dv = (t[..., :-WIDEN].float() for t in (dq, dk, dv))
    if group > 1:
        dk, dv = (t.unflatten(1, (kv_heads, group)).sum(2) for t in (dk, dv))
    return dq, dk, dv


def fused_backward(kernels, q, k, v, out, lse, d_out, d_lse, mask, causal: bool, scale: float):
    """dq, dk, dv by torch's CPU flash backward, the lse's gradient riding in one more head-dim column: with
    q' = [q, 0], k' = [k, 0], v' = [v, 0], out' = [out, 1], dO' = [dO, -dlse] the kernel's rowsum(dO' * out') is
    rowsum(dO * out) - dlse, so its dS = P * (dP - rowsum(dO * out) + dlse), the scores and dP unchanged."""
    def widen(t, column):
        return torch.cat((t, column.to(t.dtype).expand(*t.shape[:-1], 1)), dim=-1)

    zero = q.new_zeros(())
    bias = None if mask is None else additive_mask(mask, q.dtype)
    safe_lse = torch.where(torch.isfinite(lse), lse, math.inf).to(q.dtype)  # rows that saw nothing: P = 0
    dq, dk, dv = kernels[1](widen(d_out, -d_lse[..., None]), widen(q, zero), widen(k, zero), widen(v, zero),
                            widen(out, q.new_ones(())), safe_lse, 0.0, causal, attn_mask=bias, scale=scale)
    return dq[..., :-1], dk[..., :-1], dv[..., :-1]


class FlashBlock(torch.autograd.Function):
    """out, lse = attention of q over k, v; backward recomputes P in chunks (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale):
        out, lse = fused_forward(q, k, v, mask, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.causal, ctx.scale = mask, causal, scale
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        d_out = torch.zeros_like(out) if d_out is None else d_out
        d_lse = torch.zeros_like(lse) if d_lse is None else d_lse
        dq, dk, dv = block_backward(q, k, v, out, lse, d_out, d_lse, ctx.mask, ctx.causal, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def block_backward(q, k, v, out, lse, d_out, d_lse, mask, causal: bool, scale: float):
    """dq, dk, dv of a block in the compute dtype (float32; float64 for float64), given its out and lse.

    Given the out and lse of a *larger* attention that this block is part of (a ring step, a dilation pattern)
    instead of the block's own, it returns this block's share of that attention's gradients: P is recomputed
    from the final lse, so it is the block's part of the final softmax (the identity Ring Attention relies on).
    """
    if cuda_kernels(q, mask) is not None:
        return cuda_backward(q, k, v, out, lse, d_out, d_lse, causal, scale)
    kernels = cpu_kernels(q)
    args = (q, k, v, out, lse, d_out, d_lse, mask, causal, scale)
    fused = kernels is not None and kernels[1] is not None
    return fused_backward(kernels, *args) if fused else reference_backward(*args)


def reference_backward(q, k, v, out, lse, d_out, d_lse, mask, causal: bool, scale: float):
    """dq, dk, dv in pure torch (any device), in the compute dtype: flash attention's backward, P recomputed from
    lse in chunks."""
    compute = lse.dtype
    batch, q_heads, n, dim = q.shape
    kv_heads, keys_total = k.shape[1], k.shape[2]
    group = q_heads // kv_heads

    def grouped(t):  # [b, hq, n, ...] -> [b, hkv, g, n, ...] in the compute dtype
        return t.to(compute).unflatten(1, (kv_heads, group))

    qg, og = grouped(q), grouped(out)
    d_out, d_lse = grouped(d_out), grouped(d_lse)
    lse_safe = grouped(torch.where(torch.isfinite(lse), lse, math.inf))  # rows that saw nothing: P = 0
    k32, v32 = k.to(compute).unsqueeze(2), v.to(compute).unsqueeze(2)  # [b, hkv, 1, ctx, d]
    delta = (d_out * og).sum(-1) - d_lse  # [b, hkv, g, n]
    dq = torch.zeros_like(qg)
    dk = torch.zeros(batch, kv_heads, keys_total, dim, dtype=compute, device=q.device)
    dv = torch.zeros_like(dk)
    step = max(1, BLOCK_SCORES // max(1, batch * q_heads * keys_total))
    for a in range(0, n, step):
        e = min(a + step, n)
        keys = e if causal else keys_total  # causal (square): queries [a, e) read keys [0, e)
        scores = qg[:, :, :, a:e] @ k32[..., :keys, :].transpose(-1, -2) * scale  # [b, hkv, g, e-a, keys]
        visible = None
        if causal:
            visible = torch.ones(e - a, keys, dtype=torch.bool, device=q.device).tril(a)
        if mask is not None:  # [b, hq, n or 1, ctx] -> [b, hkv, g, e - a or 1, keys]
            part = mask.unflatten(1, (kv_heads, group))
            part = part[..., a:e, :keys] if part.shape[-2] > 1 else part[..., :keys]
            visible = part if visible is None else visible & part
        if visible is not None:
            scores = scores.masked_fill_(~visible, -math.inf)
        probs = (scores - lse_safe[:, :, :, a:e, None]).exp_()
        d_probs = d_out[:, :, :, a:e] @ v32[..., :keys, :].transpose(-1, -2)
        d_scores = probs * (d_probs - delta[:, :, :, a:e, None]) * scale
        dq[:, :, :, a:e] = d_scores @ k32[..., :keys, :]
        dk[:, :, :keys] += (d_scores.transpose(-1, -2) @ qg[:, :, :, a:e]).sum(2)
        dv[:, :, :keys] += (probs.transpose(-1, -2) @ d_out[:, :, :, a:e]).sum(2)
    return dq.flatten(1, 2), dk, dv


def joint_memory_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor,
                           mem_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """``memory_attention_ref(..., fusion="joint", causal=True)`` with shared memory, from ``flash_block``s.

    One softmax over [memory ; local context] is the merge of three blocks: the memory mem_k, mem_v [b, hkv, m, d]
    (mem_mask [b, hkv, m], False = absent), the local keys before the segment (seen whole) and the segment's
    own keys (a square causal block), q [b, hq, n, d] being the last n of the ctx local keys k, v [b, hkv, ctx, d].
    The same result without a score matrix: on CPU torch's flash kernel computes each block ~2.5x faster than
    ``attention_block``. Returns [b, hq, n, d] in q's dtype.
    """
    n, ctx = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    mask = None if mem_mask is None else mem_mask.repeat_interleave(group, dim=1)[:, :, None]  # [b, hq, 1, m]
    out, lse = flash_block(q, mem_k.to(q.dtype), mem_v.to(q.dtype), mask, scale=scale)
    if ctx > n:
        out, lse = merge_blocks(out, lse, *flash_block(q, k[:, :, : ctx - n], v[:, :, : ctx - n], scale=scale))
    return merge_blocks(out, lse, *flash_block(q, k[:, :, ctx - n :], v[:, :, ctx - n :], causal=True,
                                              scale=scale))[0]
