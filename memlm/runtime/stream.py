"""The state of one document stream, composed of three parts (docs/DESIGN.md, "The runtime"):

* the local context (``local.py``): XL cache + open segment, and the FIFO hand-over to memory;
* the memory reader: the kNN index (``memory/knn.py``), block retrieval (``memory/block_memory.py``), the
  CrossBatch memory while training (``memory/crossbatch.py``), or none;
* the position policy (``positions/policy.py``): the position id of every local token and memory
  entry, and the rotations that put stored keys there.

``attend`` is what the registered attention function calls inside a session. A memory layer
computes ``memory_attention`` (``memlm.kernels``) over [local context ; new tokens] plus its memory;
every other layer calls the model's own attention implementation over [local context ; new tokens]
with a causal mask (and the model's sliding window), so it computes what the model computes.
Feeding a segment in one forward or token by token (as ``generate`` does) gives the same result.
"""

from __future__ import annotations

import torch
from torch import nn

from memlm.config import MEMORY_DTYPES, MemoryConfig
from memlm.kernels import additive_mask, causal_mask, memory_attention
from memlm.memory.block_memory import BlockMemory
from memlm.memory.crossbatch import CrossBatch, CrossBatchMemory
from memlm.memory.knn import KNNMemory
from memlm.positions.policy import PositionPolicy

from .attention import STREAMABLE, previous_function
from .local import LocalContext

#: the memory readers whose entries a document keeps (stores, row streams, branches): every token that left the
#: local context, unrotated, with the same interface (add, entries, layers, memory_start, retrievals)
DOCUMENT_MEMORIES = (KNNMemory, BlockMemory)


class StreamState:
    """Local context, memory and positions of ``batch_size`` parallel document streams.

    Used by ``Session``: ``begin(n)`` before a forward of n new tokens, ``attend`` from the
    registered attention function at every layer, ``commit()`` after the forward succeeded.

    Args:
        previous_attention: the model's own attention implementation (``"sdpa"``, ``"eager"``, ...), which the
            layers without memory use.
        devices: layer -> the device of its attention (caches, indexes and gates live there).
        memory_module: memlm's parameters (``MemoryModule``); its ``gates`` [memory layers, q_heads] are read at each
            attention, not kept, so a wrapper that swaps parameters in and out (FSDP2) is followed.
        pooled_from: the resolved ``pooled_selection_from`` (a non-negative layer index, ``MemoryModel`` resolves it).
    """

    def __init__(
        self,
        config: MemoryConfig,
        *,
        batch_size: int,
        memory_layers: tuple[int, ...],
        memory_module: nn.Module,
        rotary: nn.Module | None,
        max_positions: int | None,
        devices: dict[int, torch.device],
        dtype: torch.dtype,
        previous_attention: str = "sdpa",
        crossbatch: CrossBatch | None = None,
        pooled_from: int | None = None,
    ) -> None:
        if config.distance_cap is not None and crossbatch is not None:  # (attach refuses it on non-rotary models)
            raise ValueError("distance_cap needs an inference session: no CrossBatch training, whose shared memory "
                             "has one position for every query")
        if crossbatch is not None and config.retrieval == "blocks":
            raise ValueError("retrieval='blocks' is training-free: CrossBatch training needs retrieval='tokens'")
        if crossbatch is not None:
            crossbatch.check_batch(batch_size)
            if config.memory_positions != "first" or not memory_layers:
                raise ValueError("CrossBatch training needs memory layers with memory_positions='first' (FoT's "
                                 f"setting), got memory_layers={memory_layers}, "
                                 f"memory_positions={config.memory_positions!r}")
        self.config = config
        self.batch_size = batch_size
        self.memory_layers = memory_layers
        self.memory_module = memory_module
        self.max_positions = max_positions  # for models with absolute position embeddings
        self.devices = devices
        self.previous_attention = previous_attention
        self.crossbatch = crossbatch
        self.local = LocalContext(config.segment_length, config.xl_length, config.sink_tokens)
        self.positions = PositionPolicy(config.position_mode, config.memory_positions, rotary, config.block_span)
        memory_dtype = MEMORY_DTYPES[config.memory_dtype] if config.memory_dtype else dtype
        if crossbatch is not None:  # training: a differentiable CrossBatch memory replaces the kNN index
            self.memory = CrossBatchMemory(crossbatch, batch_size, config.segment_length, self.positions)
        elif memory_layers and config.retrieval == "blocks":
            self.memory = BlockMemory(
                capacity=config.memory_capacity, block_size=config.block_size, top_blocks=config.top_blocks,
                scoring=config.block_scoring, representatives=config.block_representatives,
                exact_queries=config.exact_block_queries, hold=config.hold_blocks,
                neighbours=config.block_neighbours, pooled_from=pooled_from, dtype=memory_dtype,
                positions=self.positions, devices={layer: devices[layer] for layer in memory_layers},
            )
        elif memory_layers:
            self.memory = KNNMemory(
                index=config.index, index_kwargs=config.index_kwargs, capacity=config.memory_capacity,
                top_k=config.top_k, batch_size=batch_size, dtype=memory_dtype, positions=self.positions,
                devices={layer: devices[layer] for layer in memory_layers},
            )
        else:
            self.memory = None
        self.reset()

    def reset(self) -> None:
        """Forget the whole document: caches, memories, positions."""
        self.local.reset()
        if self.memory is not None:
            self.memory.reset()
        if isinstance(self.memory, DOCUMENT_MEMORIES):  # the first sink_tokens tokens never enter memory
            self.memory.memory_start = self.config.sink_tokens
        self.position_ids: torch.Tensor | None = None  # [read + n + write] of the forward in flight
        self.masks: dict[tuple, torch.Tensor] = {}  # the forward's local masks, made once for all layers
        # layer -> keys, values [batch, kv_heads, n, head_dim] that entered memory when the last segment closed
        # (what a MemoryStore commits with that segment)
        self.last_added: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def tokens_seen(self) -> int:
        return self.local.tokens_seen

    # ------------------------------------------------------------------------------------ forward

    def check_room(self, n: int) -> None:
        """Raise before anything runs if an absolute-position model cannot take ``n`` more tokens."""
        if self.max_positions is None or self.config.position_mode != "absolute":
            return  # rotary models extrapolate; rebased positions stay below segment_length + 2 * rmt_tokens
        last = self.tokens_seen + n - 1 + 2 * self.config.rmt_tokens
        if last >= self.max_positions:
            raise ValueError(
                f"position {last} is past this model's max_position_embeddings ({self.max_positions}): an "
                f"absolute-position model cannot stream past it with position_mode='absolute'; use "
                f"position_mode='rebase' with xl_length=0 (kNN memory and RMT restart positions every segment)"
            )

    def begin(self, n: int, read: int = 0, write: int = 0) -> torch.Tensor:
        """Prepare a forward of ``read`` RMT read tokens, ``n`` text tokens and ``write`` RMT write tokens.

        Returns their position ids [batch, read + n + write].
        """
        self.local.begin(n, read, write)
        self.check_room(n)
        self.masks = {}
        device = next(iter(self.devices.values()))
        self.position_ids = self.positions.local_positions(self.local.local_start, self.local.length,
                                                           read + n + write, device, self.local.sink_length)
        return self.position_ids.expand(self.batch_size, -1)

    def attend(self, module: nn.Module, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               scale: float, dropout: float = 0.0, sliding_window: int | None = None, softcap: float | None = None,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the new tokens at one layer, with the attention arguments the model passed.

        q: [batch, q_heads, n, head_dim]; k, v: [batch, kv_heads, n, head_dim] (positions applied).
        Returns [batch, n, q_heads, head_dim], the layout transformers' attention functions return.
        """
        if self.position_ids is None:
            raise RuntimeError("StreamState.attend called outside begin()/commit()")
        positions, local = self.positions, self.local
        new_positions = self.position_ids.to(k.device)
        unrotated = positions.rotate(k, -new_positions)
        # caches carry no gradient, except into CrossBatch's differentiable memory
        kept_k, kept_v = (unrotated, v) if self.crossbatch is not None else (unrotated.detach(), v.detach())
        cached_k, cached_v = local.extend(layer, kept_k, kept_v)
        where = None
        if cached_k is not None:
            where = positions.local_positions(local.local_start, 0, cached_k.shape[2], k.device, local.sink_length)
            k = torch.cat((positions.rotate(cached_k, where).to(k.dtype), k), dim=2)
            v = torch.cat((cached_v.to(v.dtype), v), dim=2)
        capped = {} if self.config.distance_cap is None else self.capped_pairs(q, unrotated, new_positions, cached_k,
                                                                                where)
        if layer not in self.memory_layers:
            if capped:  # the model's own attention cannot score pairs apart: memlm's blocks can
                out = memory_attention(q, k, v, scale=scale, window=sliding_window, softcap=softcap, sinks=sinks,
                                       dropout=dropout if module.training else 0.0, **capped)
                return out.transpose(1, 2)
            return self.model_attention(module, q, k, v, scale=scale, dropout=dropout, sliding_window=sliding_window,
                                        softcap=softcap, sinks=sinks)
        mem_k = mem_v = mem_mask = None
        if self.memory is not None:
            mem_k, mem_v, mem_mask = self.memory.read(layer, q, local.local_start, scale, local.sink_length)
            if mem_k is not None and self.config.distance_cap is not None:
                mem_k = self.capped_memory(mem_k, new_positions)
        gate = self.memory_module.gates[self.memory_layers.index(layer)].to(q.device)
        out = memory_attention(q, k, v, mem_k, mem_v, mem_mask, gate=gate, fusion=self.config.fusion, scale=scale,
                               window=sliding_window, softcap=softcap, sinks=sinks,
                               dropout=dropout if module.training else 0.0, **capped)
        return out.transpose(1, 2)

    def capped_pairs(self, q: torch.Tensor, unrotated: torch.Tensor, query_positions: torch.Tensor,
                     cached_k: torch.Tensor | None, cached_positions: torch.Tensor | None) -> dict:
        """LM-Infinite's distance cap on the local context: where a key lies ``distance_cap`` or more before a query,
        the pair scores as if exactly ``distance_cap`` apart (q rotated to the cap, the key unrotated). ``unrotated``:
        the new keys; ``cached_k`` (unrotated) at ``cached_positions``: the local context before them. Returns the
        ``memory_attention`` arguments for those pairs ({} when there are none)."""
        cap = self.config.distance_cap
        key_positions = query_positions if cached_k is None else torch.cat((cached_positions, query_positions))
        far = (query_positions[:, None] - key_positions[None, :]) >= cap  # [n, ctx]
        if not bool(far.any()):
            return {}
        keys = unrotated if cached_k is None else torch.cat((cached_k.to(unrotated.dtype), unrotated), dim=2)
        return {"capped": far, "capped_q": self.positions.rotate(q, cap - query_positions), "capped_k": keys}

    def capped_memory(self, mem_k: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
        """Retrieved keys [batch, q_heads, n, top_k, d] (at the frame) moved, for queries farther than the cap from
        the frame, to ``distance_cap`` before the query."""
        frame = self.positions.frame(self.local.local_start, self.local.sink_length)
        shift = (query_positions - self.config.distance_cap - frame).clamp(min=0)
        if not bool(shift.any()):
            return mem_k
        return self.positions.rotate(mem_k, shift.view(1, 1, -1, 1).to(mem_k.device))

    def model_attention(self, module, q, k, v, *, scale, dropout, sliding_window, softcap, sinks) -> torch.Tensor:
        """The model's own attention of q [b, hq, n, d] over the local context k, v [b, hkv, ctx, d]."""
        kwargs = {"dropout": dropout}
        if softcap is not None:
            kwargs["softcap"] = softcap
        if sinks is not None:
            kwargs["s_aux"] = sinks
        mask = None  # flash attention is causal by itself (bottom-right aligned) and slides its own window
        if STREAMABLE[self.previous_attention]:  # eager and SDPA take masks as the model makes them: additive
            key = (q.shape[2], k.shape[2], sliding_window, q.dtype, q.device)
            if key not in self.masks:
                self.masks[key] = additive_mask(causal_mask(*key[:3], q.device), q.dtype)[None, None]
            mask = self.masks[key]
        attention = previous_function(module, self.previous_attention)
        out, _ = attention(module, q, k, v, mask, scaling=scale, sliding_window=sliding_window, **kwargs)
        return out

    def commit(self) -> None:
        """The forward succeeded: its tokens join the local context; a full segment closes and its oldest
        tokens enter memory."""
        evicted = self.local.commit()
        self.position_ids = None
        if evicted:
            self.last_added = {}
            for layer, (k, v) in evicted.items():
                if layer not in self.memory_layers or self.memory is None:
                    continue
                stored = self.memory.add(layer, k, v)
                if stored is not None:
                    self.last_added[layer] = stored

    def abort(self) -> None:
        """The forward failed: drop what it computed, keep everything stored."""
        self.local.abort()
        self.position_ids = None

    def clear_memory(self) -> None:
        """Empty the kNN memory and keep the document going: what enters next stands where it stands in it."""
        self.knn.reset()
        self.knn.memory_start = self.local.local_start

    def detach_graph(self) -> None:
        """Cut the graph behind the caches and the CrossBatch memory; keep their values."""
        self.local.detach_graph()
        if self.crossbatch is not None:
            self.memory.detach_()

    # ------------------------------------------------------------------------------- persistence

    @property
    def knn(self) -> KNNMemory | BlockMemory:
        """The memory stored documents hold the entries of (kNN or block retrieval)."""
        if not isinstance(self.memory, DOCUMENT_MEMORIES):
            raise ValueError("this stream has no kNN memory (no memory layers, or CrossBatch training)")
        return self.memory

    def add_memory(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append the document's next tokens, unrotated keys, values [batch, kv_heads, n, d], to a layer's memory."""
        self.knn.add(layer, keys, values)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """What continues this stream besides its memory entries: the local context's unrotated keys/values of
        every layer (``cache.{layer}.keys|values`` [batch, kv_heads, local, head_dim]) and the counters."""
        tensors, counters = self.local.state_dict()
        counters["memory_start"] = self.memory.memory_start if isinstance(self.memory, DOCUMENT_MEMORIES) else 0
        return tensors, counters

    def load_state_dict(self, tensors: dict[str, torch.Tensor], counters: dict[str, int]) -> None:
        """Restore what ``state_dict`` returned (memory entries are added separately with ``add_memory``)."""
        self.local.load_state_dict(tensors, counters, self.devices)
        if isinstance(self.memory, DOCUMENT_MEMORIES):
            self.memory.memory_start = int(counters.get("memory_start", 0))
