"""Exact search over distinct keys: each distinct key scored once, its copies kept in FIFO order.

A memory whose keys repeat exactly holds far fewer distinct keys than entries. memlm-tiny's memory layer is its
first, where a key (and its value) is a function of the token alone: 185,000 entries of War and Peace hold a few
thousand distinct keys. Scoring every entry costs O(entries) per query; scoring every distinct key costs
O(distinct). The answer is the same set of entries up to which copies of a key are returned (copies score alike;
here the newest first).

Per sequence (``DistinctKeys``, bookkeeping in numpy: a few operations per added entry):

* ``lookup``: a key's bytes (all heads together) -> its distinct id; freed ids are reused.
* ``table``: the distinct keys [heads, distinct, dim] (in ``DistinctKeyTable``, one tensor for all sequences).
* ``owner``: slot -> distinct id (-1: empty); ``copies``: live copies per distinct id; ``newest``: the slots of
  its newest ``keep`` copies, newest first.

When entry i overwrites slot i % capacity, the entry evicted is its key's oldest copy: it is in ``newest`` exactly
when that key has at most ``keep`` copies, and then it is the last one listed.

Search: the k best distinct keys (a key holds at least one entry, so k distinct keys hold the k best entries),
then their listed copies in order, the first k. A search for more than ``keep`` entries per query scores every
slot instead (``TorchIndex``'s one-stage search).
"""

from __future__ import annotations

import numpy as np
import torch


class DistinctKeys:
    """One sequence's distinct keys and the slots of their copies (module docstring)."""

    def __init__(self, capacity: int, keep: int) -> None:
        self.keep = keep
        self.lookup: dict[bytes, int] = {}
        self.key_of: list[bytes | None] = []
        self.free: list[int] = []
        self.owner = np.full(capacity, -1, dtype=np.int64)
        self.copies = np.zeros(0, dtype=np.int64)
        self.newest = np.full((0, keep), -1, dtype=np.int64)

    def add(self, blobs: list[bytes], slots: np.ndarray) -> list[tuple[int, int]]:
        """Entries with key bytes ``blobs`` written into ``slots`` (in order). Returns (distinct id, position) of
        keys new to the table, whose rows the caller writes."""
        fresh = []
        for position, (blob, slot) in enumerate(zip(blobs, slots.tolist(), strict=True)):
            evicted = self.owner[slot]
            if evicted >= 0:
                self._evict(evicted)
            key = self.lookup.get(blob)
            if key is None:
                key = self._allocate(blob)
                fresh.append((key, position))
            self.owner[slot] = key
            self.copies[key] += 1
            listed = self.newest[key]
            listed[1:] = listed[:-1].copy()
            listed[0] = slot
        return fresh

    def _evict(self, key: int) -> None:
        count = self.copies[key]
        if count <= self.keep:  # the oldest copy is listed, last
            self.newest[key, count - 1] = -1
        self.copies[key] = count - 1
        if count == 1:
            del self.lookup[self.key_of[key]]
            self.key_of[key] = None
            self.free.append(key)

    def _allocate(self, blob: bytes) -> int:
        if self.free:
            key = self.free.pop()
            self.key_of[key] = blob
        else:
            key = len(self.key_of)
            self.key_of.append(blob)
            if key >= len(self.copies):
                grown = max(16, 2 * len(self.copies))
                self.copies = np.concatenate((self.copies, np.zeros(grown - len(self.copies), dtype=np.int64)))
                self.newest = np.concatenate(
                    (self.newest, np.full((grown - len(self.newest), self.keep), -1, dtype=np.int64)))
        self.lookup[blob] = key
        return key

    @property
    def allocated(self) -> int:
        """Distinct ids in use or free (the table rows this sequence needs)."""
        return len(self.key_of)


class DistinctKeyTable:
    """The distinct keys of every sequence, [batch, heads, rows, dim] (rows: the most any sequence needs, grown
    by doubling in multiples of ``multiple``), with each sequence's ``DistinctKeys``."""

    def __init__(self, batch_size: int, num_heads: int, dim: int, capacity: int, keep: int, *,
                 dtype: torch.dtype, device: torch.device, multiple: int) -> None:
        self.capacity, self.keep, self.multiple = capacity, keep, multiple
        self.rows = [DistinctKeys(capacity, keep) for _ in range(batch_size)]
        self.keys = torch.zeros(batch_size, num_heads, 0, dim, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        keep = sum(row.newest.nbytes + row.copies.nbytes + row.owner.nbytes for row in self.rows)
        return self.keys.numel() * self.keys.element_size() + keep

    def add(self, row: int, first_id: int, keys: torch.Tensor) -> None:
        """Entries first_id, first_id + 1, ... of sequence ``row`` with keys [heads, m, dim] (storage dtype)."""
        by_entry = keys.transpose(0, 1).contiguous().cpu()  # [m, heads, dim]
        blobs = [entry.tobytes() for entry in by_entry.view(torch.uint8).numpy()]  # (numpy has no bfloat16)
        slots = (np.arange(first_id, first_id + keys.shape[1]) % self.capacity).astype(np.int64)
        fresh = self.rows[row].add(blobs, slots)
        self._reserve(self.rows[row].allocated)
        if fresh:
            ids = torch.tensor([key for key, _ in fresh], device=keys.device)
            positions = torch.tensor([position for _, position in fresh], device=keys.device)
            self.keys[row][:, ids] = keys[:, positions]

    def reset(self, row: int) -> None:
        self.rows[row] = DistinctKeys(self.capacity, self.keep)
        self.keys[row].zero_()

    def live(self) -> torch.Tensor:
        """[batch, rows] bool: the table rows holding a key with live copies."""
        live = torch.zeros(self.keys.shape[0], self.keys.shape[2], dtype=torch.bool)
        for row, distinct in enumerate(self.rows):
            copies = distinct.copies[: self.keys.shape[2]]
            live[row, : len(copies)] = torch.from_numpy(copies > 0)
        return live.to(self.keys.device)

    def copies_of(self, row: int, keys: torch.Tensor, k: int) -> torch.Tensor:
        """Distinct ids [...] of sequence ``row`` -> the slots of their newest k copies [..., k] (-1: none)."""
        return torch.from_numpy(self.rows[row].newest[:, :k][keys.cpu().numpy()]).to(keys.device)

    def _reserve(self, rows: int) -> None:
        have = self.keys.shape[2]
        if rows <= have:
            return
        grown = -(-max(rows, 2 * have, self.multiple) // self.multiple) * self.multiple
        keys = self.keys.new_zeros(*self.keys.shape[:2], grown, self.keys.shape[3])
        keys[:, :, :have] = self.keys
        self.keys = keys


def distinct_topk(table: DistinctKeyTable, best: torch.Tensor, best_keys: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From the best distinct keys of each query, best first (scores, ids [batch, heads, q, c]), the k best entries:
    scores, slots [batch, heads, q, k] (slot -1 where fewer entries live)."""
    batch = best_keys.shape[0]
    slots = torch.stack([table.copies_of(row, best_keys[row], k) for row in range(batch)])  # [b, h, q, c, k]
    scores = best.unsqueeze(-1).expand_as(slots).flatten(-2)
    slots = slots.flatten(-2)  # distinct keys by score, a key's copies newest first
    # the first k listed copies: the r-th is where the count of listed copies first reaches r
    listed = (slots >= 0).cumsum(-1)
    ranks = torch.arange(1, k + 1, device=slots.device).expand(*slots.shape[:-1], k).contiguous()
    first = torch.searchsorted(listed, ranks).clamp(max=slots.shape[-1] - 1)
    found_slots = torch.where(ranks <= listed[..., -1:], slots.gather(-1, first), -1)
    found = scores.gather(-1, first).masked_fill(found_slots < 0, -float("inf"))
    return found, found_slots
