"""The exact kNN memory in plain torch: ring-buffer keys and values, batched matmul + top-k.

Searching 65K keys per head is dominated by two costs, and both are avoided here:

* Allocating a fresh [heads, q, capacity] score tensor for every search costs more than the
  matmul itself (page faults). Queries are scored in blocks of ``search_block_queries`` into one
  buffer that the index keeps between searches, as keys @ queries^T so that BLAS streams the key
  matrix instead of repacking it for every block (1.3x faster than queries @ keys^T at 12 heads x
  65K keys on a 2-core CPU).
* ``topk`` over every score is as slow again as the matmul. Slots are split into ``GROUP`` strided
  groups (group j = slots j, j + G, j + 2G, ...; a max over them is one vectorised pass), the k
  groups with the largest maxima are picked, and top-k runs over their k * GROUP members only.
  That is exact: a group holding one of the true top-k entries has a maximum at least as large as
  that entry, and each group ranked above it holds a different, larger entry, so at most k - 1
  groups can rank above it.

Works on any device torch supports, in float32, float16 and bfloat16 storage; scores are float32.

``search="distinct"`` scores each distinct key once and keeps the slots of its copies (``distinct.py``): the same
entries, for memories whose keys repeat exactly (memlm-tiny's, whose memory layer's keys are a function of the
token), at a cost that grows with the distinct keys, not the entries. ``"auto"`` keeps the distinct keys of
half-precision memories (where repeated keys round to the same bits) and searches them while they pay: once a
memory of at least ``distinct_trial`` entries per sequence holds more than ``distinct_share`` of them as distinct
keys, it drops them for good.

``search="two-stage"`` screens the keys in bfloat16 first and re-scores only the entries that can still win
(``two_stage.py``: same answer, with a margin argument for why); ``"auto"`` (the default) takes it where
bfloat16 matmul runs in hardware (CUDA with bfloat16, CPUs with AVX512-BF16 or AMX) and the search is large
enough for the screen to pay (the gates below, as measured by ``benchmarks/bench_index.py --crossover``; on CPUs
the compiled screen pays from 4,096 entries and 8 queries per head). The screen costs ``2 * dim + 8`` bytes per
entry (a bfloat16 copy of the key, its norm and rounding residual; ``8`` when keys are stored in bfloat16 already).
"""

from __future__ import annotations

import math

import torch

from .distinct import DistinctKeyTable, distinct_topk
from .ring import RingBuffer, RingIndex
from .two_stage import GROUP, compiled_screen, key_bounds, two_stage_topk

SEARCHES = ("auto", "exact", "two-stage", "distinct")


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matmul runs in hardware on ``device`` (torch's own CPU capability queries)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


class TorchIndex(RingIndex):
    """Exact FIFO kNN memory on the tensors' own device (see the module docstring).

    Args:
        search: ``"exact"`` (float32 scores of every entry), ``"two-stage"`` (a bfloat16 screen, then exact
            re-scores of the entries that can still win: the same answer), ``"auto"`` (distinct keys for
            half-precision memories while they repeat, else two-stage where bfloat16 matmul runs in hardware) or
            ``"distinct"`` (every distinct key scored once: the same answer, up
            to which copies of a key come back, newest first).
        other arguments: see ``MemoryIndex``.
    """

    backend = "torch"
    slot_multiple = GROUP
    #: queries scored per block (BLAS is fastest with a few dozen), and the score buffer's upper bound
    search_block_queries = 64
    search_block_bytes = 256 * 2**20
    #: half-precision keys are widened to float32 this many bytes at a time for the one-stage search
    widen_block_bytes = 4 * 2**20
    #: two-stage: the bytes of a row's screened block (at most, the first one in screen.cpp), of the compiled
    #: screen's blocks of all threads together, queries per screened chunk, the mean survivors per query (in units
    #: of k) beyond which it gives up (near ties), and whether CPUs run the compiled screen (screen.cpp)
    two_stage_block_bytes = 16 * 2**20
    two_stage_native_bytes = 32 * 2**20
    two_stage_queries = 512
    two_stage_candidate_limit = 16
    two_stage_native = True
    #: auto: where the screen pays (``benchmarks/bench_index.py --crossover``): heads of at least auto_min_dim,
    #: and with screen.cpp memories of two_stage_min_entries and auto_min_queries queries per head; the torch
    #: screen (CUDA, or no C++ compiler) needs torch_screen_min_entries and queries x dim of torch_screen_min_work
    auto_min_dim = 16
    two_stage_min_entries = 4096
    auto_min_queries = 8
    torch_screen_min_entries = 8192
    torch_screen_min_work = 8192  # 128 queries of 64 dims, 512 of 16
    #: auto: after a screen gave up, the next 1, 2, 4, ... (at most this many) searches it would take run one stage
    auto_backoff = 64
    #: distinct: the newest copies of each key kept for results (a search for more per query scores every entry);
    #: auto: the entries per sequence after which, and the share of distinct keys above which, it stops keeping them
    distinct_keep = 64
    distinct_trial = 4096
    distinct_share = 0.25

    def __init__(self, *, search: str = "auto", **kwargs) -> None:
        super().__init__(**kwargs)
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
        self.search_mode = search
        # auto never screens heads below auto_min_dim: they get no screen to keep either
        self.two_stage = search == "two-stage" or (search == "auto" and self.dim >= self.auto_min_dim
                                                   and fast_bfloat16(self.device))
        # the route the last search took: "two-stage", "exact", or "screen gave up" (tried, then ran one stage)
        self.last_search: str | None = None
        self._skipped_screens, self._backoff = 0, 1  # auto's back-off after screens that gave up
        self._screen: RingBuffer | None = None  # bfloat16 keys (None: the keys are bfloat16 already)
        self._bounds: RingBuffer | None = None  # per entry: key norm and bfloat16 rounding residual norm
        repeats = search == "distinct" or (search == "auto" and self._keys.data.dtype in (torch.float16,
                                                                                          torch.bfloat16))
        self._distinct = None if not repeats else DistinctKeyTable(
            self.batch_size, self.num_heads, self.dim, self.capacity, self.distinct_keep,
            dtype=self._keys.data.dtype, device=self.device, multiple=GROUP)
        if self.two_stage:
            shape = (self.batch_size, self.num_heads, self.capacity)
            common = {"device": self.device, "multiple": self.slot_multiple}
            if self._keys.data.dtype != torch.bfloat16:
                self._screen = RingBuffer(*shape, self.dim, dtype=torch.bfloat16, **common)
            self._bounds = RingBuffer(*shape, 2, dtype=torch.float32, **common)

    @property
    def compiled_screen(self) -> bool:
        """Whether the two-stage search runs screen.cpp (a CPU index, ``two_stage_native``, and it could be built;
        the first call builds it)."""
        return self.two_stage_native and compiled_screen(self.device) is not None

    @property
    def nbytes(self) -> int:
        derived = sum(part.nbytes for part in (self._screen, self._bounds, self._distinct) if part is not None)
        return super().nbytes + derived

    def _wrote_keys(self, row: int, first_id: int, keys: torch.Tensor) -> None:
        if self._distinct is not None:
            self._distinct.add(row, first_id, keys)
        if not self.two_stage:
            return
        screen = keys.to(torch.bfloat16)  # keys themselves when stored in bfloat16
        if self._screen is not None:
            self._screen.write(row, first_id, screen)
        self._bounds.write(row, first_id, key_bounds(keys, screen))

    def _reset(self, rows: list[int]) -> None:
        super()._reset(rows)
        if self._distinct is not None:
            for row in rows:
                self._distinct.reset(row)
        for ring in (self._screen, self._bounds):
            if ring is not None:
                for row in rows:
                    ring.clear(row)

    def _load_state(self, state: dict) -> None:
        super()._load_state(state)
        if self._distinct is not None:  # derived: the live entries replayed oldest first
            for row, total in enumerate(int(t) for t in state["total_added"]):
                self._distinct.reset(row)
                start = max(0, total - self.capacity)
                while start < total:  # at most two runs of slots: to the end of the ring, then from its start
                    end = min(total, (start // self.capacity + 1) * self.capacity)
                    first_slot = start % self.capacity
                    self._distinct.add(row, start, self._keys.data[row, :, first_slot : first_slot + end - start])
                    start = end
        if not self.two_stage:
            return
        keys = self._keys.data  # the screen is derived: rebuilt from the restored keys
        screen = keys.to(torch.bfloat16)
        if self._screen is not None:
            self._screen.data = screen
        self._bounds.data = key_bounds(keys, screen)

    def _topk(self, queries: torch.Tensor, k: int, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        self.last_search = "exact"
        if self._distinct is not None and self.search_mode == "auto" and min(sizes) >= self.distinct_trial:
            distinct = sum(len(row.lookup) for row in self._distinct.rows)
            if distinct > self.distinct_share * sum(sizes):
                self._distinct = None  # keys that rarely repeat: scoring them all is cheaper than keeping them
        if self._distinct is not None and k <= self.distinct_keep:
            self.last_search = "distinct"
            return self._distinct_topk(queries, k)
        if self._screens(k, sizes, queries.shape[2]):
            found = self._two_stage_topk(queries, k, sizes)
            if found is not None:
                self.last_search = "two-stage"
                self._backoff = 1
                return found
            self.last_search = "screen gave up"
            if self.search_mode == "auto":  # the keys bunch, and a FIFO memory changes slowly: wait before retrying
                self._skipped_screens, self._backoff = self._backoff, min(2 * self._backoff, self.auto_backoff)
        return self._exact_topk(queries, k, sizes)

    def _screens(self, k: int, sizes: list[int], queries: int) -> bool:
        """Whether this search takes the two-stage route (see ``two_stage.py`` for when it would give up)."""
        if not self.two_stage or min(sizes) < 4 * k * GROUP:
            return False
        if self.search_mode == "auto":
            if self.compiled_screen:
                pays = min(sizes) >= self.two_stage_min_entries and queries >= self.auto_min_queries
            else:
                pays = min(sizes) >= self.torch_screen_min_entries and queries * self.dim >= self.torch_screen_min_work
            if not pays:
                return False
            if self._skipped_screens:
                self._skipped_screens -= 1
                return False
        # cuBLAS may reduce bfloat16 partial sums in bfloat16, which the screen's error bound does not cover
        return self.device.type != "cuda" or not torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction

    def _two_stage_topk(self, queries: torch.Tensor, k: int, sizes: list[int]):
        batch, heads, q, dim = queries.shape
        rows = batch * heads
        allocated = self._keys.data.shape[2]
        keys = self._keys.data.view(rows, allocated, dim)
        screen = keys if self._screen is None else self._screen.data.view(rows, allocated, dim)
        bounds = self._bounds.data.view(rows, allocated, 2).amax(dim=1)  # [rows, 2]: dead slots hold zeros
        live = torch.tensor(sizes, device=self.device).repeat_interleave(heads)
        chunk = min(q, self.two_stage_queries)
        block = max(GROUP, self.two_stage_block_bytes // (2 * chunk) // GROUP * GROUP)
        flat = queries.reshape(rows, q, dim)
        scan = math.ceil(max(sizes) / GROUP) * GROUP
        chunks = []
        for start in range(0, q, chunk):
            found = two_stage_topk(screen, keys, bounds, flat[:, start : start + chunk], live, k, slots=scan,
                                   block=block, candidate_limit=self.two_stage_candidate_limit * k,
                                   workspace=self._workspace, native=self.two_stage_native,
                                   native_bytes=self.two_stage_native_bytes)
            if found is None:
                return None
            chunks.append(found)
        scores, slots = (torch.cat(parts, dim=1).view(batch, heads, q, k) for parts in zip(*chunks, strict=True))
        return scores, slots

    def _distinct_topk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best distinct keys of each query (one-stage, over the table), then their copies (``distinct.py``)."""
        batch, heads, q, dim = queries.shape
        table = self._distinct.keys
        rows = table.shape[2]
        # kept between searches, as the one-stage search's (fresh hundreds of MB would cost page faults)
        scores = self._workspace.get("distinct scores", (batch * heads, rows, q), torch.float32, queries.device)
        self._score(table.view(batch * heads, rows, dim), queries.reshape(batch * heads, q, dim).transpose(1, 2),
                    scores)
        dead = ~self._distinct.live()  # [batch, rows]
        scores.view(batch, heads, rows, q).masked_fill_(dead[:, None, :, None], -math.inf)
        c = min(k, rows)
        if rows // GROUP > 4 * c:
            best, best_keys = self._grouped_topk(scores, c)
        else:
            best, best_keys = scores.topk(c, dim=1)
        best, best_keys = (t.transpose(1, 2).reshape(batch, heads, q, c) for t in (best, best_keys))
        return distinct_topk(self._distinct, best, best_keys, k)

    def _exact_topk(self, queries: torch.Tensor, k: int, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, q, dim = queries.shape
        slots = math.ceil(max(sizes) / GROUP) * GROUP  # allocated storage is a multiple of GROUP
        keys = self._keys.data[:, :, :slots].reshape(batch * heads, slots, dim)  # a view: no copy
        queries_t = queries.reshape(batch * heads, q, dim).transpose(1, 2)  # [bh, dim, q]
        block = max(1, min(q, self.search_block_queries, self.search_block_bytes // (4 * batch * heads * slots)))
        # kept between searches: allocating hundreds of MB every search costs page faults that exceed the search
        buffer = self._workspace.get("one-stage scores", (batch * heads * slots * block,), torch.float32,
                                     queries.device, limit=self.search_block_bytes // 4)
        out_scores = torch.empty(batch * heads, q, k, device=queries.device)
        out_slots = torch.empty(batch * heads, q, k, dtype=torch.long, device=queries.device)
        grouped = slots // GROUP > 4 * k  # below that, grouping saves nothing
        for start in range(0, q, block):
            n = min(block, q - start)
            # keys @ queries^T: BLAS streams the large key matrix once per block and packs only the queries.
            scores = buffer[: batch * heads * slots * n].view(batch * heads, slots, n)
            self._score(keys, queries_t[:, :, start : start + n], scores)
            per_row = scores.view(batch, heads, slots, n)
            for row, size in enumerate(sizes):
                if size < slots:
                    per_row[row, :, size:] = -math.inf
            if grouped:
                best, best_slots = self._grouped_topk(scores, k)
            else:
                best, best_slots = scores.topk(k, dim=1)
            out_scores[:, start : start + n] = best.transpose(1, 2)
            out_slots[:, start : start + n] = best_slots.transpose(1, 2)
        return out_scores.view(batch, heads, q, k), out_slots.view(batch, heads, q, k)

    def _score(self, keys: torch.Tensor, queries_t: torch.Tensor, scores: torch.Tensor) -> None:
        """scores [bh, slots, n] = keys [bh, slots, dim] @ queries_t [bh, dim, n] in float32. Half-precision keys
        are widened ``widen_block_bytes`` at a time into a buffer the index keeps: a whole float32 copy would cost
        twice the memory itself at every search (256 MB per layer for a million 16-dim entries in 4 heads)."""
        if keys.dtype == torch.float32:
            torch.bmm(keys, queries_t, out=scores)
            return
        rows, slots, dim = keys.shape
        width = min(slots, max(GROUP, self.widen_block_bytes // (4 * rows * dim) // GROUP * GROUP))
        for first in range(0, slots, width):
            last = min(slots, first + width)
            wide = self._workspace.get("widened keys", (rows, last - first, dim), torch.float32, keys.device)
            wide.copy_(keys[:, first:last])
            for row in range(rows):  # one matmul per row: a row's block of scores is contiguous, a batch's is not
                torch.mm(wide[row], queries_t[row], out=scores[row, first:last])

    @staticmethod
    def _grouped_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of scores [rows, slots, n] along dim 1 -> values, slots [rows, k, n]; slots % GROUP == 0."""
        rows, slots, n = scores.shape
        width = slots // GROUP
        members = scores.view(rows, GROUP, width, n)  # member m of group j is slot m * width + j
        groups = members.amax(dim=1).topk(k, dim=1).indices  # [rows, k, n]
        candidates = members.gather(2, groups.unsqueeze(1).expand(-1, GROUP, -1, -1))  # [rows, GROUP, k, n]
        best, flat = candidates.flatten(1, 2).topk(k, dim=1)
        member = flat.div(k, rounding_mode="floor")
        return best, member * width + groups.gather(1, flat.remainder(k))
