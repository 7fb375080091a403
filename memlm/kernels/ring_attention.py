"""Ring Attention (Liu, Zaharia & Abbeel 2023): exact attention over a sequence sharded across the ranks of a group.

Each of the N ranks of a ``torch.distributed`` group holds a shard of the queries, keys and values. The key/value
shards travel around the ring: at step s rank r holds the shard of rank (r - s) mod N, passes it on to rank r + 1
(``batch_isend_irecv``, overlapped with the compute) while it attends its queries over it, and merges the step's
block into its running (out, lse) with ``merge_blocks``: after N steps every query has seen every key, exactly.
Each step's block runs torch's fused attention with its lse (``flash_block``: CPU flash, CUDA memory-efficient SDPA),
so memory per rank is O(n / N); nothing of size n x n, or (n / N) x (n / N), exists anywhere.

Layouts (``ring_shard``): ``"zigzag"`` cuts the sequence into 2N chunks and gives rank r chunks r and 2N - 1 - r, so
under a causal mask every rank does the same work (Brandon et al. 2023, "Striped Attention", and ring-flash-attn's
zigzag): step 0 is the shard over itself, causal; at a later step the shard of an earlier rank is seen by all local
queries through its first chunk only, and the shard of a later rank by the local second chunk only, in full. Only
step 0 needs a mask. ``"contiguous"`` gives rank r chunk r of N (the layout of ``dilated_attention``'s shards);
causal work is then unbalanced (rank r skips the shards of later ranks).

Backward (a custom ``autograd.Function``): the ring once more, each key/value shard travelling with its dK/dV
accumulator (float32; float64 for float64 inputs). Every rank adds its queries' share, computed by flash attention's
backward with the *final* lse kept from the forward (so a block's probabilities are its part of the global softmax,
``flash_block.block_backward``); dQ stays local. The accumulator travels one hop more than the keys and arrives at
its owner. Grouped-query attention sends only the key/value heads. Any world size, odd ones included.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .blocks import check_block_args, merge_blocks
from .flash_block import block_backward, fused_forward

LAYOUTS = ("zigzag", "contiguous")
#: message tags: key/value shards and their gradient accumulators may be in flight between two ranks at once
KV_TAG, GRAD_TAG = 0, 1


def ring_shard(x: torch.Tensor, dim: int, rank: int, world_size: int, layout: str = "zigzag") -> torch.Tensor:
    """Rank ``rank``'s shard of ``x`` along ``dim`` (a copy): zigzag chunks (rank, 2N - 1 - rank) of 2N, or chunk
    ``rank`` of N (contiguous). ``x.shape[dim]`` must be a multiple of 2N (zigzag) or N."""
    chunks = check_layout(x, dim, world_size, layout)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    pieces = x.chunk(chunks, dim)
    if layout == "contiguous":
        return pieces[rank].clone()
    return torch.cat((pieces[rank], pieces[chunks - 1 - rank]), dim)


def ring_unshard(shards: list[torch.Tensor] | tuple[torch.Tensor, ...], dim: int,
                 layout: str = "zigzag") -> torch.Tensor:
    """The full tensor from every rank's shard (``shards[r]`` from rank r), the inverse of ``ring_shard``."""
    if not isinstance(shards, (list, tuple)) or not shards or not all(isinstance(s, torch.Tensor) for s in shards):
        raise ValueError("ring_unshard expects a non-empty list of every rank's shard (tensors)")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if any(s.shape != shards[0].shape for s in shards):
        raise ValueError(f"every rank's shard must have one shape, got {[list(s.shape) for s in shards]}")
    if layout == "contiguous":
        return torch.cat(list(shards), dim)
    if shards[0].shape[dim] % 2:
        raise ValueError(f"zigzag shards hold two equal chunks: a shard of {shards[0].shape[dim]} along dim {dim}")
    halves = [s.chunk(2, dim) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


def check_layout(x: torch.Tensor, dim: int, world_size: int, layout: str) -> int:
    """The number of chunks ``layout`` cuts a sequence into (2N or N); raises unless x's length is a multiple."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if not isinstance(x, torch.Tensor) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"expected a tensor with a dimension {dim}, got {getattr(x, 'shape', x)!r}")
    chunks = 2 * world_size if layout == "zigzag" else world_size
    if x.shape[dim] % chunks:
        raise ValueError(f"a {layout} ring of {world_size} ranks cuts the sequence into {chunks} equal chunks: its "
                         f"length {x.shape[dim]} along dim {dim} must be a multiple of {chunks} (pad it)")
    return chunks


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: dist.ProcessGroup | None = None,
                   causal: bool = True, scale: float | None = None, layout: str = "zigzag",
                   return_lse: bool = False, check_shapes: bool = True):
    """Attention of this rank's queries over the keys of every rank of ``group`` (default: the whole world).

    Args:
        q: [b, hq, n_local, d], this rank's shard (``ring_shard(..., layout=layout)``) of the queries.
        k, v: [b, hkv, n_local, d], the same shard of keys and values; hq a multiple of hkv.
        causal: query at global position i sees the keys at positions <= i.
        scale: score scale, default 1 / sqrt(d).
        check_shapes: check that every rank holds shards of one shape and dtype (one all_gather and a host sync);
            a caller that checked them once for many calls (a model's layers) passes False.
    Returns:
        out [b, hq, n_local, d] in q's dtype; with ``return_lse`` also lse [b, hq, n_local] (float32, float64 for
        float64), differentiable too, so the result merges with other blocks (e.g. memory).
    """
    check_block_args(q, k, v)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"ring attention is self-attention over shards: {q.shape[2]} queries, {k.shape[2]} keys "
                         "(no cache)")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    group = ring_group(group)
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"a zigzag shard holds two equal chunks: {q.shape[2]} local tokens is odd (the sequence "
                         "length must be a multiple of 2 x world size)")
    if check_shapes:
        check_same_shapes(q, k, group)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, lse = RingAttentionFunction.apply(q, k, v, group, causal, scale, layout)
    return (out, lse) if return_lse else out


def ring_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """``group``, or the whole world for None; raises unless torch.distributed is initialized."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("ring attention needs an initialized torch.distributed process group (run under torchrun "
                         "and call torch.distributed.init_process_group, or pass group=)")
    return dist.group.WORLD if group is None else group


def check_same_shapes(q: torch.Tensor, k: torch.Tensor, group, flag: bool = True) -> list[bool]:
    """Every rank must hold shards of one shape and dtype (a mismatch would hang or corrupt the ring). ``flag``: one
    more boolean each rank reports in the same collective (a caller's own check); returns every rank's."""
    world = dist.get_world_size(group)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    code = dtypes.index(q.dtype) if q.dtype in dtypes else len(dtypes)
    mine = torch.tensor([*q.shape, k.shape[1], code, int(flag)], device=q.device)
    shapes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(shapes, mine, group=group)
    if any(not torch.equal(s[:-1], mine[:-1]) for s in shapes):
        raise ValueError("every rank of the ring must hold q, k, v shards of one shape and dtype; got [batch, q_heads, "
                         f"n_local, head_dim, kv_heads, dtype] = {[s[:-1].tolist() for s in shapes]}")
    return [bool(s[-1]) for s in shapes]


def step_block(layout: str, causal: bool, rank: int, source: int, n_local: int):
    """What rank ``rank`` computes with the key/value shard of rank ``source``: (query slice, key slice, causal),
    or None when none of its queries sees those keys."""
    everything = slice(0, n_local)
    if not causal:
        return everything, everything, False
    if source == rank:
        return everything, everything, True
    if layout == "contiguous":
        return (everything, everything, False) if source < rank else None
    half = n_local // 2
    if source < rank:  # its first chunk precedes both of ours; its second follows both
        return everything, slice(0, half), False
    return slice(half, n_local), everything, False  # both of its chunks precede our second chunk only


class Ring:
    """Point-to-point passing along the ring of ``group``: send to rank + 1, receive from rank - 1."""

    def __init__(self, group) -> None:
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.previous = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def source(self, step: int) -> int:
        """The rank whose shard this rank holds at ``step``."""
        return (self.rank - step) % self.world

    def pass_on(self, tensor: torch.Tensor, tag: int):
        """Start sending ``tensor`` on and receiving the previous rank's; returns a function that waits for it."""
        received = torch.empty_like(tensor)
        requests = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor, self.next, self.group, tag),
            dist.P2POp(dist.irecv, received, self.previous, self.group, tag),
        ])

        def wait() -> torch.Tensor:
            for request in requests:
                request.wait()
            return received

        return wait


class RingAttentionFunction(torch.autograd.Function):
    """(out, lse) of ring attention; backward by a second ring that carries dK/dV home (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, layout):
        ring, n_local = Ring(group), q.shape[2]
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = q.new_zeros(q.shape, dtype=compute)
        lse = torch.full(q.shape[:3], -math.inf, dtype=compute, device=q.device)
        kv = torch.stack((k, v))  # one message per step: [2, b, hkv, n_local, d]
        for step in range(ring.world):
            arriving = ring.pass_on(kv, KV_TAG) if step + 1 < ring.world else None
            block = step_block(layout, causal, ring.rank, ring.source(step), n_local)
            if block is not None:
                rows, keys, block_causal = block
                part = fused_forward(q[:, :, rows], kv[0, :, :, keys], kv[1, :, :, keys], None, block_causal, scale)
                out[:, :, rows], lse[:, :, rows] = merge_blocks(out[:, :, rows], lse[:, :, rows], *part)
            if arriving is not None:
                kv = arriving()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.scale, ctx.layout = group, causal, scale, layout
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        ring, n_local = Ring(ctx.group), q.shape[2]
        d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
        d_lse = torch.zeros_like(lse) if d_lse is None else d_lse.contiguous()
        d_q = torch.zeros(q.shape, dtype=lse.dtype, device=q.device)
        kv = torch.stack((k, v))
        d_kv, arriving_grad = None, None
        for step in range(ring.world):
            arriving = ring.pass_on(kv, KV_TAG) if step + 1 < ring.world else None
            block = step_block(ctx.layout, ctx.causal, ring.rank, ring.source(step), n_local)
            grads = None
            if block is not None:
                rows, keys, block_causal = block
                grads = block_backward(q[:, :, rows], kv[0, :, :, keys], kv[1, :, :, keys], out[:, :, rows],
                                       lse[:, :, rows], d_out[:, :, rows], d_lse[:, :, rows], None, block_causal,
                                       ctx.scale)
            # the accumulator of the shard held now comes from the previous rank (which held it one step ago)
            d_kv = kv.new_zeros(kv.shape, dtype=lse.dtype) if arriving_grad is None else arriving_grad()
            if grads is not None:
                d_q[:, :, rows] += grads[0]
                d_kv[0, :, :, keys] += grads[1]
                d_kv[1, :, :, keys] += grads[2]
            arriving_grad = ring.pass_on(d_kv, GRAD_TAG) if ring.world > 1 else None
            if arriving is not None:
                kv = arriving()
        d_kv = arriving_grad() if arriving_grad is not None else d_kv  # one hop more: this rank's own accumulator
        return d_q.to(q.dtype), d_kv[0].to(k.dtype), d_kv[1].to(v.dtype), None, None, None, None
