"""Rows of different lengths in one batched forward: every row a stream of its own.

A ``StreamState`` moves its rows in lockstep: one segment clock, one local-context length, one memory
count. Rows of different lengths (two users of a server, ``feed(list_of_texts)``) cannot share
those: a row's segments close when *its* tokens fill them. ``RowStreams`` keeps one batch-1
``StreamState`` per row and runs them inside one forward of the whole batch. The input is padded
([batch, n] ids with a mask [batch, n] of real tokens); each layer's attention hands every row its
real tokens only, so a padded position is never attended and never stored, and a row's result
equals running it in its own session. The projections and MLPs still run batched; the attention
runs row by row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .stream import DOCUMENT_MEMORIES, StreamState


class RowStreams:
    """``batch_size`` independent streams behind the interface ``Session`` uses of a ``StreamState``.

    Args:
        make_state: builds an empty batch-1 ``StreamState``.
        lockstep: a lockstep state whose rows to continue (converted row by row), or None.
    """

    def __init__(self, make_state: Callable[[], StreamState], batch_size: int,
                 lockstep: StreamState | None = None) -> None:
        self.batch_size = batch_size
        self.rows = [make_state() for _ in range(batch_size)]
        self.config = self.rows[0].config
        self.real: torch.Tensor | None = None  # [batch, n] real tokens of the forward in flight
        if lockstep is not None and lockstep.tokens_seen:
            self._continue(lockstep)

    def _continue(self, lockstep: StreamState) -> None:
        """Take over each row of a lockstep state: local context, counters and memory entries."""
        tensors, counters = lockstep.state_dict()
        memory = lockstep.memory if isinstance(lockstep.memory, DOCUMENT_MEMORIES) else None
        for r, row in enumerate(self.rows):
            row.load_state_dict({name: t[r : r + 1] for name, t in tensors.items()}, counters)
            for layer in memory.layers if memory is not None else ():
                keys, values, first = memory.entries(layer, r)
                row.memory.memory_start = first  # the document position of the row's oldest live entry
                row.add_memory(layer, keys[None], values[None])

    # ------------------------------------------------------------------ what Session reads

    @property
    def tokens_seen(self) -> list[int]:
        return [row.tokens_seen for row in self.rows]

    def room(self) -> list[int]:
        """Tokens each row's open segment can still take."""
        return [self.config.segment_length - row.local.open_length for row in self.rows]

    def reset(self) -> None:
        for row in self.rows:
            row.reset()

    def check_room(self, n: int) -> None:
        for row in self.rows:
            row.check_room(n)

    def detach_graph(self) -> None:
        for row in self.rows:
            row.detach_graph()

    @property
    def memory(self):
        """The first row's memory reader (every row has one of the same kind, or none)."""
        return self.rows[0].memory

    def clear_memory(self) -> None:
        for row in self.rows:
            row.clear_memory()

    # ----------------------------------------------------------------------------- forward

    def begin(self, real: torch.Tensor) -> torch.Tensor:
        """Prepare a forward of ids [batch, n] whose real tokens are ``real`` [batch, n] (bool); each row's real
        tokens must fit its open segment. Returns position ids [batch, n] (0 at padded positions)."""
        counts = real.sum(dim=1).tolist()
        positions = torch.zeros(real.shape, dtype=torch.long, device=real.device)
        begun = []
        try:
            for r, (row, count) in enumerate(zip(self.rows, counts, strict=True)):
                if count:
                    positions[r, real[r]] = row.begin(count)[0].to(real.device)
                    begun.append(row)
        except BaseException:
            for row in begun:
                row.abort()
            raise
        self.real = real
        return positions

    def attend(self, module: nn.Module, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               **kwargs) -> torch.Tensor:
        """q [batch, q_heads, n, d]; k, v [batch, kv_heads, n, d] -> [batch, n, q_heads, d], each row attending
        over its own local context and memory with its real tokens (zeros at padded positions)."""
        if self.real is None:
            raise RuntimeError("RowStreams.attend called outside begin()/commit()")
        out = q.new_zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
        for r, row in enumerate(self.rows):
            real = self.real[r].to(q.device)
            if bool(real.any()):
                out[r, real] = row.attend(module, layer, q[r : r + 1, :, real], k[r : r + 1, :, real],
                                          v[r : r + 1, :, real], **kwargs)[0]
        return out

    def commit(self) -> None:
        for r, row in enumerate(self.rows):
            if bool(self.real[r].any()):
                row.commit()
        self.real = None

    def abort(self) -> None:
        for row in self.rows:
            if row.local.in_forward or row.position_ids is not None:
                row.abort()
        self.real = None
