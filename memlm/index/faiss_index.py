"""kNN memories searched by faiss (Johnson et al. 2017): exact ``flat`` and approximate ``ivf``.

``flat``: the ring buffer of ``ring.py`` searched by faiss' brute-force inner-product kNN
(``faiss.knn`` on the CPU, ``faiss.knn_gpu`` on CUDA tensors). Exact FIFO, O(n) adds, and memory
equal to the raw float32 keys plus the values.

``ivf``: one ``IndexIVFFlat`` per (sequence, head), trained with k-means on its first
``train_size`` entries (until then, entries wait in an exact buffer that is searched brute-force).
Searches visit ``nprobe`` of the ``nlist`` lists. With ``mips="euclidean"`` (the default) the lists hold the
keys in the Euclidean transform of Bachrach et al. (2014, "Speeding up the Xbox recommender system using a
Euclidean transformation for inner-product spaces"): each key gains a coordinate ``sqrt(M^2 - |k|^2)`` (``M``
the largest norm among the training keys; zeros pad the width to a multiple of 8) and each query a 0, so that
``|q - k'|^2 = |q|^2 + M^2 - 2 q.k`` and the nearest keys in L2 are those of largest inner product. k-means and
list probing then work as they do for nearest neighbours; on inner products directly they do not (lists whose
centroid has a large product need not hold the keys that do). Keys that arrive later with a norm above ``M`` go
to a small exact side buffer searched beside the lists. Returned scores are the float32 products of the
returned keys.

An IVF list cannot drop its oldest entry cheaply (``remove_ids`` scans every list), so eviction happens in
blocks of ``evict_block`` entries: one O(live) scan per block, i.e. O(live / evict_block) per added entry, and a
sequence then holds between ``capacity - evict_block`` and ``capacity`` entries. No id older than
``total_added - capacity`` is ever returned. Keys live inside faiss and again, in float32, in a ring buffer beside
the values: the lists propose ``k`` candidates per query and the ring's keys rank them (with the side buffer's) by
their exact products, cheaper than faiss' reconstruction of the keys it returns. faiss' GPU IVF cannot remove
entries, so the lists stay on the CPU even for a CUDA device; the rings live on the device.

faiss is an optional dependency (the ``cpu`` or ``gpu`` extra); it is imported when an index is made.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import MemoryIndex, SearchResult
from .ring import RingBuffer, RingIndex

MIPS = ("euclidean", "inner-product")


def lift(keys: np.ndarray, norm: float, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The Euclidean transform: keys [m, dim] -> which have a norm of at most ``norm`` ([m] bool), and those keys
    with the coordinate ``sqrt(norm^2 - |k|^2)`` appended, then zeros up to ``width`` ([inside, width] float32:
    faiss' distance kernels are several times slower on widths that are not a multiple of 8)."""
    squared = np.einsum("nd,nd->n", keys, keys)
    inside = squared <= norm * norm
    lifted = np.zeros((int(inside.sum()), width), dtype=np.float32)
    lifted[:, : keys.shape[1]] = keys[inside]
    lifted[:, keys.shape[1]] = np.sqrt(np.maximum(norm * norm - squared[inside], 0))
    return inside, lifted


def import_faiss():
    """faiss, or an ImportError that names the extra to install."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "the 'faiss' index backend needs faiss: pip install 'memlm[cpu]' (or 'memlm[gpu]' on a CUDA "
            "machine), or use the 'torch' backend"
        ) from error
    return faiss


class FaissFlatIndex(RingIndex):
    """Exact FIFO kNN memory searched by faiss (keys stored in float32, as faiss needs)."""

    backend = "faiss-flat"

    def __init__(self, **kwargs) -> None:
        self._faiss = import_faiss()
        super().__init__(key_dtype=torch.float32, **kwargs)
        self._gpu_resources = None
        if self.device.type == "cuda":
            if self._faiss.get_num_gpus() == 0:
                raise ValueError(
                    f"device {self.device} needs a GPU build of faiss (pip install 'memlm[gpu]'), "
                    "or use the 'torch' backend"
                )
            import faiss.contrib.torch_utils  # noqa: F401  (lets faiss.knn_gpu take torch tensors)

            self._gpu_resources = self._faiss.StandardGpuResources()

    def _topk(self, queries: torch.Tensor, k: int, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        faiss = self._faiss
        scores = torch.full((*queries.shape[:3], k), -math.inf, device=self.device)
        slots = torch.full((*queries.shape[:3], k), -1, dtype=torch.long, device=self.device)
        for row, size in enumerate(sizes):
            for head in range(self.num_heads):
                if size == 0:
                    continue
                keys = self._keys.data[row, head, :size]
                if self._gpu_resources is not None:
                    d, i = faiss.knn_gpu(
                        self._gpu_resources, queries[row, head], keys, k, metric=faiss.METRIC_INNER_PRODUCT
                    )
                    scores[row, head], slots[row, head] = d, i
                else:
                    d, i = faiss.knn(queries[row, head].numpy(), keys.numpy(), k, metric=faiss.METRIC_INNER_PRODUCT)
                    scores[row, head], slots[row, head] = torch.from_numpy(d), torch.from_numpy(i)
        return scores, slots


class FaissIVFIndex(MemoryIndex):
    """Approximate FIFO kNN memory: an inverted-file index per (sequence, head); see the module docstring.

    Args (beyond ``MemoryIndex``'s):
        nlist: number of k-means lists; default about sqrt(capacity).
        nprobe: lists visited per query (more: slower, better recall); at most ``nlist``;
            default max(8, nlist // 16).
        train_size: entries a sequence collects before its lists are trained; default
            min(capacity, 40 * nlist).
        evict_block: entries evicted at once when full; default capacity // 16.
        mips: ``"euclidean"`` (lists over the Euclidean transform of the keys, see the module docstring) or
            ``"inner-product"`` (faiss' inner-product lists over the keys as they are).
    """

    backend = "faiss-ivf"

    def __init__(self, *, nlist=None, nprobe=None, train_size=None, evict_block=None, mips="euclidean",
                 **kwargs) -> None:
        self._faiss = import_faiss()
        super().__init__(**kwargs)
        if mips not in MIPS:
            raise ValueError(f"mips must be one of {MIPS}, got {mips!r}")
        self.mips = mips
        # the vectors in the lists: the keys, plus the transform's coordinate padded to a multiple of 8
        self.width = self.dim if mips == "inner-product" else math.ceil((self.dim + 1) / 8) * 8
        self.nlist = nlist if nlist is not None else max(1, min(self.capacity, round(math.sqrt(self.capacity))))
        self.train_size = train_size if train_size is not None else min(self.capacity, 40 * self.nlist)
        self.evict_block = evict_block if evict_block is not None else max(1, self.capacity // 16)
        self.nprobe = nprobe if nprobe is not None else min(self.nlist, max(8, self.nlist // 16))
        for name in ("nlist", "nprobe", "train_size", "evict_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.nprobe > self.nlist:
            raise ValueError(f"nprobe ({self.nprobe}) cannot exceed nlist ({self.nlist})")
        if not self.nlist <= self.train_size <= self.capacity:
            raise ValueError(
                f"train_size must lie in [nlist={self.nlist}, capacity={self.capacity}], got {self.train_size}"
            )
        shape = (self.batch_size, self.num_heads, self.capacity, self.dim)
        self._values = RingBuffer(*shape, dtype=self.dtype, device=self.device)
        # the keys again, in float32 beside the lists: a search ranks its candidates by their exact products from
        # here (faiss' reconstruction of the returned keys costs as much again as the search itself)
        self._keys = RingBuffer(*shape, dtype=torch.float32, device=self.device)
        self._ivf = [[self._new_ivf() for _ in range(self.num_heads)] for _ in range(self.batch_size)]
        self._pending = [self._no_pending() for _ in range(self.batch_size)]  # [heads, p, dim] untrained
        self._oldest = [0] * self.batch_size  # id of each sequence's oldest live entry
        # euclidean: per (sequence, head) the norm M of the transform, and the ids of the keys above it
        self._norm_cap = np.zeros((self.batch_size, self.num_heads), dtype=np.float32)
        self._outside = [[self._nothing_outside() for _ in range(self.num_heads)] for _ in range(self.batch_size)]

    def _new_ivf(self):
        faiss = self._faiss
        if self.mips == "euclidean":
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(self.width), self.width, self.nlist, faiss.METRIC_L2)
        else:
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.nprobe = self.nprobe
        return ivf

    @staticmethod
    def _nothing_outside() -> np.ndarray:
        return np.zeros(0, dtype=np.int64)

    def _into_lists(self, row: int, head: int, keys: np.ndarray, ids: np.ndarray) -> None:
        """Add keys [m, dim] with their ids to a trained (sequence, head): transformed into its lists, or (above
        the transform's norm) into its side buffer."""
        ivf = self._ivf[row][head]
        if self.mips == "inner-product":
            ivf.add_with_ids(np.ascontiguousarray(keys), ids)
            return
        inside, lifted = lift(keys, self._norm_cap[row, head], self.width)
        ivf.add_with_ids(lifted, ids[inside])
        if not inside.all():
            self._outside[row][head] = np.concatenate([self._outside[row][head], ids[~inside]])

    def _no_pending(self) -> np.ndarray:
        return np.zeros((self.num_heads, 0, self.dim), dtype=np.float32)

    @property
    def size(self) -> torch.Tensor:
        return torch.tensor([t - o for t, o in zip(self._total, self._oldest, strict=True)], dtype=torch.long)

    @property
    def nbytes(self) -> int:
        ids = 8  # faiss keeps an int64 id beside every vector
        stored = sum(ivf.ntotal for row in self._ivf for ivf in row) * (4 * self.width + ids)
        lists = sum(ivf.nlist * self.width * 4 for row in self._ivf for ivf in row if ivf.is_trained)
        pending = sum(p.nbytes for p in self._pending)
        outside = sum(ids.nbytes for row in self._outside for ids in row)
        return self._values.nbytes + self._keys.nbytes + stored + lists + pending + outside

    def _add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = keys.shape[2]
        keep = min(n, self.capacity)
        keys_np = keys[:, :, n - keep :].float().cpu().numpy()
        for row, total in enumerate(self._total):
            first = total + n - keep  # id of the first kept entry
            self._values.write(row, first, values[row, :, n - keep :].to(self.dtype))
            self._keys.write(row, first, keys[row, :, n - keep :].float())
            if not self._ivf[row][0].is_trained:
                self._collect(row, first, keys_np[row])
            else:
                self._evict(row, first + keep)
                ids = np.arange(first, first + keep, dtype=np.int64)
                for head in range(self.num_heads):
                    self._into_lists(row, head, keys_np[row, head], ids)

    def _collect(self, row: int, first: int, keys: np.ndarray) -> None:
        """Buffer keys [heads, m, dim] of an untrained sequence; train once ``train_size`` are there."""
        pending = np.concatenate([self._pending[row], keys], axis=1)
        end = first + keys.shape[1]
        self._oldest[row] = max(end - pending.shape[1], end - self.capacity)  # exact FIFO while buffered
        pending = pending[:, pending.shape[1] - (end - self._oldest[row]) :]
        if pending.shape[1] < self.train_size:
            self._pending[row] = np.ascontiguousarray(pending)
            return
        ids = np.arange(self._oldest[row], end, dtype=np.int64)
        for head, ivf in enumerate(self._ivf[row]):
            sample = np.ascontiguousarray(pending[head, : self.train_size])
            if self.mips == "euclidean":  # M: the largest norm of the keys entering now
                self._norm_cap[row, head] = np.sqrt(np.einsum("nd,nd->n", pending[head], pending[head]).max())
                sample = lift(sample, self._norm_cap[row, head], self.width)[1]
            ivf.train(sample)
            self._into_lists(row, head, pending[head], ids)
        self._pending[row] = self._no_pending()

    def _evict(self, row: int, end: int) -> None:
        """Make room so that sequence ``row`` holds at most ``capacity`` entries once ids up to ``end`` are in."""
        oldest, total = self._oldest[row], self._total[row]
        needed = end - self.capacity
        if needed <= oldest:
            return
        cut = max(needed, min(oldest + self.evict_block, total))  # past ``total`` when an add overflows alone
        for ivf in self._ivf[row]:
            ivf.remove_ids(self._faiss.IDSelectorRange(oldest, min(cut, total)))
        for head, ids in enumerate(self._outside[row]):
            self._outside[row][head] = ids[ids >= cut]
        self._oldest[row] = cut

    def _search(self, queries: torch.Tensor, k: int, scratch: bool) -> SearchResult:
        batch, heads, q, dim = queries.shape
        # candidate ids per query (-1: none): the lists' k nearest and the side buffer's k best, or the untrained
        # buffer's k best; ranked below by their exact float32 products
        candidates = np.full((batch, heads, q, 2 * k), -1, dtype=np.int64)
        queries_np = queries.cpu().numpy()
        for row in range(batch):
            pending = self._pending[row]
            for head, ivf in enumerate(self._ivf[row]):
                if ivf.is_trained:
                    found = self._candidates(row, head, queries_np[row, head], queries[row, head], k)
                elif pending.shape[1]:
                    metric = self._faiss.METRIC_INNER_PRODUCT
                    _, i = self._faiss.knn(queries_np[row, head], pending[head], k, metric=metric)
                    found = np.where(i >= 0, i + self._oldest[row], -1)
                else:
                    continue
                candidates[row, head, :, : found.shape[1]] = found
        ids = torch.from_numpy(candidates).to(self.device)
        slots = torch.where(ids >= 0, ids.remainder(self.capacity), -1)
        ranked = self._keys.gather(slots, self._workspace.get("candidates", (*slots.shape, dim), torch.float32,
                                                              self.device))  # zero where no candidate
        scores = torch.einsum("bhqcd,bhqd->bhqc", ranked, queries).masked_fill(ids < 0, -math.inf)
        scores, best = scores.topk(k, dim=-1)  # -inf where a query has fewer than k candidates
        ids, slots = ids.gather(-1, best), slots.gather(-1, best)
        shape = (*best.shape, dim)
        keys = torch.gather(ranked, 3, best.unsqueeze(-1).expand(shape),
                            out=self._result_buffer("keys", shape, torch.float32, scratch))
        return SearchResult(
            scores=scores,
            keys=keys.to(self.dtype),
            values=self._values.gather(slots, self._result_buffer("values", shape, self.dtype, scratch)),
            mask=ids >= 0,
            ids=ids,
        )

    def _candidates(self, row: int, head: int, queries_np: np.ndarray, queries: torch.Tensor, k: int) -> np.ndarray:
        """Ids [q, <= 2k] (-1: none) worth ranking for a trained (sequence, head): its lists' k nearest to the
        queries [q, dim], and the k of largest product among the keys kept beside the lists."""
        ivf, found = self._ivf[row][head], [np.zeros((len(queries_np), 0), dtype=np.int64)]
        if ivf.ntotal:
            lifted = np.zeros((len(queries_np), self.width), dtype=np.float32)  # queries gain zeros
            lifted[:, : self.dim] = queries_np
            found.append(ivf.search(lifted, k)[1])
        outside = self._outside[row][head]
        if len(outside):  # keys beyond the transform's norm: searched exactly
            held = torch.from_numpy(outside).to(self.device)
            keys = self._keys.data[row, head].index_select(0, held.remainder(self.capacity))
            best = (queries @ keys.T).topk(min(k, len(outside)), dim=-1).indices
            found.append(held[best].cpu().numpy())
        return np.concatenate(found, axis=1)

    def _reset(self, rows: list[int]) -> None:
        for row in rows:
            self._outside[row] = [self._nothing_outside() for _ in range(self.num_heads)]
            self._keys.clear(row)
            for ivf in self._ivf[row]:
                ivf.reset()  # drops the entries, keeps the trained lists
            self._pending[row] = self._no_pending()
            self._values.clear(row)
            self._oldest[row] = 0

    def _config(self) -> dict:
        extra = {"nlist": self.nlist, "train_size": self.train_size, "evict_block": self.evict_block,
                 "mips": self.mips}
        return {**super()._config(), **extra}

    def _state(self) -> dict:
        faiss = self._faiss
        state = {"values": self._values.data.clone(), "keys": self._keys.data.clone(),
                 "oldest": torch.tensor(self._oldest, dtype=torch.long),
                 "norm_cap": torch.from_numpy(self._norm_cap.copy())}
        for row in range(self.batch_size):
            state[f"pending.{row}"] = torch.from_numpy(self._pending[row].copy())
            for head, ivf in enumerate(self._ivf[row]):
                state[f"ivf.{row}.{head}"] = torch.from_numpy(faiss.serialize_index(ivf))
                state[f"outside.{row}.{head}"] = torch.from_numpy(self._outside[row][head].copy())
        return state

    def _load_state(self, state: dict) -> None:
        faiss = self._faiss
        self._values.data = state["values"].to(self.device, self.dtype).clone()
        self._keys.data = state["keys"].to(self.device, torch.float32).clone()
        self._oldest = [int(o) for o in state["oldest"]]
        self._norm_cap = state["norm_cap"].numpy().astype(np.float32, copy=True)
        for row in range(self.batch_size):
            self._pending[row] = state[f"pending.{row}"].numpy().astype(np.float32, copy=True)
            for head in range(self.num_heads):
                ivf = faiss.deserialize_index(state[f"ivf.{row}.{head}"].numpy())
                ivf.nprobe = self.nprobe
                self._ivf[row][head] = ivf
                self._outside[row][head] = state[f"outside.{row}.{head}"].numpy().astype(np.int64, copy=True)
