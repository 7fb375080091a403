"""The position policy: where every local token and memory entry stands, and the rotation that puts it there.

Keys are kept unrotated (as if at position 0) in the local context, and rotated on use with the
model's own rotary frequencies (``rotary.py``). The rules (docs/DESIGN.md, "Positions"):

* ``position_mode="rebase"``: the local context occupies positions 0 .. L-1 (its *frame* starts at 0);
  ``"absolute"``: it starts at its document offset. RoPE scores depend on distances only, so the two
  modes give the same logits for rotary models.
* Attention sinks (the document's first ``sinks`` tokens, kept in front of the XL cache) stand at
  0 .. sinks-1 in both modes, and the frame is then the position of the first token after them:
  ``sinks`` in rebase (StreamingLLM's positions within the cache), the document offset in absolute.
* ``memory_positions="first"`` (LongLLaMA): a retrieved key sits at the first position of the local
  context. ``"original"``: at its true document distance from the query.
* Block retrieval (``memory/block_memory.py``) reserves ``memory_span`` positions between the sinks and the local
  context for the blocks it selects: in rebase the frame is then ``sinks + memory_span``.

The kNN search ranks entries by exactly the score the attention then uses. For ``"first"`` the index
holds unrotated keys and is searched with the query moved back by the frame (q at its offset in the
local context). For ``"original"`` the index holds keys rotated to their document positions and is
searched with the query at its document position: the inner product is then the score at the true
distance. What that costs: entries of one content at different positions are different keys, the
index must be told each entry's position when it is added (and un-rotates them when it is saved),
and rotary angles at document positions run into the millions, so they are computed in float64.
Models without rotary embeddings (GPT-2) carry positions in their hidden states: nothing rotates.
"""

from __future__ import annotations

import torch
from torch import nn

from .rotary import rotate, rotation


class PositionPolicy:
    """Position ids and rotations of one stream (``position_mode`` and ``memory_positions`` of its config)."""

    def __init__(self, position_mode: str, memory_positions: str, rotary: nn.Module | None,
                 memory_span: int = 0) -> None:
        self.position_mode = position_mode
        self.memory_positions = memory_positions
        self.rotary = rotary
        self.memory_span = memory_span
        self.table: tuple | None = None  # the last rotation_table: its key, the frequencies, cos, sin

    @property
    def inv_freq(self) -> torch.Tensor | None:
        """The rotary module's current frequencies [rot_dim / 2] (read on use: dynamic scaling may change them)."""
        return None if self.rotary is None else self.rotary.inv_freq

    def frame(self, local_start: int, sinks: int = 0) -> int:
        """Position id of the local context's first token after its ``sinks`` (and the block memory's span), whose
        document offset is ``local_start``."""
        return sinks + self.memory_span if self.position_mode == "rebase" else local_start

    def local_positions(self, local_start: int, first: int, n: int, device: torch.device,
                        sinks: int = 0) -> torch.Tensor:
        """Position ids [n] of local entries first .. first + n - 1 (counted from the local context's start,
        whose first ``sinks`` entries are the sinks, at 0 .. sinks-1)."""
        entries = torch.arange(first, first + n, device=device)
        return torch.where(entries < sinks, entries, entries + self.frame(local_start, sinks) - sinks)

    def rotate(self, keys: torch.Tensor, positions: torch.Tensor | int) -> torch.Tensor:
        """Unrotated keys [..., head_dim] moved to ``positions`` (broadcastable to keys.shape[:-1])."""
        if self.inv_freq is None:
            return keys
        if not isinstance(positions, torch.Tensor):
            if positions == 0:
                return keys
            positions = torch.tensor(positions, device=keys.device)
        return rotate(keys, positions, self.inv_freq)

    def rotation_table(self, first: int, n: int, device: torch.device,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin [n, rot_dim] of positions first .. first + n - 1 (None without rotary positions), for
        ``rotary.apply_rotation``. The last table is kept while the same range and frequencies are asked for: block
        memory rotates what it selects into one range of positions at every layer of a forward."""
        if self.inv_freq is None:
            return None
        key = (first, n, device, dtype)
        if self.table is None or self.table[0] != key or not torch.equal(self.table[1], self.inv_freq):
            cos, sin = rotation(torch.arange(first, first + n), self.inv_freq, device, dtype)
            self.table = (key, self.inv_freq.clone(), cos, sin)
        return self.table[2], self.table[3]

    # ------------------------------------------------------------------ the kNN memory's geometry

    def stored_keys(self, keys: torch.Tensor, first_position: int) -> torch.Tensor:
        """Unrotated keys [batch, heads, n, d] of document positions first_position + 0 .. n-1, as the index
        holds them."""
        if self.memory_positions == "first":
            return keys
        return self.rotate(keys, torch.arange(keys.shape[2], device=keys.device) + first_position)

    def unstored_keys(self, keys: torch.Tensor, first_position: int) -> torch.Tensor:
        """The inverse of ``stored_keys``: index keys [heads, n, d] back to unrotated."""
        if self.memory_positions == "first":
            return keys
        return self.rotate(keys, -(torch.arange(keys.shape[-2], device=keys.device) + first_position))

    def search_queries(self, q: torch.Tensor, local_start: int, sinks: int = 0) -> torch.Tensor:
        """Queries [..., d] (rotated to their position ids) moved into the index's geometry."""
        frame = self.frame(local_start, sinks)
        return self.rotate(q, -frame if self.memory_positions == "first" else local_start - frame)

    def attended_keys(self, keys: torch.Tensor, local_start: int, sinks: int = 0) -> torch.Tensor:
        """Retrieved index keys [..., d] rotated to where the attention puts them (memory stands between the
        sinks and the XL cache)."""
        frame = self.frame(local_start, sinks)
        return self.rotate(keys, frame if self.memory_positions == "first" else frame - local_start)
