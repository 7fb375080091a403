"""kNN memories searched by faiss (Johnson et al. 2017): exact ``flat`` and approximate ``ivf``.

``flat``: the ring buffer of ``ring.py`` searched by faiss' brute-force inner-product kNN
(``faiss.knn`` on the CPU, ``faiss.knn_gpu`` on CUDA tensors). Exact FIFO, O(n) adds, and memory
equal to the raw float32 keys plus the values.

``ivf``: one ``IndexIVFFlat`` per (sequence, head), trained with k-means on its first
``train_size`` entries (until then, entries wait in an exact buffer that is searched brute-force).
Searches visit ``nprobe`` of the ``nlist`` lists. An IVF list cannot drop its oldest entry cheaply
(``remove_ids`` scans every list), so eviction happens in blocks of ``evict_block`` entries: one
O(live) scan per block, i.e. O(live / evict_block) per added entry, and a sequence then holds
between ``capacity - evict_block`` and ``capacity`` entries. No id older than
``total_added - capacity`` is ever returned. Keys live only inside faiss (a search reconstructs the
ones it returns); values live in a ring buffer. faiss' GPU IVF cannot remove entries, so the IVF
index stays on the CPU even for a CUDA device; its results are moved to the device.

faiss is an optional dependency (the ``cpu`` or ``gpu`` extra); it is imported when an index is made.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import MemoryIndex, SearchResult
from .ring import RingBuffer, RingIndex


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
    """

    backend = "faiss-ivf"

    def __init__(self, *, nlist=None, nprobe=None, train_size=None, evict_block=None, **kwargs) -> None:
        self._faiss = import_faiss()
        super().__init__(**kwargs)
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
        self._values = RingBuffer(
            self.batch_size, self.num_heads, self.capacity, self.dim, dtype=self.dtype, device=self.device
        )
        self._ivf = [[self._new_ivf() for _ in range(self.num_heads)] for _ in range(self.batch_size)]
        self._pending = [self._no_pending() for _ in range(self.batch_size)]  # [heads, p, dim] untrained
        self._oldest = [0] * self.batch_size  # id of each sequence's oldest live entry

    def _new_ivf(self):
        faiss = self._faiss
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.nprobe = self.nprobe
        return ivf

    def _no_pending(self) -> np.ndarray:
        return np.zeros((self.num_heads, 0, self.dim), dtype=np.float32)

    @property
    def size(self) -> torch.Tensor:
        return torch.tensor([t - o for t, o in zip(self._total, self._oldest, strict=True)], dtype=torch.long)

    @property
    def nbytes(self) -> int:
        ids = 8  # faiss keeps an int64 id beside every vector
        stored = sum(ivf.ntotal for row in self._ivf for ivf in row) * (4 * self.dim + ids)
        lists = sum(ivf.nlist * self.dim * 4 for row in self._ivf for ivf in row if ivf.is_trained)
        pending = sum(p.nbytes for p in self._pending)
        return self._values.nbytes + stored + lists + pending

    def _add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = keys.shape[2]
        keep = min(n, self.capacity)
        keys_np = keys[:, :, n - keep :].float().cpu().numpy()
        for row, total in enumerate(self._total):
            first = total + n - keep  # id of the first kept entry
            self._values.write(row, first, values[row, :, n - keep :].to(self.dtype))
            if not self._ivf[row][0].is_trained:
                self._collect(row, first, keys_np[row])
            else:
                self._evict(row, first + keep)
                ids = np.arange(first, first + keep, dtype=np.int64)
                for head, ivf in enumerate(self._ivf[row]):
                    ivf.add_with_ids(keys_np[row, head], ids)

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
            ivf.train(np.ascontiguousarray(pending[head, : self.train_size]))
            ivf.add_with_ids(np.ascontiguousarray(pending[head]), ids)
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
        self._oldest[row] = cut

    def _search(self, queries: torch.Tensor, k: int, scratch: bool) -> SearchResult:
        batch, heads, q, dim = queries.shape
        scores = np.full((batch, heads, q, k), -np.inf, dtype=np.float32)
        ids = np.full((batch, heads, q, k), -1, dtype=np.int64)
        keys = np.zeros((batch, heads, q, k, dim), dtype=np.float32)
        queries_np = queries.cpu().numpy()
        for row in range(batch):
            pending = self._pending[row]
            for head, ivf in enumerate(self._ivf[row]):
                if ivf.is_trained:
                    if ivf.ntotal:
                        d, i, r = ivf.search_and_reconstruct(queries_np[row, head], k)
                        scores[row, head], ids[row, head], keys[row, head] = d, i, r
                elif pending.shape[1]:
                    metric = self._faiss.METRIC_INNER_PRODUCT
                    d, i = self._faiss.knn(queries_np[row, head], pending[head], k, metric=metric)
                    scores[row, head] = d
                    keys[row, head] = pending[head][np.maximum(i, 0)]
                    ids[row, head] = np.where(i >= 0, i + self._oldest[row], -1)
        mask = torch.from_numpy(ids >= 0).to(self.device)
        ids_t = torch.from_numpy(ids).to(self.device)
        slots = torch.where(mask, ids_t.remainder(self.capacity), -1)
        return SearchResult(
            scores=torch.from_numpy(scores).to(self.device).masked_fill(~mask, -math.inf),
            keys=torch.from_numpy(keys).to(self.device, self.dtype).masked_fill(~mask.unsqueeze(-1), 0),
            values=self._values.gather(slots, self._result_buffer("values", (*slots.shape, dim), self.dtype, scratch)),
            mask=mask,
            ids=ids_t,
        )

    def _reset(self, rows: list[int]) -> None:
        for row in rows:
            for ivf in self._ivf[row]:
                ivf.reset()  # drops the entries, keeps the trained lists
            self._pending[row] = self._no_pending()
            self._values.clear(row)
            self._oldest[row] = 0

    def _config(self) -> dict:
        extra = {"nlist": self.nlist, "train_size": self.train_size, "evict_block": self.evict_block}
        return {**super()._config(), **extra}

    def _state(self) -> dict:
        faiss = self._faiss
        state = {"values": self._values.data.clone(), "oldest": torch.tensor(self._oldest, dtype=torch.long)}
        for row in range(self.batch_size):
            state[f"pending.{row}"] = torch.from_numpy(self._pending[row].copy())
            for head, ivf in enumerate(self._ivf[row]):
                state[f"ivf.{row}.{head}"] = torch.from_numpy(faiss.serialize_index(ivf))
        return state

    def _load_state(self, state: dict) -> None:
        faiss = self._faiss
        self._values.data = state["values"].to(self.device, self.dtype).clone()
        self._oldest = [int(o) for o in state["oldest"]]
        for row in range(self.batch_size):
            self._pending[row] = state[f"pending.{row}"].numpy().astype(np.float32, copy=True)
            for head in range(self.num_heads):
                ivf = faiss.deserialize_index(state[f"ivf.{row}.{head}"].numpy())
                ivf.nprobe = self.nprobe
                self._ivf[row][head] = ivf
