"""LongNet's dilated attention (Ding et al. 2023, "LongNet: Scaling Transformers to 1,000,000,000 Tokens").

Dense attention is replaced by a mixture of sparse patterns. For each pattern (segment length w, dilation rate r)
the sequence is cut into segments [s, s + w) with s a multiple of w; in head h, the positions p of a segment with
(p - s) mod r == h mod r form one sparse segment, and its tokens attend causally among themselves. A query outside a
pattern gets nothing from it (lse -inf). The patterns' outputs mix with weights softmax over patterns of their lse:
that is ``merge_blocks`` of the patterns' blocks, so a key found by two patterns counts twice, as in the paper.

Per pattern, every sparse segment of every head is one row of a batched attention ([segments, heads, w/r, d]): the
cost is O(n w / r) per pattern, linear in n, and no n x n tensor exists. Grouped-query attention selects, for each
key/value head, only the offsets its query heads read (the keys are repeated only where a group's query heads split
unevenly over the offsets). Each pattern is one ``flash_block`` (torch's fused attention forward, a chunked backward
that recomputes the probabilities): memory O(n) in training too, and exact gradients through the mixing weights.

Distributed LongNet (``group=``): each rank holds a contiguous shard of the sequence. A pattern whose segments fit in
a shard runs locally; a longer one all-gathers only its dilated keys and values (the paper's ``gather_kv``, with
backward through ``torch.distributed.nn.functional.all_gather``), and each query attends to those of its segment.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .blocks import attention_block, check_block_args, merge_blocks
from .flash_block import flash_block


def check_patterns(segment_lengths, dilation_rates) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate LongNet's patterns; returns them as tuples of ints."""
    lengths, rates = tuple(segment_lengths), tuple(dilation_rates)
    if not lengths or len(lengths) != len(rates):
        raise ValueError(f"segment_lengths and dilation_rates must be non-empty and of equal length (one (w, r) per "
                         f"pattern), got {len(lengths)} and {len(rates)}")
    for name, values in (("segment_lengths", lengths), ("dilation_rates", rates)):
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in values):
            raise ValueError(f"{name} must be positive integers, got {values!r}")
    return lengths, rates


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths, dilation_rates,
                      causal: bool = True, scale: float | None = None, group=None) -> torch.Tensor:
    """LongNet attention: q [b, hq, nq, d], k, v [b, hkv, n, d] -> out [b, hq, nq, d].

    The queries are the last nq of the n positions (nq < n: decoding with a cache; causal only). ``group``: None,
    q, k, v hold the whole sequence; a process group, they hold this rank's contiguous shard (nq == n on every rank).
    """
    check_block_args(q, k, v)
    lengths, rates = check_patterns(segment_lengths, dilation_rates)
    if not causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"non-causal dilated attention is self-attention: {q.shape[2]} queries, {k.shape[2]} keys")
    if group is not None:
        blocks = iter(sharded_blocks(q, k, v, lengths, rates, causal, scale, group))
    else:  # one pattern at a time, merged as it comes: only one pattern's rows exist at once
        blocks = (pattern_block(q, k, v, w, r, causal, scale) for w, r in zip(lengths, rates, strict=True))
    out, lse = next(blocks)
    for block in blocks:
        out, lse = merge_blocks(out, lse, *block)
    return out


def pattern_block(q, k, v, w: int, r: int, causal: bool, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """One pattern (w, r) as a block: out [b, hq, nq, d], lse [b, hq, nq] (-inf for queries outside it)."""
    nq, n = q.shape[2], k.shape[2]
    w = min(w, n)  # a segment longer than the sequence is the whole sequence
    start = (n - nq) // w * w  # the first segment that holds a query; earlier ones are never read
    if n - nq > start:
        q = F.pad(q, (0, 0, n - nq - start, 0))  # queries aligned with k[start:] (the padding is cut off below)
    k, v = k[:, :, start:], v[:, :, start:]
    length = n - start
    segments, per_head = -(-length // w), -(-w // r)
    query_rows, key_rows = pattern_rows(q.shape[1], k.shape[1], r, q.device)
    qs, ks, vs = (sparse(x, w, r, segments, per_head, rows) for x, rows in ((q, query_rows), (k, key_rows),
                                                                            (v, key_rows)))
    visible = None
    if not causal:  # padded keys (past the segment's or the sequence's end) come after every query only if causal
        within = torch.arange(per_head, device=q.device)[None, :] * r + (query_rows % r)[:, None]  # [hq, w/r]
        position = torch.arange(segments, device=q.device)[:, None, None] * w + within  # [S, hq, w/r]
        visible = ((within < w) & (position < length)).repeat(q.shape[0], 1, 1)[:, :, None, :]  # [b*S, hq, 1, w/r]
    out, lse = flash_block(qs, ks, vs, visible, causal, scale)
    return tuple(scatter(x, query_rows, q.shape[0], q.shape[1], r, w, length)[:, :, -nq:] for x in (out, lse))


def pattern_rows(q_heads: int, kv_heads: int, r: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows (head * r + offset) of the queries and of the keys/values one pattern's attention reads.

    Query head h reads kv head h // (q_heads // kv_heads), both at offset h mod r. Where every (kv head, offset) in
    use serves the same number of query heads, each is kept once and the query rows are sorted by it (so the
    attention is grouped-query); else each query head gets its own copy of its keys.
    """
    heads = torch.arange(q_heads, device=device)
    wanted = heads // (q_heads // kv_heads) * r + heads % r
    used, counts = torch.unique(wanted, return_counts=True)
    if bool((counts == counts[0]).all()):
        heads = torch.argsort(wanted, stable=True)
        return heads * r + heads % r, used
    return heads * r + heads % r, wanted


def sparse(x: torch.Tensor, w: int, r: int, segments: int, per_head: int, rows: torch.Tensor) -> torch.Tensor:
    """[b, h, L, d] -> [b * segments, len(rows), w/r, d]: row h * r + o of segment s holds head h's positions
    s * w + o, s * w + o + r, ... (0 past the segment's or the sequence's end)."""
    batch, heads, length, dim = x.shape
    if segments * w != length:
        x = F.pad(x, (0, 0, 0, segments * w - length))
    x = x.reshape(batch, heads, segments, w, dim)
    if per_head * r != w:
        x = F.pad(x, (0, 0, 0, per_head * r - w))
    x = x.reshape(batch, heads, segments, per_head, r, dim).permute(0, 2, 1, 4, 3, 5)  # [b, S, h, r, w/r, d]
    x = x.reshape(batch * segments, heads * r, per_head, dim)
    whole = rows.numel() == heads * r and bool((rows == torch.arange(heads * r, device=rows.device)).all())
    return x if whole else x.index_select(1, rows)  # (index_select: advanced indexing of a view costs 8x its size)


def scatter(x: torch.Tensor, rows: torch.Tensor, batch: int, heads: int, r: int, w: int, length: int) -> torch.Tensor:
    """The inverse of ``sparse`` for a block's out [b * S, len(rows), w/r, d] or lse [b * S, len(rows), w/r]:
    -> [b, heads, length(, d)], 0 (out) or -inf (lse) at the positions outside each head's pattern."""
    segments, per_head, tail = x.shape[0] // batch, x.shape[2], x.shape[3:]
    full = x.new_full((x.shape[0], heads * r, per_head, *tail), -torch.inf if not tail else 0.0)
    full = full.index_copy(1, rows, x).view(batch, segments, heads, r, per_head, *tail)
    full = full.transpose(3, 4).reshape(batch, segments, heads, per_head * r, *tail)[:, :, :, :w]
    return full.transpose(1, 2).reshape(batch, heads, segments * w, *tail)[:, :, :length]


def sharded_blocks(q, k, v, lengths, rates, causal: bool, scale, group) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The patterns' blocks for this rank's contiguous shard q, k, v [b, h, n_local, d] of a sequence over ``group``."""
    n_local = q.shape[2]
    if k.shape[2] != n_local:
        raise ValueError(f"distributed dilated attention is self-attention over shards: {n_local} queries, "
                         f"{k.shape[2]} keys (no cache)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    mine = torch.tensor([*k.shape[:2], n_local, q.shape[1]], device=q.device)  # NCCL gathers CUDA tensors only
    shapes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(shapes, mine, group=group)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        raise ValueError(f"every rank must hold a shard of the same shape [batch, kv_heads, n_local, ...] and "
                         f"q_heads; got {[s.tolist() for s in shapes]}")
    n = n_local * world
    local, spanning = [], []
    for w, r in zip(lengths, rates, strict=True):
        w = min(w, n)
        if n_local % w == 0:  # every segment inside one shard
            local.append(pattern_block(q, k, v, w, r, causal, scale))
        elif w % n_local == 0 and n_local % r == 0:
            spanning.append(DilatedShard(q, k, v, w // n_local, r))
        else:
            raise ValueError(f"pattern (w={w}, r={r}) does not fit shards of {n_local} tokens: a segment length must "
                             f"divide the shard length or be a multiple of it (and then the shard length a multiple "
                             f"of the dilation rate)")
    if not spanning:
        return local
    # one all_gather for all long patterns: every rank then runs the same collectives in the same order in backward
    # (one per call), and every rank uses the gathered tensor (its own part at least), so none skips the backward
    flat = torch.cat([t.flatten() for shard in spanning for t in (shard.keys, shard.values)])
    gathered = dist.nn.functional.all_gather(flat, group=group)
    sizes = [t.numel() for shard in spanning for t in (shard.keys, shard.values)]
    pieces = [torch.split(part, sizes) for part in gathered]  # [rank][pattern * 2 + (0 keys, 1 values)]
    for i, shard in enumerate(spanning):
        keys = [piece[2 * i].view_as(shard.keys) for piece in pieces]
        values = [piece[2 * i + 1].view_as(shard.values) for piece in pieces]
        local.append(shard.block(keys, values, rank, causal, scale))
    return local


class DilatedShard:
    """A pattern whose segments span ``ranks`` shards, on one rank: its dilated queries, keys and values
    ([b, rows, n_local / r, d]), and its block once every rank's dilated keys/values are gathered."""

    def __init__(self, q, k, v, ranks: int, r: int) -> None:
        self.ranks, self.r, self.batch, self.heads, self.n_local = ranks, r, q.shape[0], q.shape[1], q.shape[2]
        self.query_rows, key_rows = pattern_rows(q.shape[1], k.shape[1], r, q.device)
        per_head = self.n_local // r
        self.queries = sparse(q, self.n_local, r, 1, per_head, self.query_rows)
        self.keys = sparse(k, self.n_local, r, 1, per_head, key_rows)
        self.values = sparse(v, self.n_local, r, 1, per_head, key_rows)

    def block(self, keys: list, values: list, rank: int, causal: bool, scale) -> tuple[torch.Tensor, torch.Tensor]:
        first = rank // self.ranks * self.ranks  # the first shard of this rank's segment
        if causal:  # the earlier shards of the segment in full, this one causally: two blocks, merged
            out, lse = flash_block(self.queries, keys[rank], values[rank], None, True, scale)
            if rank > first:
                earlier = flash_block(self.queries, torch.cat(keys[first:rank], 2), torch.cat(values[first:rank], 2),
                                      None, False, scale)
                out, lse = merge_blocks(out, lse, *earlier)
        else:
            span = slice(first, first + self.ranks)
            out, lse = flash_block(self.queries, torch.cat(keys[span], 2), torch.cat(values[span], 2), None, False,
                                   scale)
        return tuple(scatter(x, self.query_rows, self.batch, self.heads, self.r, self.n_local, self.n_local)
                     for x in (out, lse))


def dilated_attention_ref(q, k, v, segment_lengths, dilation_rates, causal: bool = True, scale=None) -> torch.Tensor:
    """The same attention as one masked block per pattern over all keys (the test oracle; n x n): [b, hq, n, d]."""
    check_block_args(q, k, v)
    lengths, rates = check_patterns(segment_lengths, dilation_rates)
    n = k.shape[2]
    position = torch.arange(n, device=q.device)
    head = torch.arange(q.shape[1], device=q.device)[:, None]
    out = lse = None
    for w, r in zip(lengths, rates, strict=True):
        member = (position % w % r)[None, :] == (head % r)  # [hq, n]
        same = (position[:, None] // w) == (position[None, :] // w)
        visible = same[None] & member[:, :, None] & member[:, None, :]  # [hq, n, n]
        if causal:
            visible &= position[None, :, None] >= position[None, None, :]
        block = attention_block(q, k, v, mask=visible[None, :, -q.shape[2]:], scale=scale)
        out, lse = block if out is None else merge_blocks(out, lse, *block)
    return out
