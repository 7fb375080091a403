"""FIFO ring-buffer storage, and the exact indexes that search it.

Entry ``i`` of a sequence lives in slot ``i % capacity``: adding ``n`` entries writes ``n`` slots
(at most two slices per sequence) and eviction is the overwrite itself, so adding costs O(n), never
O(capacity). Storage grows by doubling until it reaches ``capacity``, so a short document does not
pay for a large memory.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch

from .base import MemoryIndex, SearchResult


class RingBuffer:
    """Per-sequence FIFO storage of vectors: a tensor [batch, heads, slots, dim].

    ``multiple`` rounds the allocated slot count up (searches that view the slots in equal groups
    need it); slots past the live ones are never returned.
    """

    MIN_SLOTS = 1024

    def __init__(self, batch_size, num_heads, capacity, dim, *, dtype, device, multiple=1):
        self.capacity = capacity
        self.multiple = multiple
        self.limit = math.ceil(capacity / multiple) * multiple
        self.data = torch.zeros(batch_size, num_heads, 0, dim, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def write(self, row: int, first_id: int, entries: torch.Tensor) -> None:
        """Store entries [heads, m <= capacity, dim] as ids first_id, first_id+1, ... of sequence ``row``."""
        m = entries.shape[1]
        self._reserve(min(first_id + m, self.capacity))
        start = first_id % self.capacity
        head = min(m, self.capacity - start)
        self.data[row, :, start : start + head] = entries[:, :head]
        self.data[row, :, : m - head] = entries[:, head:]

    def gather(self, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """slots: [batch, heads, q, k] long, -1 for none -> [batch, heads, q, k, dim], zero where -1 (into ``out``
        when given: contiguous, of that shape and this buffer's dtype)."""
        batch, heads, length, dim = self.data.shape
        rows = torch.arange(batch * heads, device=slots.device).view(batch, heads, 1, 1) * length
        none = slots < 0
        flat = (rows + slots.clamp(min=0)).flatten()
        out = torch.index_select(self.data.view(-1, dim), 0, flat,
                                 out=None if out is None else out.view(-1, dim)).view(*slots.shape, dim)
        return out.masked_fill_(none.unsqueeze(-1), 0) if bool(none.any()) else out

    def clear(self, row: int) -> None:
        self.data[row].zero_()

    def _reserve(self, slots: int) -> None:
        have = self.data.shape[2]
        if slots <= have:
            return
        # Nothing has wrapped yet (a wrapped sequence means storage is full), so live slots are a prefix.
        grown = max(slots, 2 * have, self.MIN_SLOTS)
        grown = min(self.limit, math.ceil(grown / self.multiple) * self.multiple)
        data = self.data.new_zeros(*self.data.shape[:2], grown, self.data.shape[3])
        data[:, :, :have] = self.data
        self.data = data


class RingIndex(MemoryIndex):
    """An exact FIFO index over ring-buffer keys and values; subclasses supply the top-k search."""

    #: slots are allocated in multiples of this (see ``RingBuffer``)
    slot_multiple = 1

    def __init__(self, *, key_dtype: torch.dtype | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        shape = (self.batch_size, self.num_heads, self.capacity, self.dim)
        common = {"device": self.device, "multiple": self.slot_multiple}
        self._keys = RingBuffer(*shape, dtype=key_dtype or self.dtype, **common)
        self._values = RingBuffer(*shape, dtype=self.dtype, **common)

    @property
    def size(self) -> torch.Tensor:
        return torch.tensor([min(t, self.capacity) for t in self._total], dtype=torch.long)

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._values.nbytes

    @abstractmethod
    def _topk(self, queries: torch.Tensor, k: int, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Best ``k`` live slots per query.

        queries: [batch, heads, q, dim] float32; sizes: live slots per sequence (slots 0..size-1);
        k <= max(sizes). Returns scores [batch, heads, q, k] float32 and slots [batch, heads, q, k]
        long; a slot >= its sequence's size (or -1) marks "no entry".
        """

    def _add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = keys.shape[2]
        keep = min(n, self.capacity)  # older entries of an oversized add would be evicted at once
        keys = keys[:, :, n - keep :].to(self._keys.data.dtype)
        values = values[:, :, n - keep :].to(self.dtype)
        for row, total in enumerate(self._total):
            self._keys.write(row, total + n - keep, keys[row])
            self._values.write(row, total + n - keep, values[row])
            self._wrote_keys(row, total + n - keep, keys[row])

    def _wrote_keys(self, row: int, first_id: int, keys: torch.Tensor) -> None:
        """Called after keys [heads, m, dim] (in storage dtype) were written as ids first_id, ...; subclasses keep
        what they derive from keys in step with the ring."""

    def _search(self, queries: torch.Tensor, k: int, scratch: bool) -> SearchResult:
        sizes = self.size.tolist()
        live = min(k, max(sizes))
        scores, slots = self._topk(queries, live, sizes)
        size = torch.tensor(sizes, device=slots.device).view(-1, 1, 1, 1)
        mask = (slots >= 0) & (slots < size)
        slots = slots.masked_fill(~mask, -1)
        if live < k:  # pad to the k the caller asked for
            pad = (0, k - live)
            scores = torch.nn.functional.pad(scores, pad, value=-math.inf)
            slots = torch.nn.functional.pad(slots, pad, value=-1)
            mask = torch.nn.functional.pad(mask, pad, value=False)
        # Entry i sits in slot i % capacity: the newest id in slot s is s + capacity * floor((total-1-s)/capacity).
        total = torch.tensor(self._total, device=slots.device).view(-1, 1, 1, 1)
        wraps = (total - 1 - slots).div(self.capacity, rounding_mode="floor")
        ids = torch.where(mask, slots + wraps * self.capacity, -1)
        shape = (*slots.shape, self.dim)
        return SearchResult(
            scores=scores.masked_fill(~mask, -math.inf),
            keys=self._keys.gather(slots, self._result_buffer("keys", shape, self._keys.data.dtype, scratch)
                                    ).to(self.dtype),
            values=self._values.gather(slots, self._result_buffer("values", shape, self.dtype, scratch)),
            mask=mask,
            ids=ids,
        )

    def entries(self, row: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
        total = self._total[row]
        first = max(0, total - self.capacity)
        slots = torch.arange(first, total, device=self.device) % self.capacity
        keys = self._keys.data[row].index_select(1, slots).to(self.dtype)
        return keys, self._values.data[row].index_select(1, slots), first

    def _reset(self, rows: list[int]) -> None:
        for row in rows:
            self._keys.clear(row)
            self._values.clear(row)

    def _state(self) -> dict:
        return {"keys": self._keys.data.clone(), "values": self._values.data.clone()}

    def _load_state(self, state: dict) -> None:
        for name, ring in (("keys", self._keys), ("values", self._values)):
            data = state[name]
            expected = ring.data.shape
            if data.shape[:2] != expected[:2] or data.shape[3] != expected[3] or data.shape[2] > ring.limit:
                raise ValueError(f"state {name!r} has shape {list(data.shape)}, which this index cannot hold")
            ring.data = data.to(device=self.device, dtype=ring.data.dtype).clone()
