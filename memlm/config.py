"""MemoryConfig: what memory a model gets, validated before anything touches the model."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch

FUSIONS = ("gate", "joint")
MEMORY_POSITIONS = ("first", "original")
POSITION_MODES = ("rebase", "absolute")
INDEX_BACKENDS = ("torch", "faiss")
RETRIEVALS = ("tokens", "blocks")
BLOCK_SCORINGS = ("minmax", "representatives")
#: the fields of block retrieval: they mean nothing with retrieval="tokens" (and are left out of its fingerprint)
BLOCK_FIELDS = ("block_size", "top_blocks", "block_scoring", "block_representatives", "exact_block_queries",
                "hold_blocks", "block_neighbours", "pooled_selection_from")
MEMORY_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_integer(name: str, value: object, low: int = 0, optional: bool = False) -> int | None:
    """``value`` if it is an integer (not a bool) >= ``low`` (or None, when ``optional``); else a ValueError that
    names it and repeats it."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}an integer >= {low}, got {value!r}")
    return value


def option(text: str, default):
    """A dataclass field with a help string."""
    return field(default=default, metadata={"help": text})


@dataclass
class MemoryConfig:
    """How a document is streamed through a model and what it remembers (see docs/DESIGN.md)."""

    segment_length: int = option("tokens per forward pass", 512)
    xl_length: int = option("Transformer-XL cache per layer, in tokens (0 = off)", 512)
    memory_layers: tuple[int, ...] = option("layers with kNN memory; negative counts from the top; () = off", (-4,))
    top_k: int = option("memory entries each query retrieves", 32)
    memory_capacity: int = option("FIFO entries per sequence per memory layer", 65536)
    fusion: str = option("'gate' (Memorizing Transformers) or 'joint' (Focused Transformer, one softmax)", "gate")
    gate_init: float = option(
        "initial gate logit of every head (fusion='gate'); -4 lets an untrained memory supply at most 1.8% of a "
        "memory layer's output, so attaching it does not damage a model (README, 'Defaults')", -4.0
    )
    memory_positions: str = option(
        "'first': retrieved keys sit at position 0 of the local context; 'original': at their true distance",
        "first",
    )
    position_mode: str = option("'rebase': local positions restart at 0 every segment; 'absolute': document offsets",
                               "rebase")
    index: str = option("index backend: 'torch' or 'faiss'", "torch")
    index_kwargs: dict = field(
        default_factory=dict, metadata={"help": "extra arguments of the index backend, e.g. {'kind': 'ivf'}"}
    )
    memory_dtype: str | None = option("dtype of stored memory: 'float32', 'float16', 'bfloat16'; None = the model's",
                                     None)
    sink_tokens: int = option(
        "attention sinks (StreamingLLM / LM-Infinite): the document's first tokens stay in the local context for "
        "good, in front of the XL cache, instead of entering memory (0 = off)", 0
    )
    distance_cap: int | None = option(
        "LM-Infinite's distance cap: a key farther than this from its query (a sink, a memory entry) scores as if "
        "exactly this far; None = off", None
    )
    retrieval: str = option(
        "'tokens': each query retrieves its top_k memory entries (kNN); 'blocks': each forward selects, per layer "
        "and key/value head, the top_blocks blocks of block_size consecutive tokens and attends to them whole, in "
        "document order, just before the local context (InfLLM, Xiao et al. 2024; Quest, Tang et al. 2024)",
        "tokens",
    )
    block_size: int = option("tokens per memory block (retrieval='blocks'); divides segment_length", 128)
    top_blocks: int = option("blocks each forward selects per memory layer and key/value head", 4)
    block_scoring: str = option(
        "how a block is scored against a query: 'minmax' (Quest: the per-channel bound sum_c max(q_c min_c, "
        "q_c max_c) over the block's keys) or 'representatives' (InfLLM: the best of the block's "
        "block_representatives most central keys)", "minmax",
    )
    block_representatives: int = option("keys that represent a block (block_scoring='representatives')", 4)
    exact_block_queries: int = option(
        "forwards of at most this many queries per row (a question, each generated token) score every block "
        "exactly, by the attention it would draw ((1/scale) log sum exp(scale q.k) over its keys) instead of "
        "block_scoring's summary; longer forwards (the document's segments) use the summary. 0 = never", 64,
    )
    hold_blocks: bool = option(
        "a forward of one token per row (a generated token) reads the blocks the last longer forward (the prompt) "
        "selected while memory holds the same entries, instead of selecting by its one query: the answer reads "
        "what its question chose (a digit's own query selects the blocks full of numbers) and skips the scoring. "
        "False: every forward selects for itself", True,
    )
    block_neighbours: int = option(
        "blocks read on each side of every selected block (EM-LLM's contiguity buffer): a fact cut by a block "
        "boundary comes back whole; a forward reads up to top_blocks x (1 + 2 x block_neighbours) blocks", 0,
    )
    pooled_selection_from: int | None = option(
        "forwards scored exactly (at most exact_block_queries queries: a question) select, at this layer and every "
        "memory layer above it, one set of blocks for all key/value heads: each token's votes summed over the heads "
        "and the layers from this one up to the selecting one, a block ranked by its lift (the votes above the "
        "median of those it draws from the forward's tokens, summed: what the question's rare tokens single out, "
        "not what every token votes for); negative counts from the top; None = each layer and head selects for "
        "itself", None,
    )
    rmt_tokens: int = option("Recurrent Memory Transformer read/write tokens per segment (0 = off)", 0)
    rmt_bptt_depth: int | None = option(
        "with gradients enabled, cut the graph through RMT memory every k segments; None = never cut", None
    )

    def __post_init__(self) -> None:
        if isinstance(self.memory_layers, int) and not isinstance(self.memory_layers, bool):
            self.memory_layers = (self.memory_layers,)
        if isinstance(self.memory_layers, list):
            self.memory_layers = tuple(self.memory_layers)
        if isinstance(self.memory_dtype, torch.dtype):
            self.memory_dtype = str(self.memory_dtype).removeprefix("torch.")
        self.index_kwargs = dict(self.index_kwargs or {})
        for name, low in (("segment_length", 1), ("xl_length", 0), ("top_k", 1), ("memory_capacity", 1),
                          ("rmt_tokens", 0), ("sink_tokens", 0), ("block_size", 1), ("top_blocks", 1),
                          ("block_representatives", 1), ("exact_block_queries", 0), ("block_neighbours", 0)):
            check_integer(name, getattr(self, name), low)
        if not isinstance(self.memory_layers, tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.memory_layers
        ):
            raise ValueError(f"memory_layers must be a tuple of layer indices, got {self.memory_layers!r}")
        if len(set(self.memory_layers)) != len(self.memory_layers):
            raise ValueError(f"memory_layers lists a layer twice: {self.memory_layers!r}")
        if self.top_k > self.memory_capacity:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed memory_capacity ({self.memory_capacity})")
        for name, allowed in (("fusion", FUSIONS), ("memory_positions", MEMORY_POSITIONS),
                              ("position_mode", POSITION_MODES), ("index", INDEX_BACKENDS),
                          ("retrieval", RETRIEVALS), ("block_scoring", BLOCK_SCORINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.gate_init, (int, float)) or isinstance(self.gate_init, bool) or not math.isfinite(
            self.gate_init
        ):
            raise ValueError(f"gate_init must be a finite number, got {self.gate_init!r}")
        check_integer("rmt_bptt_depth", self.rmt_bptt_depth, 1, optional=True)
        check_integer("distance_cap", self.distance_cap, 1, optional=True)
        if self.pooled_selection_from is not None and (isinstance(self.pooled_selection_from, bool) or not isinstance(
                self.pooled_selection_from, int)):
            raise ValueError(f"pooled_selection_from must be None or a layer index (an integer), got "
                             f"{self.pooled_selection_from!r}")
        if self.distance_cap is not None and self.memory_positions == "original":
            raise ValueError("distance_cap caps the distances of memory_positions='first' (retrieved keys at the "
                             "local context's start); with 'original' every entry stands at its own distance")
        if self.sink_tokens and self.rmt_tokens:
            raise ValueError("sink_tokens with rmt_tokens is not supported: choose attention sinks or RMT memory "
                             "tokens")
        if self.memory_dtype is not None and self.memory_dtype not in MEMORY_DTYPES:
            raise ValueError(f"memory_dtype must be None or one of {tuple(MEMORY_DTYPES)}, got {self.memory_dtype!r}")
        if not isinstance(self.hold_blocks, bool):
            raise ValueError(f"hold_blocks must be True or False, got {self.hold_blocks!r}")
        if self.retrieval == "blocks":
            self.check_blocks()

    def check_blocks(self) -> None:
        """The settings block retrieval needs (``memory/block_memory.py``)."""
        if self.segment_length % self.block_size:
            raise ValueError(f"block_size ({self.block_size}) must divide segment_length ({self.segment_length}): a "
                             "closing segment hands whole blocks to memory")
        if self.memory_capacity % self.block_size:
            raise ValueError(f"memory_capacity ({self.memory_capacity}) must be a multiple of block_size "
                             f"({self.block_size}): memory evicts whole blocks")
        if self.pooled_selection_from is not None and not self.exact_block_queries:
            raise ValueError("pooled_selection_from pools the exact votes of short forwards: it needs "
                             "exact_block_queries > 0, got 0")
        if self.entries_read > self.memory_capacity:
            neighbours = f" and block_neighbours ({self.block_neighbours})" if self.block_neighbours else ""
            raise ValueError(f"top_blocks ({self.top_blocks}) x block_size ({self.block_size}){neighbours} read "
                             f"{self.entries_read} entries, more than memory holds (memory_capacity="
                             f"{self.memory_capacity})")
        if self.block_representatives > self.block_size:
            raise ValueError(f"block_representatives ({self.block_representatives}) cannot exceed block_size "
                             f"({self.block_size})")
        refused = {"memory_positions": (self.memory_positions, "first"), "distance_cap": (self.distance_cap, None),
                   "index": (self.index, "torch"), "index_kwargs": (self.index_kwargs, {})}
        for name, (value, needed) in refused.items():
            if value != needed:
                raise ValueError(f"retrieval='blocks' places the blocks it selects itself and searches no index: "
                                 f"{name} must be {needed!r}, got {value!r}")

    def resolve_layers(self, num_layers: int) -> tuple[int, ...]:
        """memory_layers as sorted non-negative indices of a model with ``num_layers`` layers."""
        for i in self.memory_layers:
            if not -num_layers <= i < num_layers:
                raise ValueError(
                    f"memory layer {i} is out of range for a model with {num_layers} layers "
                    f"(valid: {-num_layers} .. {num_layers - 1}); memory_layers={self.memory_layers}"
                )
        resolved = sorted(i % num_layers for i in self.memory_layers)
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"memory_layers {self.memory_layers} name one layer twice in a {num_layers}-layer model")
        return tuple(resolved)

    def resolve_pooled_from(self, num_layers: int) -> int | None:
        """pooled_selection_from as a non-negative layer index of a model with ``num_layers`` layers (None: off, or
        token retrieval); a ValueError when no memory layer lies at or above it."""
        pooled = self.pooled_selection_from
        if pooled is None or self.retrieval != "blocks" or not self.memory_layers:
            return None
        if not -num_layers <= pooled < num_layers:
            raise ValueError(f"pooled_selection_from {pooled} is out of range for a model with {num_layers} layers "
                             f"(valid: {-num_layers} .. {num_layers - 1})")
        pooled %= num_layers
        if max(self.resolve_layers(num_layers)) < pooled:
            raise ValueError(f"pooled_selection_from {self.pooled_selection_from} lies above every memory layer "
                             f"(memory_layers={self.memory_layers}): no layer would select by the pooled votes")
        return pooled

    @property
    def entries_read(self) -> int:
        """The most memory entries a forward of block retrieval reads: its blocks and their neighbours."""
        return self.top_blocks * (1 + 2 * self.block_neighbours) * self.block_size

    @property
    def block_span(self) -> int:
        """Positions the selected blocks (and their neighbours) occupy in front of the local context (0 without block
        retrieval)."""
        return self.entries_read if self.retrieval == "blocks" and self.memory_layers else 0

    def to_dict(self) -> dict:
        return {**asdict(self), "memory_layers": list(self.memory_layers)}

    @classmethod
    def from_dict(cls, values: dict) -> MemoryConfig:
        return cls(**known_fields(cls, values))


def known_fields(cls, values: dict) -> dict:
    """``values`` unchanged if every key is a field of the dataclass ``cls``; else a ValueError naming the others."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    return values
