"""LongLoRA's shifted sparse attention, S2-Attn (Chen et al. 2023), leak-free by construction.

During long-context fine-tuning, attention runs inside groups of ``group_size`` tokens: the first half of the
query heads (``hq // 2``) in groups [0, G), [G, 2G), ...; the other half in groups whose boundaries are moved by
half a group: [0, G - G//2), [G - G//2, 2G - G//2), ..., so information flows between groups. Query i and key j of
a shifted head share a group iff (i + G//2) // G == (j + G//2) // G; attention is causal inside a group. The
halves are of the *query* heads, as in the official code (which repeats the key/value heads first): with an even
number of key/value heads each half reads its own; with an odd number (one, in multi-query attention) the heads
in the middle serve both halves, and the key/value heads are repeated to the query heads'.

The official code rolls the shifted heads' tokens by ceil(G/2) (its ``-group_size // 2``) and back, which wraps
the sequence's end to its start (the future leaks into the first group: LongLoRA issues #15, #90). Here nothing wraps:
the shifted heads' first group is the short [0, ceil(G/2)), then groups of G. Any n and any G >= 2 (odd G, G > n,
a short last group: ``group_size_ratio=1`` on an odd length is one group), grouped-query attention, a key padding
mask; every group is one row of a batched causal SDPA (flash attention where the backend has it), or, with a key
padding mask, of a masked ``attention_block`` ([groups, G, G] scores, never n x n).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .blocks import attention_block, check_block_args


def check_group_size(group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2 (the shifted heads move by half a group), got "
                         f"{group_size!r}")


def s2_mask(n: int, group_size: int, shifted: bool, device=None) -> torch.Tensor:
    """[n, n] bool: query i sees key j (True) in an unshifted or a shifted head."""
    offset = group_size // 2 if shifted else 0
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return (j <= i) & ((i + offset) // group_size == (j + offset) // group_size)


def grouped(q, k, v, visible, group_size: int, scale):
    """Causal attention inside consecutive groups of ``group_size`` tokens (the last may be short).

    q [b, hq, n, d], k, v [b, hkv, n, d]; visible: None or [b, n] bool key mask (True = real) -> out [b, hq, n, d].
    Without a key mask every group is one row of a batched causal SDPA (flash attention where the backend has it:
    memory O(n)); with one, a batched masked ``attention_block``.
    """
    batch, q_heads, n, dim = q.shape
    groups = -(-n // group_size)
    pad = groups * group_size - n  # the tail of the last group: later than every real query, so never seen

    def cut(t):  # [b, h, n, d] -> [b * groups, h, G, d]
        t = F.pad(t, (0, 0, 0, pad)).view(batch, t.shape[1], groups, group_size, dim)
        return t.transpose(1, 2).reshape(batch * groups, t.shape[1], group_size, dim)

    if visible is None:
        out = F.scaled_dot_product_attention(cut(q), cut(k), cut(v), is_causal=True, scale=scale,
                                             enable_gqa=q_heads != k.shape[1])
    else:
        real = F.pad(visible, (0, pad)).view(batch * groups, 1, 1, group_size)
        causal = torch.ones(group_size, group_size, dtype=torch.bool, device=q.device).tril()
        out, _ = attention_block(cut(q), cut(k), cut(v), mask=real & causal, scale=scale)
    out = out.view(batch, groups, q_heads, group_size, dim).transpose(1, 2).reshape(batch, q_heads, -1, dim)
    return out[:, :, :n]


def shifted_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int, causal: bool = True,
                             scale: float | None = None, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """S2-Attn: q [b, hq, n, d], k, v [b, hkv, n, d] (hq a multiple of hkv) -> out [b, hq, n, d].

    key_padding_mask: [b, n] bool or 0/1, True / 1 = a real token (padded keys are never attended).
    """
    check_block_args(q, k, v)
    if not causal:
        raise ValueError("shifted_sparse_attention is causal (LongLoRA fine-tunes causal language models)")
    batch, q_heads, n, _ = q.shape
    kv_heads = k.shape[1]
    if k.shape[2] != n:
        raise ValueError(f"shifted_sparse_attention is self-attention: {n} queries and {k.shape[2]} keys")
    check_group_size(group_size)
    if kv_heads % 2:  # a key/value head read by both halves: give each query head its own copy
        k, v = (t.repeat_interleave(q_heads // kv_heads, dim=1) for t in (k, v))
        kv_heads = q_heads
    visible = None
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, n):
            raise ValueError(f"key_padding_mask must be [batch, n] = {(batch, n)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        visible = key_padding_mask.to(q.device).bool()
    half_kv, half_q = kv_heads // 2, q_heads // 2  # query head h reads kv head h // (hq / hkv)
    shift = group_size - group_size // 2
    plain = grouped(q[:, :half_q], k[:, :half_kv], v[:, :half_kv], visible, group_size, scale)
    # the shifted heads: the short group [0, ceil(G/2)), then groups of G (nothing wraps around)
    q2, k2, v2 = q[:, half_q:], k[:, half_kv:], v[:, half_kv:]
    first = min(shift, n)
    parts = [grouped(q2[:, :, :first], k2[:, :, :first], v2[:, :, :first],
                     None if visible is None else visible[:, :first], first, scale)]
    if n > shift:
        parts.append(grouped(q2[:, :, shift:], k2[:, :, shift:], v2[:, :, shift:],
                             None if visible is None else visible[:, shift:], group_size, scale))
    return torch.cat((plain, torch.cat(parts, dim=2)), dim=1)


def shifted_sparse_attention_ref(q, k, v, group_size: int, scale: float | None = None) -> torch.Tensor:
    """The same attention as one masked softmax per half of the query heads over all keys (the test oracle):
    [b, hq, n, d]."""
    check_block_args(q, k, v)
    n, half_q = q.shape[2], q.shape[1] // 2
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    outs = [attention_block(q[:, :half_q], k[:, :half_q], v[:, :half_q], mask=s2_mask(n, group_size, False),
                            scale=scale)[0],
            attention_block(q[:, half_q:], k[:, half_q:], v[:, half_q:], mask=s2_mask(n, group_size, True),
                            scale=scale)[0]]
    return torch.cat(outs, dim=1)
