"""The exact kNN memory in plain torch: ring-buffer keys and values, batched matmul + top-k.

Searching 65K keys per head is dominated by two costs, and both are avoided here:

* Allocating a fresh [heads, q, capacity] score tensor for every search costs more than the
  matmul itself (page faults). Queries are scored in blocks into one reused buffer of at most
  ``search_block_bytes``.
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
    #: upper bound of the per-search score buffer (its size decides how many queries go per block)
    search_block_bytes = 128 * 2**20

    def _topk(self, queries: torch.Tensor, k: int, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, q, dim = queries.shape
        slots = math.ceil(max(sizes) / GROUP) * GROUP  # allocated storage is a multiple of GROUP
        keys = self._keys.data[:, :, :slots].float()  # a no-op for float32 storage
        keys_t = keys.reshape(batch * heads, slots, dim).transpose(1, 2)  # [bh, dim, slots]
        queries = queries.reshape(batch * heads, q, dim)
        block = max(1, min(q, self.search_block_bytes // (4 * batch * heads * slots)))
        buffer = torch.empty(batch * heads * block * slots, device=queries.device)
        out_scores = torch.empty(batch * heads, q, k, device=queries.device)
        out_slots = torch.empty(batch * heads, q, k, dtype=torch.long, device=queries.device)
        grouped = slots // GROUP > 4 * k  # below that, grouping saves nothing
        for start in range(0, q, block):
            n = min(block, q - start)
            scores = buffer[: batch * heads * n * slots].view(batch * heads, n, slots)
            torch.bmm(queries[:, start : start + n], keys_t, out=scores)
            per_row = scores.view(batch, heads, n, slots)
            for row, size in enumerate(sizes):
                if size < slots:
                    per_row[row, :, :, size:] = -math.inf
            if grouped:
                best, best_slots = self._grouped_topk(scores, k)
            else:
                best, best_slots = scores.topk(k, dim=-1)
            out_scores[:, start : start + n] = best
            out_slots[:, start : start + n] = best_slots
        return out_scores.view(batch, heads, q, k), out_slots.view(batch, heads, q, k)

    @staticmethod
    def _grouped_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of scores [rows, n, slots] along the last dim, slots a multiple of GROUP."""
        rows, n, slots = scores.shape
        width = slots // GROUP
        members = scores.view(rows, n, GROUP, width)  # member m of group j is slot m * width + j
        groups = members.amax(dim=2).topk(k, dim=-1).indices  # [rows, n, k]
        candidates = members.gather(-1, groups.unsqueeze(2).expand(-1, -1, GROUP, -1))  # [rows, n, GROUP, k]
        best, flat = candidates.flatten(2).topk(k, dim=-1)
        member = flat.div(k, rounding_mode="floor")
        return best, member * width + groups.gather(-1, flat.remainder(k))
