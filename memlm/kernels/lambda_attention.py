"""LM-Infinite's Λ-shaped attention (Han et al. 2023) as two blocks of (out, lse).

Query i sees key j iff j <= i and (j < global_tokens or i - j < local_window): the first tokens of the
sequence (the "global branch", StreamingLLM's attention sinks) and a sliding local window. Computed as

* a local block: the queries cut into chunks of ``local_window``; chunk c attends to the 2 x window keys
  that end with it, under a banded mask, all chunks in one batched ``attention_block``;
* a global block: every query over the first ``global_tokens`` keys that lie *outside* its window;

merged with ``merge_blocks`` (disjoint key sets: exact). Time and memory O(n x (global + window)), never
n x n. ``lambda_attention_ref`` is the same attention as one masked softmax over all keys (the test oracle).

LM-Infinite's second ingredient, the distance cap: a pair farther apart than ``distance_cap`` scores as if
it were exactly ``distance_cap`` apart. The kernel does not know rotations; the caller passes ``capped_q``
(each query rotated to position ``distance_cap``) and ``capped_k`` (the global keys rotated to position 0),
and those pairs of the global block are scored with them: one more block, merged like the others. With
``distance_cap >= local_window`` (required) no pair of the local band is ever capped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .blocks import attention_block, check_block_args, merge_blocks


def _check(q, k, v, global_tokens, local_window) -> None:
    check_block_args(q, k, v)
    if k.shape[2] < q.shape[2]:
        raise ValueError(f"lambda_attention is self-attention: the queries are the last of the keys, got "
                         f"{q.shape[2]} queries and {k.shape[2]} keys")
    for name, value, low in (("global_tokens", global_tokens, 0), ("local_window", local_window, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def lambda_mask(n: int, global_tokens: int, local_window: int, device=None, keys: int | None = None) -> torch.Tensor:
    """[n, keys] bool: query i (the last n of ``keys`` positions, default n) sees key j (True) under the Λ pattern."""
    keys = n if keys is None else keys
    i = torch.arange(keys - n, keys, device=device)[:, None]
    j = torch.arange(keys, device=device)[None, :]
    return (j <= i) & ((j < global_tokens) | (i - j < local_window))


def lambda_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, global_tokens: int, local_window: int,
                         scale: float | None = None) -> torch.Tensor:
    """The Λ attention as one masked softmax: q [b, hq, n, d], k, v [b, hkv, m >= n, d] -> [b, hq, n, d]."""
    _check(q, k, v, global_tokens, local_window)
    mask = lambda_mask(q.shape[2], global_tokens, local_window, q.device, keys=k.shape[2])
    return attention_block(q, k, v, mask=mask, scale=scale)[0]


def lambda_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, global_tokens: int, local_window: int,
                     scale: float | None = None, distance_cap: int | None = None, capped_q: torch.Tensor | None = None,
                     capped_k: torch.Tensor | None = None) -> torch.Tensor:
    """Λ attention: q [b, hq, n, d], k, v [b, hkv, m, d] (rotated; hq a multiple of hkv) -> out [b, hq, n, d].

    m = n for a whole sequence; m > n when decoding with a cache: the queries are the last n of the m positions.
    distance_cap: pairs with i - j >= distance_cap score ``capped_q[i] . capped_k[j]``; capped_q [b, hq, n, d]
    (queries rotated to position distance_cap), capped_k [b, hkv, min(global_tokens, m), d] (global keys at 0).
    """
    _check(q, k, v, global_tokens, local_window)
    if distance_cap is not None:
        if not isinstance(distance_cap, int) or isinstance(distance_cap, bool) or distance_cap < local_window:
            raise ValueError(f"distance_cap must be an integer >= local_window ({local_window}), got {distance_cap!r}")
        first = min(global_tokens, k.shape[2])
        if capped_q is None or capped_q.shape != q.shape or capped_k is None or capped_k.shape != (
                *k.shape[:2], first, k.shape[3]):
            raise ValueError(f"distance_cap needs capped_q shaped like q {tuple(q.shape)} and capped_k "
                             f"{(*k.shape[:2], first, k.shape[3])} (the global keys)")
    n, m = q.shape[2], k.shape[2]
    if n == m:
        out, lse = _local_block(q, k, v, local_window, scale)
    else:  # decoding: chunks of at most a window of queries, each over the keys its window reaches
        blocks = [_local_block_of(q[:, :, c: c + local_window], k, v, m - n + c, local_window, scale)
                  for c in range(0, n, local_window)]
        out, lse = (torch.cat(parts, dim=2) for parts in zip(*blocks, strict=True))
    first = min(global_tokens, m)
    if first:  # the global keys outside each query's window: j < first and j <= i - window
        i = torch.arange(m - n, m, device=q.device)[:, None]
        j = torch.arange(first, device=q.device)[None, :]
        outside = j <= i - local_window
        capped = outside & (i - j >= distance_cap) if distance_cap is not None else torch.zeros_like(outside)
        near = outside & ~capped
        if bool(near.any()):
            out, lse = merge_blocks(out, lse, *attention_block(q, k[:, :, :first], v[:, :, :first], mask=near,
                                                               scale=scale))
        if bool(capped.any()):
            out, lse = merge_blocks(out, lse, *attention_block(capped_q, capped_k, v[:, :, :first], mask=capped,
                                                               scale=scale))
    return out


def _local_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local_window: int,
                 scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The local band of a whole sequence, q, k, v [b, h, n, d], in chunks of a window: (out [b, hq, n, d], lse)."""
    batch, q_heads, n, head_dim = q.shape
    kv_heads, window = k.shape[1], min(local_window, n)
    chunks = -(-n // window)
    length = chunks * window
    # keys padded by a window on the left (chunk 0's predecessors) and to whole chunks on the right
    pad = (0, 0, window, length - n)
    k_padded, v_padded = F.pad(k, pad), F.pad(v, pad)
    # chunk c's queries [cW, (c+1)W) and its keys [(c-1)W, (c+1)W): [b * chunks, heads, W or 2W, d]
    q_chunks = F.pad(q, (0, 0, 0, length - n)).view(batch, q_heads, chunks, window, head_dim)
    q_chunks = q_chunks.transpose(1, 2).reshape(batch * chunks, q_heads, window, head_dim)

    def keys(t: torch.Tensor) -> torch.Tensor:
        windows = t.unfold(2, 2 * window, window)  # [b, hkv, chunks, d, 2W]
        return windows.permute(0, 2, 1, 4, 3).reshape(batch * chunks, kv_heads, 2 * window, head_dim)

    r = torch.arange(window, device=q.device)[:, None]  # query offset in its chunk
    t = torch.arange(2 * window, device=q.device)[None, :]  # key offset in the chunk's keys
    band = (t > r) & (t <= r + window)  # j <= i and i - j < W
    start = torch.arange(chunks, device=q.device)[:, None, None] * window - window  # document position of t = 0
    real = (start + t >= 0) & (start + t < n)  # no padding
    mask = (band & real)[None].expand(batch, -1, -1, -1).reshape(batch * chunks, 1, window, 2 * window)
    out, lse = attention_block(q_chunks, keys(k_padded), keys(v_padded), mask=mask, scale=scale)
    out = out.view(batch, chunks, q_heads, window, head_dim).transpose(1, 2).reshape(batch, q_heads, length, head_dim)
    lse = lse.view(batch, chunks, q_heads, window).transpose(1, 2).reshape(batch, q_heads, length)
    return out[:, :, :n], lse[:, :, :n]


def _local_block_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int, local_window: int,
                    scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The local band of queries q [b, hq, c, d] at positions offset .. offset + c - 1 over k, v [b, hkv, m, d]:
    each sees the keys j <= i with i - j < window (out [b, hq, c, d], lse [b, hq, c])."""
    start = max(0, offset - local_window + 1)
    i = torch.arange(offset, offset + q.shape[2], device=q.device)[:, None]
    j = torch.arange(start, offset + q.shape[2], device=q.device)[None, :]
    band = (j <= i) & (i - j < local_window)
    end = offset + q.shape[2]
    return attention_block(q, k[:, :, start:end], v[:, :, start:end], mask=band, scale=scale)
