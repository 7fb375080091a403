"""The exact kNN memory in plain torch: ring-buffer keys and values, batched matmul + top-k.

Searching 65K keys per head is dominated by two costs, and both are avoided here:

* Allocating a fresh [heads, q, capacity] score tensor for every search costs more than the
  matmul itself (page faults). Queries are scored in blocks of ``search_block_queries`` into one
  buffer that the index keeps between searches, as keys @ queries^T so that BLAS streams the key
  matrix instead of repacking it for every block (1.3x faster than queries @ keys^T at 12 heads x
  65K keys on a 2-core CPU).
* ``topk`` over every score is as slow again as the matmul. Slots are split into ``GROUP`` strided
  groups (group j = slots j, j + G, j + 2G, ...; a max over them is one vectorised pass), the k
  groups with the largest maxima are picked, and top-k runs over their k * GROUP members only.
  That is exact: a group holding one of the true top-k entries has a maximum at least as large as
  that entry, and each group ranked above it holds a different, larger entry, so at most k - 1
  groups can rank above it.

Works on any device torch supports, in float32, float16 and bfloat16 storage; scores are float32.
"""

from __future__ import annotations

import math

import torch

from .ring import RingIndex

GROUP = 16


class TorchIndex(RingIndex):
    """Exact FIFO kNN memory on the tensors' own device (see the module docstring)."""

    backend = "torch"
    slot_multiple = GROUP
    #: queries scored per block (BLAS is fastest with a few dozen), and the score buffer's upper bound
    search_block_queries = 64
    search_block_bytes = 256 * 2**20

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._scores: torch.Tensor | None = None  # the search's score buffer, kept between searches

    def _topk(self, queries: torch.Tensor, k: int, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, q, dim = queries.shape
        slots = math.ceil(max(sizes) / GROUP) * GROUP  # allocated storage is a multiple of GROUP
        keys = self._keys.data[:, :, :slots].float().reshape(batch * heads, slots, dim)  # no copy for float32
        queries_t = queries.reshape(batch * heads, q, dim).transpose(1, 2)  # [bh, dim, q]
        block = max(1, min(q, self.search_block_queries, self.search_block_bytes // (4 * batch * heads * slots)))
        buffer = self._score_buffer(batch * heads * slots * block, queries.device)
        out_scores = torch.empty(batch * heads, q, k, device=queries.device)
        out_slots = torch.empty(batch * heads, q, k, dtype=torch.long, device=queries.device)
        grouped = slots // GROUP > 4 * k  # below that, grouping saves nothing
        for start in range(0, q, block):
            n = min(block, q - start)
            # keys @ queries^T: BLAS streams the large key matrix once per block and packs only the queries.
            scores = buffer[: batch * heads * slots * n].view(batch * heads, slots, n)
            torch.bmm(keys, queries_t[:, :, start : start + n], out=scores)
            per_row = scores.view(batch, heads, slots, n)
            for row, size in enumerate(sizes):
                if size < slots:
                    per_row[row, :, size:] = -math.inf
            if grouped:
                best, best_slots = self._grouped_topk(scores, k)
            else:
                best, best_slots = scores.topk(k, dim=1)
            out_scores[:, start : start + n] = best.transpose(1, 2)
            out_slots[:, start : start + n] = best_slots.transpose(1, 2)
        return out_scores.view(batch, heads, q, k), out_slots.view(batch, heads, q, k)

    def _score_buffer(self, size: int, device: torch.device) -> torch.Tensor:
        """A float32 buffer of at least ``size`` elements. Allocating hundreds of MB for every search costs
        page faults (kernel time) that exceed the search itself, so it is kept and grows by doubling (up to
        ``search_block_bytes``) as the memory fills; it is freed with the index."""
        buffer = self._scores
        if buffer is None or buffer.numel() < size or buffer.device != device:
            grown = 0 if buffer is None else min(2 * buffer.numel(), self.search_block_bytes // 4)
            buffer = self._scores = torch.empty(max(size, grown), device=device)
        return buffer

    @staticmethod
    def _grouped_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of scores [rows, slots, n] along dim 1 -> values, slots [rows, k, n]; slots % GROUP == 0."""
        rows, slots, n = scores.shape
        width = slots // GROUP
        members = scores.view(rows, GROUP, width, n)  # member m of group j is slot m * width + j
        groups = members.amax(dim=1).topk(k, dim=1).indices  # [rows, k, n]
        candidates = members.gather(2, groups.unsqueeze(1).expand(-1, GROUP, -1, -1))  # [rows, GROUP, k, n]
        best, flat = candidates.flatten(1, 2).topk(k, dim=1)
        member = flat.div(k, rounding_mode="floor")
        return best, member * width + groups.gather(1, flat.remainder(k))
