"""CrossBatch: the Focused Transformer's differentiable training memory (Tworkowski et al. 2023).

At inference a memory layer retrieves from a kNN index whose entries carry no gradient. In FoT
training the memory layer instead attends, with one softmax over local and memory keys, to a
memory that is small enough to attend to whole and keeps its graph:

* positives: the last ``positives`` contexts (``positives * segment_length`` tokens) of the row's
  own document that left its local context, i.e. exactly what the kNN memory would hold;
* negatives: the same recent memory of ``negatives`` other documents of the batch (rows r+1 ..
  r+negatives, cyclically), which the row must learn to tell apart from its own.

The memory is passed to ``memory_attention`` in its shared layout [batch, kv_heads, mem, head_dim]
with a mask for the slots not filled yet (a document's first contexts). Keys are stored unrotated
and sit at the first position of the local context (``memory_positions="first"``), as in FoT.
The graph spans one training step (``Session.detach_graph`` cuts it when a document spans several).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memlm.config import check_integer
from memlm.positions.policy import PositionPolicy


@dataclass(frozen=True)
class CrossBatch:
    """How many own past contexts (positives) and other documents (negatives) each row's memory holds."""

    positives: int = 1
    negatives: int = 1

    def __post_init__(self) -> None:
        for name in ("positives", "negatives"):
            check_integer(f"crossbatch {name}", getattr(self, name), 0)
        if self.positives == 0:
            raise ValueError("crossbatch positives must be >= 1: a row's memory needs its own document's contexts")

    def check_batch(self, batch_size: int) -> None:
        if self.negatives > batch_size - 1:
            raise ValueError(f"crossbatch negatives ({self.negatives}) must be at most batch_size - 1 "
                             f"({batch_size - 1}): negatives are the other documents of the batch")


class CrossBatchMemory:
    """Per memory layer, the recent memory of every row: unrotated keys, values [batch, kv_heads, n, d]
    with n <= capacity = positives * segment_length, oldest first, with their graph."""

    def __init__(self, crossbatch: CrossBatch, batch_size: int, segment_length: int,
                 positions: PositionPolicy) -> None:
        crossbatch.check_batch(batch_size)
        self.crossbatch = crossbatch
        self.capacity = crossbatch.positives * segment_length
        self.positions = positions
        self.reset()

    def reset(self) -> None:
        self.entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Tokens that left the local context, [batch, kv_heads, n, d]; the oldest beyond capacity drop out."""
        if layer in self.entries:
            old_k, old_v = self.entries[layer]
            keys, values = torch.cat((old_k, keys), dim=2), torch.cat((old_v, values), dim=2)
        self.entries[layer] = keys[:, :, -self.capacity :], values[:, :, -self.capacity :]

    def read(self, layer: int, q: torch.Tensor, local_start: int, scale: float, sinks: int = 0):
        """Memory of every row in the shared layout, for queries q [batch, q_heads, n, d]: keys, values
        [batch, kv_heads, (1 + negatives) * n_stored, d] (own first, then the negatives in row order; keys at
        the first position of the local context) and mask None (every row holds as many entries, so none is
        absent); (None, None, None) before anything entered memory."""
        if layer not in self.entries:
            return None, None, None
        keys, values = self.entries[layer]
        # row i reads rows i, i+1, ..., i+negatives (mod batch). Only the filled entries: attending to empty
        # slots would cost a full capacity per segment from the first one on.
        # (torch.roll, not fancy indexing: the backward of an index gather is a slow accumulating scatter on CPU.)
        shifts = range(self.crossbatch.negatives + 1)
        mem_k, mem_v = (torch.cat([torch.roll(t, -shift, dims=0) for shift in shifts], dim=2) for t in (keys, values))
        mem_k = self.positions.rotate(mem_k, self.positions.frame(local_start, sinks))
        return mem_k.to(q.dtype), mem_v.to(q.dtype), None

    def detach_(self) -> None:
        self.entries = {layer: (k.detach(), v.detach()) for layer, (k, v) in self.entries.items()}
