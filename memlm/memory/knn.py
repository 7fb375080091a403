"""The kNN memory reader (Memorizing Transformers, Wu et al. 2022; Focused Transformer, Tworkowski et al. 2023).

Every token that leaves the local context enters the FIFO index (``memlm.index``) of each memory
layer, in document order; the index numbers its entries 0, 1, ... so entry ``e`` is the token at
document position ``memory_start + e``. Each query of a memory layer retrieves its ``top_k`` entries
of largest score, where the score is the one the attention then uses (the position policy puts
queries and stored keys in one geometry, ``positions/policy.py``). Indexes live on the device of
the layer they serve.
"""

from __future__ import annotations

import torch

from memlm.index import MemoryIndex, create_index
from memlm.positions.policy import PositionPolicy


class KNNMemory:
    """The kNN memories of one stream's memory layers: one ``MemoryIndex`` per layer, made on first use."""

    def __init__(self, *, index: str, index_kwargs: dict, capacity: int, top_k: int, batch_size: int,
                 dtype: torch.dtype | None, positions: PositionPolicy, devices: dict[int, torch.device]) -> None:
        self.index_backend, self.index_kwargs = index, index_kwargs
        self.capacity, self.top_k, self.batch_size = capacity, top_k, batch_size
        self.dtype = dtype  # None: the dtype of the keys that enter first
        self.positions = positions
        self.devices = devices  # memory layer -> the device of its attention
        self.indexes: dict[int, MemoryIndex] = {}
        self.reset()

    def reset(self) -> None:
        """Forget every entry (the indexes are emptied and dropped)."""
        for index in self.indexes.values():
            index.reset()
        self.indexes = {}
        self.memory_start = 0  # document position of entry 0 (> 0 when a memory was reloaded after eviction)
        # set to a list to record every search: ids, attention logits [b, hq, n, k] (scores x the model's scale)
        self.retrievals: list | None = None

    @property
    def layers(self) -> list[int]:
        """The memory layers holding entries."""
        return list(self.indexes)

    def add(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the next tokens of the document: unrotated keys, values [batch, kv_heads, n, head_dim].

        Returns them as stored in memory's dtype, unrotated (what a ``MemoryStore`` keeps of a segment).
        """
        device = self.devices.get(layer, keys.device)
        dtype = self.dtype or keys.dtype
        keys, values = keys.to(device, dtype), values.to(device, dtype)
        if layer not in self.indexes:
            _, kv_heads, _, head_dim = keys.shape
            self.indexes[layer] = create_index(
                self.index_backend, dim=head_dim, capacity=self.capacity, batch_size=self.batch_size,
                num_heads=kv_heads, device=device, dtype=dtype, **self.index_kwargs,
            )
        index = self.indexes[layer]
        first = self.memory_start + int(index.total_added[0])
        index.add(self.positions.stored_keys(keys, first), values)
        return keys, values

    def read(self, layer: int, q: torch.Tensor, local_start: int, scale: float, sinks: int = 0):
        """Each query head's top-k entries, rotated to where the attention puts them (``sinks``: sink tokens in
        front of the local context).

        q: [batch, q_heads, n, head_dim] (at their position ids). Returns keys, values
        [batch, q_heads, n, top_k, head_dim] in q's dtype and mask [batch, q_heads, n, top_k]; None before
        anything entered this layer's memory.
        """
        if layer not in self.indexes:
            return None, None, None
        index = self.indexes[layer]
        batch, q_heads, n, head_dim = q.shape
        group = q_heads // index.num_heads  # query head h reads kv head h // group
        queries = self.positions.search_queries(q.detach(), local_start, sinks)
        # consumed at once below: without a graph to keep them, keys and values may live in the index's buffers
        found = index.search(queries.reshape(batch, index.num_heads, group * n, head_dim), self.top_k,
                             scratch=not torch.is_grad_enabled())
        shape = (batch, q_heads, n, self.top_k)
        if self.retrievals is not None:
            self.retrievals.append((found.ids.reshape(shape), found.scores.reshape(shape) * scale))
        keys = self.positions.attended_keys(found.keys.reshape(*shape, head_dim), local_start, sinks)
        return keys.to(q.dtype), found.values.reshape(*shape, head_dim).to(q.dtype), found.mask.reshape(shape)

    def entries(self, layer: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Live entries of one row, oldest first: unrotated keys, values [kv_heads, n, head_dim] and the
        document position of the first."""
        keys, values, first_id = self.indexes[layer].entries(row)
        first = self.memory_start + first_id
        return self.positions.unstored_keys(keys, first), values, first
