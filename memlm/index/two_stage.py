"""Two-stage exact top-k: screen every key in bfloat16, re-score the few that can still win exactly.

The exact search (``torch_index.py``) is bound by float32 matmul and by reading its score matrix back. Modern
hardware multiplies bfloat16 several times faster (AMX / AVX512-BF16 on CPUs, tensor cores on GPUs), so:

1. **Screen** (``screen``: the keys in bfloat16, kept beside the stored keys), one pass over the memory. Each
   row's keys are scored against its bfloat16 queries in blocks of ``block`` slots into one reused buffer (no
   score matrix over the whole memory ever exists), and each block is reduced at once to the maxima of groups of
   ``GROUP`` slots.
2. **Threshold**, running: ``theta``, the ``k``-th largest group maximum of each query over the blocks seen so
   far. The ``k`` groups above it hold ``k`` distinct entries whose screened score is at least ``theta``, so
   ``theta`` only rises from block to block and each value is valid for the whole search.
3. **Collect**: in each block, while its scores are at hand, every entry whose screened score ``L`` is at least
   ``threshold(theta) = theta - 2e`` (roughly; ``e`` bounds ``|L - R|`` for the float32 re-score ``R``, below)
   survives; only the members of groups whose maximum clears it are read. The last, tightest threshold filters
   the survivors of earlier blocks again.
4. **Re-score** the survivors exactly from the stored keys (``exact_scores``: the products summed in float64, rounded
   once); their top-k by that score is the answer, equal scores lower slot first (``rank_survivors``). Both screens
   rank alike, entry for entry; the one-stage search's float32 sums may order two entries whose exact scores tie to
   float32 rounding otherwise.

One pass, not two (an earlier version found ``theta`` over every block first and scored the memory again to
collect): the second matmul cost more than the extra survivors of early blocks' lower thresholds (~3k per query
instead of ~k on random keys).

Why it is exact (the margin argument). With ``|L - R| <= e`` for every entry, the ``k`` entries with
``L >= theta`` have ``R >= theta - e``, so the ``k``-th largest ``R`` overall is at least ``theta - e``. An entry
of the true top-k has ``R`` at least that, so its ``L >= R - e >= theta - 2e``: it survives step 3, in its own
block, since every ``theta`` of the pass certifies ``k`` entries. The survivors hold the whole top-k, which step 4
ranks exactly (the bound holds for the exact score as for a float32 one: ``e`` covers the float32 re-score's own
error too). The bound used is sharper than one ``e`` for all entries:

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

Two screens compute steps 1-3. ``torch_screen`` is plain torch (any device; what CUDA runs). It takes group maxima
as an integer max over the bfloat16 bits (3x faster than a bfloat16 max on CPUs): the result is one of the group's
members, so never above its maximum, and exactly the maximum where that is positive (positive floats order as
their bits do, negative ones in reverse); where a threshold is not positive the block's true maxima are taken.
``screen.cpp`` is the same pass fused for CPUs (each block swept once while in cache, theta kept in a heap per
query, no per-block torch calls), built on first use by torch's extension builder; where it cannot be built (no
C++ compiler) the torch screen runs. Both return the same survivors' superset of the answer; step 4 is shared.

When it gives up. The search returns ``None`` (the caller runs the one-stage search) when a bound or
threshold is not finite (keys or queries beyond bfloat16's range), when a row holds fewer than ``k * GROUP``
entries (one stage is cheap there), or when more than ``candidate_limit`` entries per query survive on average
(near ties wider than ``2e``: many keys of almost equal score).
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import torch

from .workspace import Workspace

GROUP = 16  # slots per group (the screens' reduction, and the one-stage grouped top-k of torch_index.py)
UNIT_ROUNDOFF = 2.0**-8  # bfloat16: 8 significant bits


def gamma(dim: int) -> float:
    """``γ_d``: the relative error bound of a float32 sum of ``dim`` products."""
    return dim * 2.0**-24 / (1 - dim * 2.0**-24)


def exact_scores(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """keys, queries [..., dim] -> [...] float32: each inner product summed in float64 (every product of two
    float32 numbers is exact there) and rounded once. Both screens rank their survivors by it, so that they agree
    entry for entry: float32 sums in different orders differ in their last bits."""
    return (keys.double() * queries.double()).sum(-1).float()


def rank_survivors(owner: torch.Tensor, slot: torch.Tensor, exact: torch.Tensor, k: int,
                   queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's k best of a flat list of survivors: owner (the query, in 0 .. queries - 1), slot, exact score,
    [total] each, every query owning at least k. By score, equal scores lower slot first (two stable sorts).
    Returns scores, slots [queries, k]. Sorted, not padded: one query's many survivors cost no memory for others."""
    by_slot = torch.argsort(slot, stable=True)
    order = by_slot[torch.argsort((owner * 2**32 + descending_key(exact))[by_slot], stable=True)]
    counts = torch.bincount(owner, minlength=queries)
    first = counts.cumsum(0) - counts  # where each query's survivors start
    pick = order[first.unsqueeze(1) + torch.arange(k, device=owner.device)]
    return exact[pick], slot[pick]


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


def margin(queries: torch.Tensor, low: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """The bound ``a`` [rows, q] on ``|ŝ - R|`` (module docstring) for float32 queries [rows, q, dim], their
    bfloat16 rounding and the rows' key bounds [rows, 2]."""
    rounded = low.float()
    norm, residual = (bounds[:, i : i + 1] for i in range(2))  # [rows, 1] K, D
    slack = 1 + 1e-3
    return slack * (rounded.norm(dim=-1) * residual + (rounded - queries).norm(dim=-1) * norm
                    + 3 * gamma(queries.shape[-1]) * queries.norm(dim=-1) * norm)


#: screen.cpp: the scores of a block after the first stay within this (a core's L2 cache on current CPUs)
NATIVE_CACHE_BYTES = 512 * 2**10
#: ``v`` of the module docstring, with the same slack
ROUNDING = (1 + 1e-3) * UNIT_ROUNDOFF / (1 - UNIT_ROUNDOFF)


def threshold_of(theta: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The screened score an entry needs to be in the top-k, given ``k`` entries screened at least ``theta``."""
    reach = theta - a - ROUNDING * theta.abs() - a  # P - a
    return torch.where(reach >= 0, reach / (1 + ROUNDING), reach / (1 - ROUNDING))


@functools.cache
def native_screen():
    """``screen.cpp`` compiled (once per machine: torch keeps the build), or None where it cannot be built."""
    capability = torch.backends.cpu.get_cpu_capability()  # the vector width the build may assume
    flags = {"AVX512": ["-mavx512f", "-mavx512bw"], "AVX2": ["-mavx2", "-mfma"]}.get(capability, [])
    threads = ["-fopenmp"] if torch.backends.openmp.is_available() else []  # at::parallel_for is OpenMP inline
    try:
        from torch.utils.cpp_extension import load

        return load(name=f"memlm_screen_{capability.lower()}", sources=[str(Path(__file__).with_name("screen.cpp"))],
                    extra_cflags=["-O3", *flags, *threads], extra_ldflags=threads)
    except Exception as error:  # a missing compiler or ninja, a failed build: the torch screen is as exact
        warnings.warn(f"memlm: the compiled two-stage screen could not be built, using the torch one ({error})",
                      stacklevel=2)
        return None


def compiled_screen(device: torch.device):
    """``native_screen()`` where ``device`` is a CPU (the compiled screen's only device), else None."""
    return native_screen() if device.type == "cpu" else None


def running_top(maxima: torch.Tensor, best: torch.Tensor | None, k: int) -> torch.Tensor:
    """The ``k`` largest [k, q] of a block's group maxima [groups, q] and the ``best`` of earlier blocks, after
    coarsening the block's to at least ``4k`` groups (any partition into disjoint groups gives a valid theta;
    coarser ones cost less to rank)."""
    groups, q = maxima.shape
    factor = next((f for f in (8, 4, 2) if groups % f == 0 and groups // f >= 4 * k), 1)
    coarse = maxima.view(factor, groups // factor, q).amax(dim=0) if factor > 1 else maxima
    return (coarse if best is None else torch.cat((best, coarse))).topk(k, dim=0).values


def torch_screen(screen: torch.Tensor, low_t: torch.Tensor, a: torch.Tensor, sizes: torch.Tensor, k: int, *,
                 slots: int, block: int, candidate_limit: int, workspace: Workspace):
    """Steps 1-3 in torch: the survivors as (row * allocated + slot, row * q + query) int64 [T] each, or None
    where the screen gives up. Arguments as ``two_stage_topk``'s, ``low_t`` [rows, dim, q] the bfloat16 queries
    transposed, ``a`` [rows, q] their ``margin``."""
    rows, allocated, _ = screen.shape
    q = low_t.shape[2]
    device = low_t.device
    scores = workspace.get("screened scores", (min(block, slots) * q,), torch.bfloat16, device)
    limit = candidate_limit * q  # survivors allowed per row
    found = []
    for row in range(rows):
        size, best, survivors, count = int(sizes[row]), None, [], 0
        for start in range(0, min(slots, size), block):
            n = min(block, slots - start)
            out = torch.mm(screen[row, start : start + n], low_t[row], out=scores[: n * q].view(n, q))
            if start + n > size:
                out[size - start :] = -math.inf  # dead slots
            # group j holds the block's slots j, j + width, ...: a max over them is one vectorised pass
            width = n // GROUP
            maxima = torch.amax(out.view(torch.int16).view(GROUP, width, q), dim=0,
                                out=workspace.get("maxima", (width, q), torch.int16, device)).view(torch.bfloat16)
            top = running_top(maxima, best, k)
            threshold = threshold_of(top[-1].float(), a[row])  # [q]
            if not bool((threshold > 0).all()):  # the integer maxima may undershoot: take the true ones
                maxima = torch.amax(out.view(GROUP, width, q), dim=0)
                top = running_top(maxima, best, k)
                threshold = threshold_of(top[-1].float(), a[row])
            if not bool(torch.isfinite(threshold).all()):
                return None  # a screened score overflowed
            best = top
            flagged = torch.nonzero((maxima >= threshold).view(-1)).squeeze(1)  # group * q + query, ascending
            # Only the GROUP members of flagged groups are compared (member-major: each member's reads run
            # forward through the block). A survivor is carried as its offset in the block, slot * q + query.
            members = flagged + (torch.arange(GROUP, device=device) * (width * q)).unsqueeze(1)  # [GROUP, T]
            screened = out.take(members)
            alive = screened >= threshold[flagged % q]
            offsets = members[alive]
            survivors.append((start + offsets // q, offsets % q, screened[alive]))
            count += offsets.numel()
            if count > limit:
                return None  # near ties: let the one-stage search rank them
        slot, query, screened = (torch.cat(parts) for parts in zip(*survivors, strict=True))
        keep = screened >= threshold[query]  # the last threshold is the tightest
        found.append((row * allocated + slot[keep], row * q + query[keep]))
    return tuple(torch.cat(parts) for parts in zip(*found, strict=True))


def two_stage_topk(screen: torch.Tensor, keys: torch.Tensor, bounds: torch.Tensor, queries: torch.Tensor,
                   sizes: torch.Tensor, k: int, *, slots: int, block: int, candidate_limit: int,
                   workspace: Workspace, native: bool = True,
                   native_bytes: int = 32 * 2**20) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The exact top-k by float32 inner product, or None where it cannot be certified cheaply.

    screen:   [rows, allocated, dim] bfloat16 copy of the keys.
    keys:     [rows, allocated, dim] the stored keys (float32, float16 or bfloat16).
    bounds:   [rows, 2] the largest key norm ``K`` and rounding residual ``D`` of each row (``key_bounds``).
    queries:  [rows, q, dim] float32.
    sizes:    [rows] live slots per row (slots ``0 .. size-1``).
    slots:    slots to scan (a multiple of ``GROUP``, at least every size).
    block:    slots scored per block (a multiple of ``GROUP``; at least ``k * GROUP`` are).
    candidate_limit: the mean survivors per query beyond which the search gives up.
    workspace: where the score block, the group maxima and the survivors' keys and queries live between calls.
    native:   screen with ``screen.cpp`` where the tensors are on the CPU and it could be built.
    native_bytes: the compiled screen's score blocks, all threads together (its first blocks are at most
              ``block`` slots, and smaller where the threads' shares of this are).
    Returns scores [rows, q, k] float32 (``exact_scores``) and slots [rows, q, k] long, best first, equal scores
    lower slot first.
    """
    rows, allocated, dim = screen.shape
    q = queries.shape[1]
    device = queries.device
    if int(sizes.min()) < k * GROUP:
        return None
    block = max(block, k * GROUP)  # the first block alone holds k groups with a live entry: theta is finite
    low = queries.to(torch.bfloat16)
    low_t = low.transpose(1, 2).contiguous()  # [rows, dim, q]: keys @ queries^T streams the keys once per block
    a = margin(queries, low, bounds)
    if not bool(torch.isfinite(a).all()):
        return None  # keys or queries beyond bfloat16's range
    compiled = compiled_screen(device) if native else None
    if compiled is not None:
        # all threads' blocks within native_bytes (each thread's first block gets its share of it), but never
        # less than a first block of k groups each
        scratch = max(native_bytes // 2, torch.get_num_threads() * k * GROUP * q)
        scores, slots, gave_up = compiled.screened_topk(
            screen.contiguous(), keys.contiguous(), low_t, queries.contiguous(), a, sizes.long(), ROUNDING, k, slots,
            min(block, slots), NATIVE_CACHE_BYTES, candidate_limit,
            workspace.get("screened scores", (scratch,), torch.bfloat16, device),
            workspace.get("compiled screen's maxima", (scratch // GROUP,), torch.float32, device))
        return None if gave_up else (scores, slots)
    found = torch_screen(screen, low_t, a, sizes, k, slots=slots, block=block, candidate_limit=candidate_limit,
                         workspace=workspace)
    if found is None:
        return None
    flat_slot, owner = found
    slot = flat_slot % allocated

    # Re-score the survivors exactly and keep each query's k best (every query has at least k survivors: the
    # k entries above theta).
    total = owner.numel()
    stored = torch.index_select(keys.reshape(-1, dim), 0, flat_slot,
                                out=workspace.get("survivors' keys", (total, dim), keys.dtype, device))
    asked = torch.index_select(queries.reshape(-1, dim), 0, owner,
                               out=workspace.get("survivors' queries", (total, dim), torch.float32, device))
    scores, slots = rank_survivors(owner, slot, exact_scores(stored, asked), k, rows * q)
    return scores.view(rows, q, k), slots.view(rows, q, k)
