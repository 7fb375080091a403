"""Two-stage exact top-k: screen every key in bfloat16, re-score the few that can still win in float32.

The exact search (``torch_index.py``) is bound by float32 matmul and by reading its score matrix back. Modern
hardware multiplies bfloat16 several times faster (AMX / AVX512-BF16 on CPUs, tensor cores on GPUs), so:

1. **Screen** (``screen``: the keys in bfloat16, kept beside the stored keys). Keys are scored against the
   bfloat16 queries in blocks of ``block`` slots; a block's scores stay in one small reused buffer (it fits in
   cache: no score matrix over the whole memory ever exists). Each block is reduced at once to the maxima of
   strided groups of ``GROUP`` slots (an elementwise max of slices, the one reduction as fast as the matmul).
2. **Threshold**: the ``k``-th largest group maximum ``theta`` of each query. The ``k`` groups above it hold
   ``k`` distinct entries whose screened score is at least ``theta``.
3. **Collect**: a second pass over the blocks keeps every entry whose screened score ``L`` is at least
   ``theta - 2e``, where ``e`` bounds ``|L - R|`` for the float32 re-score ``R`` of any entry (below).
4. **Re-score** the survivors in float32 from the stored keys; their top-k by ``R`` is the answer.

Why it is exact (the margin argument). With ``|L - R| <= e`` for every entry, the ``k`` entries with
``L >= theta`` have ``R >= theta - e``, so the ``k``-th largest ``R`` overall is at least ``theta - e``. An entry
of the true top-k has ``R`` at least that, so its ``L >= R - e >= theta - 2e``: it survives step 3. The
survivors hold the whole float32 top-k, which step 4 ranks by the same float32 products the one-stage search
computes (up to float32 rounding of the sum order). The bound used is sharper than one ``e`` for all entries:

The bound. Write ``q^``, ``k^`` for the bfloat16 roundings (unit roundoff ``u = 2**-8``). The product moves by
``|q^.k^ - q.k| <= |q^| |k^ - k| + |q^ - q| |k|``; accumulating ``d`` products in float32 and the float32
re-score each add at most ``γ_d |q| |k|`` (``γ_d = d 2**-24 / (1 - d 2**-24)``), so with the head's largest key
norm ``K`` and largest rounding residual ``D = max |k^ - k|`` (both kept per slot), ``|ŝ - R| <= a`` with
``a = |q^| D + |q^ - q| K + 3 γ_d |q| K`` for the float32 result ``ŝ`` of the screen's matmul. Rounding ``ŝ`` to
bfloat16 adds ``u |ŝ| <= v |L|`` with ``v = u / (1 - u)``. So ``|L - R| <= a + v |L|``, and since ``x - v|x|`` and
``x + v|x|`` increase with ``x``: the ``k`` entries above ``theta`` have ``R >= P = theta - a - v |theta|``, hence
so does the whole true top-k, and each of its entries has ``L + a + v|L| >= P``, i.e. ``L >= threshold`` with
``threshold = (P - a) / (1 + v)`` (``/ (1 - v)`` where ``P - a < 0``). Computed with a relative slack of 1e-3.
This holds for float32 accumulation: oneDNN / AMX on CPUs, cuBLAS with
``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False`` (``TorchIndex`` checks it).

When it gives up. The search returns ``None`` (the caller runs the one-stage search) when a bound or
threshold is not finite (keys or queries beyond bfloat16's range) or when more than ``candidate_limit``
entries per query survive on average (near ties wider than ``2e``: many keys of almost equal score).
"""

from __future__ import annotations

import math

import torch

from .workspace import Workspace

GROUP = 16  # slots per strided group (the screen's reduction, and the one-stage grouped top-k of torch_index.py)
UNIT_ROUNDOFF = 2.0**-8  # bfloat16: 8 significant bits


def gamma(dim: int) -> float:
    """``γ_d``: the relative error bound of a float32 sum of ``dim`` products."""
    return dim * 2.0**-24 / (1 - dim * 2.0**-24)


def key_bounds(keys: torch.Tensor, screen: torch.Tensor) -> torch.Tensor:
    """Stored keys and their bfloat16 copy [..., dim] -> [..., 2] float32: each key's norm and the norm of its
    rounding residual."""
    keys = keys.float()
    return torch.stack((keys.norm(dim=-1), (screen.float() - keys).norm(dim=-1)), dim=-1)


def descending_key(scores: torch.Tensor) -> torch.Tensor:
    """float32 [n] -> int64 [n] in [0, 2**32), smaller for larger scores (the IEEE bits made monotonic: negative
    floats have their other bits flipped), so that one integer sort orders by (group, score descending)."""
    bits = scores.contiguous().view(torch.int32).long()
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31  # increases with the score
    return 2**32 - 1 - ordered


def two_stage_topk(screen: torch.Tensor, keys: torch.Tensor, bounds: torch.Tensor, queries: torch.Tensor,
                   sizes: torch.Tensor, k: int, *, slots: int, block: int, candidate_limit: int,
                   workspace: Workspace) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The exact top-k by float32 inner product, or None where it cannot be certified cheaply.

    screen:   [rows, allocated, dim] bfloat16 copy of the keys.
    keys:     [rows, allocated, dim] the stored keys (float32, float16 or bfloat16).
    bounds:   [rows, 2] the largest key norm ``K`` and rounding residual ``D`` of each row (``key_bounds``).
    queries:  [rows, q, dim] float32.
    sizes:    [rows] live slots per row (slots ``0 .. size-1``).
    slots:    slots to scan (a multiple of ``GROUP``, at least every size).
    block:    slots scored per block (a multiple of ``GROUP``).
    candidate_limit: the mean survivors per query beyond which the search gives up.
    workspace: where the score block, the group maxima and the survivors' keys and queries live between calls.
    Returns scores [rows, q, k] float32 and slots [rows, q, k] long, best first. None also where fewer than
    ``k`` groups of some row hold a live entry (a nearly empty row: the one-stage search is cheap there).
    """
    rows, allocated, dim = screen.shape
    q = queries.shape[1]
    device = queries.device
    low = queries.to(torch.bfloat16)
    low_t = low.transpose(1, 2).contiguous()  # [rows, dim, q]: keys @ queries^T streams the keys once per block
    rounded = low.float()
    norm, residual = (bounds[:, i : i + 1] for i in range(2))  # [rows, 1] K, D
    slack = 1 + 1e-3
    a = slack * (rounded.norm(dim=-1) * residual + (rounded - queries).norm(dim=-1) * norm
                 + 3 * gamma(dim) * queries.norm(dim=-1) * norm)  # [rows, q]
    v = slack * UNIT_ROUNDOFF / (1 - UNIT_ROUNDOFF)
    scores = workspace.get("screened scores", (rows * block * q,), torch.bfloat16, device)
    starts = range(0, slots, block)
    all_live = int(sizes.min())  # slots below it are live in every row

    def scored(start: int) -> torch.Tensor:
        """Screened scores [rows, n, q] of slots start .. start+n-1; dead slots -inf."""
        n = min(block, slots - start)
        out = torch.bmm(screen[:, start : start + n], low_t, out=scores[: rows * n * q].view(rows, n, q))
        if start + n > all_live:
            dead = (start + torch.arange(n, device=device)).unsqueeze(0) >= sizes.unsqueeze(1)  # [rows, n]
            out.masked_fill_(dead.unsqueeze(-1), -math.inf)
        return out

    # Pass 1: group maxima of every block (kept for pass 2: 1/GROUP of the scores, group j of a block holds its
    # slots j, j + n/GROUP, ...), then each query's k-th largest one. The maxima are reduced once more before
    # ranking: any partition into disjoint groups gives a valid threshold, and coarser groups cost less to rank.
    maxima_buffer = workspace.get("maxima", (rows * (slots // GROUP) * q,), torch.bfloat16, device)
    maxima, used = [], 0
    for start in starts:
        out = scored(start)
        width = out.shape[1] // GROUP
        groups = maxima_buffer[used : used + rows * width * q].view(rows, width, q)
        maxima.append(torch.amax(out.view(rows, GROUP, width, q), dim=1, out=groups))
        used += groups.numel()
    # the coarsest grouping that still leaves 4k groups (enough for the k-th largest to stay a tight threshold)
    factor = next((f for f in (16, 8, 4, 2) if slots // (GROUP * f) >= 4 * k), 1)
    coarse = torch.cat([m.view(rows, factor, -1, q).amax(dim=1) if m.shape[1] % factor == 0 else m for m in maxima],
                       dim=1)
    if coarse.shape[1] < k:
        return None
    theta = coarse.topk(k, dim=1).values[:, -1].float()  # [rows, q]
    reach = theta - a - v * theta.abs() - a  # P - a
    threshold = torch.where(reach >= 0, reach / (1 + v), reach / (1 - v)).unsqueeze(1)  # [rows, 1, q], float32
    if not bool(torch.isfinite(threshold).all()):
        return None  # a nearly empty row, or a bound or a screened score overflowed
    flags = [groups >= threshold for groups in maxima]  # [rows, width, q]: groups that may hold a survivor
    if sum(int(f.sum()) for f in flags) > candidate_limit * rows * q:
        return None  # near ties: each flagged group holds a survivor at least; give up before the second pass

    # Pass 2: the survivors. Groups whose maximum clears the threshold are found on the kept maxima; only their
    # GROUP members are compared (a gather of GROUP x T scores from the block, member-major so that each member's
    # reads run forward through the block, not a pass over it). A survivor is carried as its flat offset in the
    # block's scores, (row * n + slot) * q + query, decoded once at the end.
    flat_threshold = threshold.reshape(-1)  # [rows * q]
    survivors, found = [], 0
    for start, flag in zip(starts, flags, strict=True):
        out = scored(start)
        n = out.shape[1]
        width = n // GROUP
        flagged = torch.nonzero(flag.view(-1)).squeeze(1)  # (row * width + group) * q + query, ascending
        row, query = flagged // (width * q), flagged % q
        first = flagged + row * (n - width) * q  # member 0 of the group: (row * n + group) * q + query
        members = first + (torch.arange(GROUP, device=device) * (width * q)).unsqueeze(1)  # [GROUP, T]
        alive = out.take(members) >= flat_threshold[row * q + query]
        offsets = members[alive]
        survivors.append((start, n, offsets))
        found += offsets.numel()
        if found > candidate_limit * rows * q:
            return None  # near ties: let the one-stage search rank them
    row, slot, query = (torch.cat(parts) for parts in zip(*[
        (offsets // (n * q), start + offsets // q % n, offsets % q) for start, n, offsets in survivors], strict=True))

    # Re-score the survivors in float32 and keep each query's k best (every query has at least k survivors: the
    # k entries above theta). Sorted, not padded: one query's near ties cost no memory for others.
    owner = row * q + query  # [T]
    total = owner.numel()
    stored = torch.index_select(keys.reshape(-1, dim), 0, row * allocated + slot,
                                out=workspace.get("survivors' keys", (total, dim), keys.dtype, device))
    if stored.dtype != torch.float32:
        stored = workspace.get("survivors' keys in float32", (total, dim), torch.float32, device).copy_(stored)
    asked = torch.index_select(queries.reshape(-1, dim), 0, owner,
                               out=workspace.get("survivors' queries", (total, dim), torch.float32, device))
    exact = torch.bmm(stored.unsqueeze(1), asked.unsqueeze(2)).view(total)  # each survivor's float32 product
    order = torch.argsort(owner * 2**32 + descending_key(exact))  # by query, best first within each
    counts = torch.bincount(owner, minlength=rows * q)
    first = counts.cumsum(0) - counts  # [rows * q]: where each query's survivors start
    pick = order[first.unsqueeze(1) + torch.arange(k, device=device)]  # [rows * q, k]
    return exact[pick].view(rows, q, k), slot[pick].view(rows, q, k)
