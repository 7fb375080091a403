"""The state of one document stream: Transformer-XL caches, kNN memories and positions.

A stream is a sequence of *segments* of ``segment_length`` tokens. The local context of the
tokens being processed is [closed XL cache ; the open segment so far ; the new tokens] (with RMT
read tokens before the segment and write tokens after it, ``rmt.py``). When a
segment closes, the local context keeps its last ``xl_length`` tokens (Transformer-XL, Dai et al.
2019) and the tokens it drops enter the kNN memory of every memory layer (Memorizing Transformers,
Wu et al. 2022) at that moment, so no token is attended twice. Feeding a segment in one forward or
token by token (as ``generate`` does) gives the same result.

Keys are stored unrotated (at position 0) and rotated to their place in the local context on use
(``rotary.py``). Positions (DESIGN.md): ``position_mode="rebase"`` numbers the local context
0..L-1; ``"absolute"`` uses document offsets. Memory keys sit at the start of the local context
(``memory_positions="first"``) or at their true document distance from the query (``"original"``).
Memory entry ids are document positions: tokens enter memory in document order, starting at 0.
"""

from __future__ import annotations

import torch
from torch import nn

from memlm.index import create_index
from memlm.kernels import memory_attention

from .config import MEMORY_DTYPES, MemoryConfig
from .crossbatch import CrossBatch, CrossBatchMemory
from .rotary import rotate


class StreamState:
    """XL caches, memories and positions of ``batch_size`` parallel document streams.

    Used by ``Session``: ``begin(n)`` before a forward of n new tokens, ``attend`` from the
    registered attention function at every layer, ``commit()`` after the forward succeeded.
    """

    def __init__(
        self,
        config: MemoryConfig,
        *,
        batch_size: int,
        memory_layers: tuple[int, ...],
        gates: nn.Parameter,
        rotary: nn.Module | None,
        max_positions: int | None,
        device: torch.device,
        dtype: torch.dtype,
        crossbatch: CrossBatch | None = None,
    ) -> None:
        if crossbatch is not None:
            crossbatch.check_batch(batch_size)
            if config.memory_positions != "first" or not memory_layers:
                raise ValueError("CrossBatch training needs memory layers with memory_positions='first' (FoT's "
                                 f"setting), got memory_layers={memory_layers}, "
                                 f"memory_positions={config.memory_positions!r}")
        self.crossbatch = crossbatch  # training: a differentiable CrossBatch memory replaces the kNN index
        self.config = config
        self.batch_size = batch_size
        self.memory_layers = memory_layers
        self.gates = gates  # [memory layers, q_heads] logits
        self.rotary = rotary
        self.max_positions = max_positions  # for models with absolute position embeddings
        self.device = device
        self.memory_dtype = MEMORY_DTYPES[config.memory_dtype] if config.memory_dtype else dtype
        self.reset()

    def reset(self) -> None:
        """Forget the whole document: caches, memories, positions."""
        # layer -> unrotated keys, values [batch, kv_heads, cache + read + open, head_dim]
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.indexes: dict = {}  # layer -> MemoryIndex, made when the first tokens enter memory
        self.recent = None if self.crossbatch is None else CrossBatchMemory(
            self.crossbatch, self.batch_size, self.config.segment_length)
        self.local_start = 0  # document position of the local context's first token
        self.cache_length = 0  # tokens of closed segments kept (the XL cache)
        self.read_length = 0  # RMT read tokens of the open segment
        self.open_length = 0  # tokens of the segment not yet closed
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.positions: torch.Tensor | None = None
        self._new = (0, 0, 0)  # read, text, write tokens of the forward in flight
        # layer -> keys, values [batch, kv_heads, n, head_dim] that entered memory when the last segment closed
        # (what a MemoryStore commits with that segment)
        self.last_added: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.memory_start = 0  # document position of memory entry 0 (> 0 when a memory was reloaded after eviction)
        # set to a list to record every search: ids, attention logits [b, hq, n, k] (scores x the model's scale)
        self.retrievals: list | None = None

    @property
    def tokens_seen(self) -> int:
        return self.local_start + self.cache_length + self.open_length

    @property
    def local_length(self) -> int:
        """Entries of the local context: cache, read tokens, open segment."""
        return self.cache_length + self.read_length + self.open_length

    # ------------------------------------------------------------------------------------ forward

    def check_room(self, n: int) -> None:
        """Raise before anything runs if an absolute-position model cannot take ``n`` more tokens."""
        if self.max_positions is None or self.config.position_mode != "absolute":
            return  # rotary models extrapolate; rebased positions stay below xl_length + segment_length
        last = self.tokens_seen + n - 1 + 2 * self.config.rmt_tokens
        if last >= self.max_positions:
            raise ValueError(
                f"position {last} is past this model's max_position_embeddings ({self.max_positions}): an "
                f"absolute-position model cannot stream past it with position_mode='absolute'; use "
                f"position_mode='rebase' with xl_length + segment_length <= {self.max_positions}"
            )

    def begin(self, n: int, read: int = 0, write: int = 0) -> torch.Tensor:
        """Prepare a forward of ``read`` RMT read tokens, ``n`` text tokens and ``write`` RMT write tokens.

        Returns their position ids [batch, read + n + write].
        """
        if not 0 < n <= self.config.segment_length - self.open_length:
            raise ValueError(f"{n} new tokens do not fit the open segment ({self.open_length} of "
                             f"{self.config.segment_length} tokens used)")
        self.check_room(n)
        start = self._frame() + self.local_length
        total = read + n + write
        self.pending, self._new = {}, (read, n, write)
        self.positions = torch.arange(start, start + total, device=self.device)
        return self.positions.expand(self.batch_size, total)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of the new tokens at one layer.

        q: [batch, q_heads, n, head_dim]; k, v: [batch, kv_heads, n, head_dim] (positions applied).
        Returns [batch, n, q_heads, head_dim], the layout transformers' attention functions return.
        """
        if self.positions is None:
            raise RuntimeError("StreamState.attend called outside begin()/commit()")
        inv_freq = None if self.rotary is None else self.rotary.inv_freq
        unrotated = k if inv_freq is None else rotate(k, -self.positions, inv_freq)
        # Caches carry no gradient, except into CrossBatch's differentiable memory.
        self.pending[layer] = (unrotated, v) if self.crossbatch is not None else (unrotated.detach(), v.detach())
        if layer in self.cache:
            cached_k, cached_v = self.cache[layer]
            if inv_freq is not None:
                cached_k = rotate(cached_k, torch.arange(cached_k.shape[2], device=k.device) + self._frame(), inv_freq)
            k, v = torch.cat((cached_k.to(k.dtype), k), dim=2), torch.cat((cached_v.to(v.dtype), v), dim=2)
        mem_k = mem_v = mem_mask = gate = None
        if layer in self.memory_layers:
            gate = self.gates[self.memory_layers.index(layer)]
            if self.recent is not None:
                mem_k, mem_v, mem_mask = self.recent.read(layer, self._frame(), inv_freq, q.dtype)
            elif layer in self.indexes:
                mem_k, mem_v, mem_mask = self._retrieve(layer, q, inv_freq, scale)
        out = memory_attention(q, k, v, mem_k, mem_v, mem_mask, gate=gate, fusion=self.config.fusion, scale=scale)
        return out.transpose(1, 2)

    def commit(self) -> None:
        """The forward succeeded: its tokens join the local context (write tokens never do); a full segment closes."""
        read, n, _ = self._new
        for layer, (k, v) in self.pending.items():
            k, v = k[:, :, : read + n], v[:, :, : read + n]
            if layer in self.cache:
                cached_k, cached_v = self.cache[layer]
                k, v = torch.cat((cached_k, k), dim=2), torch.cat((cached_v, v), dim=2)
            self.cache[layer] = (k, v)
        self.pending, self.positions = {}, None
        self.read_length += read
        self.open_length += n
        if self.open_length == self.config.segment_length:
            self._close_segment()

    def abort(self) -> None:
        """The forward failed: drop what it computed, keep everything stored."""
        self.pending, self.positions = {}, None

    def detach_graph(self) -> None:
        """Cut the graph behind the caches and the CrossBatch memory; keep their values."""
        self.cache = {layer: (k.detach(), v.detach()) for layer, (k, v) in self.cache.items()}
        if self.recent is not None:
            self.recent.detach_()

    # ------------------------------------------------------------------------------------ helpers

    def _frame(self) -> int:
        """The position id of the local context's first token."""
        return 0 if self.config.position_mode == "rebase" else self.local_start

    def _close_segment(self) -> None:
        """Drop the read tokens; keep the last ``xl_length`` tokens; move older ones into memory."""
        start, end = self.cache_length, self.cache_length + self.read_length  # read tokens' slots
        kept = self.cache_length + self.open_length
        drop = max(0, kept - self.config.xl_length)
        self.last_added = {}
        for layer, (k, v) in self.cache.items():
            if end > start:
                k, v = (torch.cat((t[:, :, :start], t[:, :, end:]), dim=2) for t in (k, v))
            if drop and layer in self.memory_layers and self.recent is not None:
                self.recent.add(layer, k[:, :, :drop], v[:, :, :drop])
            elif drop and layer in self.memory_layers:
                self.last_added[layer] = self.add_memory(layer, k[:, :, :drop], v[:, :, :drop])
            self.cache[layer] = (k[:, :, drop:], v[:, :, drop:])
        self.local_start += drop
        self.cache_length = kept - drop
        self.read_length = self.open_length = 0

    def add_memory(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append unrotated keys, values [batch, kv_heads, n, head_dim] to a memory layer's index (made on first
        use); returns them as stored (in the memory dtype)."""
        keys, values = keys.to(self.device, self.memory_dtype), values.to(self.device, self.memory_dtype)
        if layer not in self.indexes:
            _, kv_heads, _, head_dim = keys.shape
            self.indexes[layer] = create_index(
                self.config.index, dim=head_dim, capacity=self.config.memory_capacity, batch_size=self.batch_size,
                num_heads=kv_heads, device=self.device, dtype=self.memory_dtype, **self.config.index_kwargs,
            )
        self.indexes[layer].add(keys, values)
        return keys, values

    def local_state(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """What continues this stream besides its memories: the local context's unrotated keys/values of every
        layer (``cache.{layer}.keys|values`` [batch, kv_heads, local, head_dim]) and the position counters."""
        if self.pending:
            raise RuntimeError("cannot save a stream in the middle of a forward")
        tensors = {}
        for layer, (keys, values) in self.cache.items():
            tensors[f"cache.{layer}.keys"], tensors[f"cache.{layer}.values"] = keys, values
        counters = {"local_start": self.local_start, "cache_length": self.cache_length,
                    "read_length": self.read_length, "open_length": self.open_length, "memory_start": self.memory_start}
        return tensors, counters

    def load_local_state(self, tensors: dict[str, torch.Tensor], counters: dict[str, int]) -> None:
        """Restore what ``local_state`` returned (memories are loaded separately with ``add_memory``)."""
        layers = sorted({int(name.split(".")[1]) for name in tensors})
        self.cache = {layer: (tensors[f"cache.{layer}.keys"].to(self.device),
                              tensors[f"cache.{layer}.values"].to(self.device)) for layer in layers}
        for name, value in counters.items():
            setattr(self, name, int(value))

    def _retrieve(self, layer: int, q: torch.Tensor, inv_freq: torch.Tensor | None, scale: float):
        """Each query head's top-k memory entries: keys, values [b, hq, n, k, d] and mask [b, hq, n, k]."""
        index = self.indexes[layer]
        batch, q_heads, n, head_dim = q.shape
        group = q_heads // index.num_heads  # query head h reads kv head h // group
        found = index.search(q.detach().reshape(batch, index.num_heads, group * n, head_dim), self.config.top_k)
        shape = (batch, q_heads, n, self.config.top_k)
        if self.retrievals is not None:
            self.retrievals.append((found.ids.reshape(shape), found.scores.reshape(shape) * scale))
        mem_k, mem_v = found.keys.reshape(*shape, head_dim), found.values.reshape(*shape, head_dim)
        if inv_freq is not None:
            if self.config.memory_positions == "original":
                positions = found.ids.reshape(shape) + self.memory_start - self.local_start + self._frame()
                mem_k = rotate(mem_k, positions, inv_freq)
            elif self._frame() != 0:
                mem_k = rotate(mem_k, torch.tensor(self._frame(), device=q.device), inv_freq)
        return mem_k.to(q.dtype), mem_v.to(q.dtype), found.mask.reshape(shape)
