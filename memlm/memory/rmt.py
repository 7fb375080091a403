"""Recurrent Memory Transformer (Bulatov et al. 2022; "Scaling Transformer to 1M tokens and beyond
with RMT", 2023): a fixed number of memory embeddings carried from segment to segment through the
model itself.

Decoder-only layout: every segment is processed as ``[N read tokens] + segment + [N write tokens]``.
Read and write tokens take the same embeddings, the segment's memory: the first segment reads the
learned ``rmt_memory`` parameters; afterwards the model's final hidden states at the write positions
become the next segment's memory. They are used directly as input embeddings, as the paper's
decoder code does, which needs hidden size == embedding size (``attach`` checks it).

Positions: read and write tokens are ordinary members of the local context while their segment is
open: [XL cache ; read ; segment ; write], numbered consecutively like every local token
(docs/DESIGN.md), so the segment sits N positions after the cache and every segment looks the same. They
are never kept in the XL cache or the kNN memory, and their logits are never returned.

Backpropagation through time: with gradients enabled, the memory keeps its graph, so a loss in a
later segment reaches earlier segments. ``rmt_bptt_depth=k`` detaches the memory every k segments
(truncated BPTT), so no gradient spans more than k segments.
"""

from __future__ import annotations

import torch
from torch import nn


class RecurrentMemory:
    """The memory one session carries: [batch, N, hidden], with its graph while training."""

    def __init__(self, initial: nn.Parameter, batch_size: int, bptt_depth: int | None) -> None:
        self.initial = initial  # [N, hidden] learned embeddings read by the first segment
        self.batch_size = batch_size
        self.bptt_depth = bptt_depth
        self.reset()

    @property
    def tokens(self) -> int:
        return self.initial.shape[0]

    def reset(self) -> None:
        self.memory: torch.Tensor | None = None  # None: the first segment reads ``initial``
        self.segments = 0

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        """The current segment's memory embeddings, [batch, N, hidden]."""
        if self.memory is None:
            return self.initial.to(dtype).unsqueeze(0).expand(self.batch_size, -1, -1)
        return self.memory

    def detach_graph(self) -> None:
        if self.memory is not None:
            self.memory = self.memory.detach()

    def write(self, hidden: torch.Tensor) -> None:
        """hidden: [batch, N, hidden] final states at the write positions -> the next segment's memory."""
        self.segments += 1
        cut = not torch.is_grad_enabled() or (self.bptt_depth is not None and self.segments % self.bptt_depth == 0)
        self.memory = hidden.detach() if cut else hidden
