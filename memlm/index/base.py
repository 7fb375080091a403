"""The interface of every memlm kNN memory, and the input checks they all share.

A memory index keeps, for every sequence of a batch and every key/value head, the keys and values of
the tokens that left a model's local context (Memorizing Transformers, Wu et al. 2022): at most
``capacity`` entries per sequence, the oldest evicted first. Entries are numbered per sequence in
insertion order (0, 1, 2, ...); those numbers are the ``ids`` a search returns.

Backends implement ``_add``, ``_search``, ``_reset``, ``_state`` / ``_load_state`` and ``size``;
everything a user can get wrong is checked here, before any backend state is touched.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .workspace import Workspace

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class SearchResult:
    """The ``k`` best entries for every query, best first.

    scores: [batch, heads, q, k] float32 inner products; -inf where ``mask`` is False.
    keys:   [batch, heads, q, k, dim] in the index dtype; zero where ``mask`` is False.
    values: [batch, heads, q, k, dim] in the index dtype; zero where ``mask`` is False.
    mask:   [batch, heads, q, k] bool; False where the sequence holds fewer than k entries.
    ids:    [batch, heads, q, k] int64 insertion numbers of the entries; -1 where ``mask`` is False.
    """

    scores: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    ids: torch.Tensor


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _all_finite(x: torch.Tensor) -> bool:
    """True when no entry is NaN or infinite (min and max propagate both; ten times cheaper than isfinite)."""
    return x.numel() == 0 or bool(torch.isfinite(torch.stack(x.aminmax())).all())


class MemoryIndex(ABC):
    """A FIFO kNN memory of ``capacity`` entries per sequence, for ``num_heads`` heads of ``dim``.

    Args:
        dim: size of every key and value vector.
        capacity: entries kept per sequence (all heads of a sequence evict together).
        batch_size: number of independent sequences.
        num_heads: key/value heads per sequence; each head has its own keys and values.
        device: where keys, values and results live.
        dtype: dtype of the stored values (and, where the backend can, keys); scores are float32.
    """

    backend: str = ""

    def __init__(
        self,
        *,
        dim: int,
        capacity: int,
        batch_size: int,
        num_heads: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.dim = _check_count("dim", dim)
        self.capacity = _check_count("capacity", capacity)
        self.batch_size = _check_count("batch_size", batch_size)
        self.num_heads = _check_count("num_heads", num_heads)
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
        self.dtype = dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._total = [0] * batch_size  # entries ever added to each sequence since its last reset
        self._workspace = Workspace()  # searches' scratch buffers, kept between searches

    # ----------------------------------------------------------------------------------- public API

    @property
    def total_added(self) -> torch.Tensor:
        """LongTensor [batch]: entries added to each sequence since it was last reset."""
        return torch.tensor(self._total, dtype=torch.long)

    @property
    @abstractmethod
    def size(self) -> torch.Tensor:
        """LongTensor [batch]: live entries per sequence."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held by the index: stored keys, values and the backend's own structures."""

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append entries to every sequence; the oldest are evicted beyond ``capacity``.

        keys, values: [batch, heads, n, dim]; n may exceed ``capacity`` (only the newest are kept).
        Stored without gradient, in the index dtype.
        """
        self._check_entries(keys, values)
        n = keys.shape[2]
        if n == 0:
            return
        self._add(keys.detach(), values.detach())
        self._total = [t + n for t in self._total]

    def search(self, queries: torch.Tensor, k: int, *, scratch: bool = False) -> SearchResult:
        """The ``k`` entries of largest inner product with each query, per sequence and head.

        queries: [batch, heads, q, dim], any float dtype (scored in float32).
        scratch: let the result's keys and values live in buffers this index reuses: valid until its next search,
            for a reader that consumes them at once. It saves allocating two [batch, heads, q, k, dim] tensors per
            search, whose page faults cost more than the gather itself (32 MiB each for 8 heads x 512 queries x
            k 32 x 64 dims). A graph kept across searches that saved them would be refused by autograd (the
            buffer's version moves), so readers pass it only without gradient.
        """
        self._check_queries(queries)
        _check_count("k", k)
        if int(self.size.max()) == 0 or queries.shape[2] == 0:
            return self._empty_result(queries.shape[2], k)
        return self._search(queries.detach().float(), k, scratch)

    def reset(self, rows: Iterable[int] | None = None) -> None:
        """Empty all sequences, or only the given batch rows."""
        if rows is None:
            rows = range(self.batch_size)
        rows = sorted(set(rows if not isinstance(rows, torch.Tensor) else rows.tolist()))
        for row in rows:
            if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self.batch_size:
                raise ValueError(f"reset rows must be integers in [0, {self.batch_size}), got {rows!r}")
        self._reset(rows)
        for row in rows:
            self._total[row] = 0

    def entries(self, row: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The live entries of sequence ``row`` in insertion order: keys, values [heads, n, dim] and the id of
        the first (ids before it were evicted)."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its entries in order; use an exact index "
                                  "(torch or faiss flat)")

    def state_dict(self) -> dict:
        """Everything needed to restore this index exactly: tensors plus a ``config`` dict."""
        return {"config": self._config(), "total_added": self.total_added, **self._state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict`` of an index created with the same arguments."""
        if not isinstance(state, dict) or "config" not in state:
            raise ValueError("expected a dict made by MemoryIndex.state_dict()")
        if state["config"] != self._config():
            raise ValueError(f"state was saved from an index with {state['config']}, this one has {self._config()}")
        self._load_state(state)
        self._total = [int(t) for t in state["total_added"]]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self._config().items())
        return f"{type(self).__name__}({args}, size={self.size.tolist()})"

    # ------------------------------------------------------------------------------ backend hooks

    @abstractmethod
    def _add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values: [batch, heads, n>0, dim], checked; ``self._total`` still holds the old counts."""

    @abstractmethod
    def _search(self, queries: torch.Tensor, k: int, scratch: bool) -> SearchResult:
        """queries: [batch, heads, q, dim] float32, checked; at least one sequence is non-empty. ``scratch``: the
        result's keys and values may live in ``_result_buffer``s."""

    @abstractmethod
    def _reset(self, rows: list[int]) -> None: ...

    @abstractmethod
    def _state(self) -> dict: ...

    @abstractmethod
    def _load_state(self, state: dict) -> None: ...

    def _config(self) -> dict:
        return {
            "backend": self.backend,
            "dim": self.dim,
            "capacity": self.capacity,
            "batch_size": self.batch_size,
            "num_heads": self.num_heads,
            "dtype": str(self.dtype),
        }

    # ------------------------------------------------------------------------------------ helpers

    def _result_buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, scratch: bool):
        """Where a search puts its ``name`` result (keys or values): a reused buffer with ``scratch``, else None
        (a fresh tensor)."""
        return self._workspace.get(f"result {name}", shape, dtype, self.device) if scratch else None

    def _empty_result(self, q: int, k: int) -> SearchResult:
        shape = (self.batch_size, self.num_heads, q, k)
        return SearchResult(
            scores=torch.full(shape, -math.inf, device=self.device),
            keys=torch.zeros(*shape, self.dim, dtype=self.dtype, device=self.device),
            values=torch.zeros(*shape, self.dim, dtype=self.dtype, device=self.device),
            mask=torch.zeros(shape, dtype=torch.bool, device=self.device),
            ids=torch.full(shape, -1, dtype=torch.long, device=self.device),
        )

    def _expected(self, what: str) -> str:
        return f"{what} of shape [batch={self.batch_size}, heads={self.num_heads}, n, dim={self.dim}]"

    def _check_tensor(self, name: str, x: object) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 4 or x.shape[0] != self.batch_size or x.shape[1] != self.num_heads or x.shape[3] != self.dim:
            raise ValueError(f"expected {self._expected(name)}, got {list(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device}, but this index lives on {self.device}")
        return x

    def _check_entries(self, keys: object, values: object) -> None:
        self._check_tensor("keys", keys)
        self._check_tensor("values", values)
        if keys.shape != values.shape:
            raise ValueError(
                f"keys and values must have the same shape, got {list(keys.shape)} and {list(values.shape)}"
            )
        # A NaN or inf key would win or poison every later search; refuse it before storing anything.
        for name, x in (("keys", keys), ("values", values)):
            if not _all_finite(x):
                raise ValueError(f"{name} contain NaN or infinite entries; nothing was added")

    def _check_queries(self, queries: object) -> None:
        self._check_tensor("queries", queries)
        if not _all_finite(queries):
            raise ValueError("queries contain NaN or infinite entries")
