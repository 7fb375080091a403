"""Block retrieval memory (InfLLM, Xiao et al. 2024; Quest, Tang et al. 2024): memory found and attended in blocks.

Token-level kNN memory (``knn.py``) gives each query its own ``top_k`` tokens; a pretrained model that copies a
number needs the number's tokens in order with their neighbours, which tokens chosen one by one rarely bring back
together. Block memory keeps the same entries (every token that leaves the local context, unrotated, FIFO) and
groups them into blocks of ``block_size`` consecutive tokens: entry ``e`` belongs to block ``e // block_size``
(entries counted from ``memory_start``, so block boundaries survive a reload). Each forward (a chunk of queries: a
segment, a prompt, one generated token) selects, per memory layer and key/value head, the ``top_blocks`` blocks of
largest pooled score and attends to them whole:

* **Scoring**, per query head and query, as if the block stood right before the local context (position
  ``frame - 1``; the query is rotated by the distance, the stored keys stay unrotated):
  ``"minmax"`` (Quest) the upper bound ``sum_c max(q_c min_c, q_c max_c)`` of ``q . k`` over the block's keys,
  from their per-channel minimum and maximum; ``"representatives"`` (InfLLM) the largest ``q . k`` over the
  block's ``block_representatives`` most central keys (largest inner product with the block's mean key: InfLLM
  picks the keys its following queries attend to most, queries memory does not keep). Forwards of at most
  ``exact_queries`` queries (a question, each generated token) score every block exactly instead, by the attention
  it would draw: ``(1 / scale) log sum_k exp(scale q . k)`` over its keys (one pass over memory's keys). On real
  text a block's per-channel range is wide and its central keys are not its rare ones, so both summaries rank the
  block holding the asked fact far down (``README``, "Block retrieval"); the question is the forward that must find
  it, and it is short.
* **Pooling**: each query head spreads one vote over the blocks, ``softmax(scale * score)``, and the votes of the
  chunk's queries and of the query heads that share the key/value head are summed (a question of a few tokens
  outvotes a whole segment of text only where it singles a block out).
* **Pooling over layers** (``pooled_from``, off by default): at a single layer-head the block holding the asked
  fact is rarely among the best few. A forward scored exactly selects, at layer ``pooled_from`` and every memory
  layer above it, one set of blocks for all its key/value heads, by each token's votes summed over the heads and
  over the layers from ``pooled_from`` up to the selecting one (a layer cannot wait for the layers above it: their
  queries come from its output). A block's score is its **lift**: the votes each token gives it above the median of
  the votes it draws from the forward's tokens, summed over the tokens (a forward of one token: its votes). What
  every token of a question votes for (the document's first block, the model's attention sink; the first of
  several passages in the question's form, which draws about twice the votes of the later ones from every token)
  lifts by what some tokens single it out for; what only the question's rare tokens find (the asked key among
  needles of one template) lifts by all of their votes. Lower layers, and the segments' selections, stay per
  layer and head (``README``, "Block retrieval").
* **Neighbours** (EM-LLM's contiguity buffer, Fountas et al. 2024): each selected block brings the
  ``neighbours`` blocks on each side of it, so a fact cut by a block boundary comes back whole (a block counted
  once, however many selected blocks it neighbours; none outside the live ones).
* **Holding**: a forward of one token (each generated token) reads the blocks the last longer forward (the prompt)
  selected, as long as memory holds the same entries (``hold``); once new entries arrive it selects for itself,
  until the next longer forward. A generated token's own query asks for what follows it: after `` 4`` a digit, so
  it selects the blocks full of numbers (distractors of the asked one) rather than the block its question found;
  the answer reads what its question chose, and skips the scoring.
* **Placement**: the selected blocks, in document order, end right before the local context: their live entries
  occupy the last positions of the ``top_blocks * block_size`` the position policy reserves there (its
  ``memory_span``), so every query sees them at one fixed range of distances, inside the window the model was
  trained on, however far back they were read. With every block selected and nothing evicted, that is the
  model's own attention over the whole document.

The selected keys/values come back in the *shared* layout of ``memory_attention`` ([batch, kv_heads, m, d], one
set for every query of the forward), which merges them with the local context through the (out, lse) algebra.
"""

from __future__ import annotations

import torch

from memlm.positions.policy import PositionPolicy
from memlm.positions.rotary import apply_rotation


class BlockLayer:
    """One memory layer's entries and their block summaries, for ``batch`` rows in lockstep.

    Entries live in buffers that double as they fill, up to ``capacity``, then wrap (a ring of whole blocks):
    keys, values [batch, kv_heads, slots, head_dim] in the memory dtype; per block the per-channel minimum and
    maximum and the representative keys, float32 [batch, kv_heads, blocks, (r,) head_dim].
    """

    def __init__(self, keys: torch.Tensor, capacity: int, block_size: int, representatives: int) -> None:
        batch, kv_heads, _, head_dim = keys.shape
        self.capacity, self.block_size, self.representatives = capacity, block_size, representatives
        self.total = 0  # entries ever added
        self.first = 0  # id of the oldest live entry (a block boundary)
        slots = self.slots_for(keys.shape[2], 0)
        # zeros, not empty: a partly filled block's dead slots are gathered and masked, and a masked NaN (garbage
        # memory) would still poison the attention (0 * NaN)
        self.keys = keys.new_zeros(batch, kv_heads, slots, head_dim)
        self.values = torch.zeros_like(self.keys)
        blocks = slots // block_size
        summary = dict(device=keys.device, dtype=torch.float32)
        self.low = torch.zeros(batch, kv_heads, blocks, head_dim, **summary)
        self.high = torch.zeros_like(self.low)
        self.central = torch.zeros(batch, kv_heads, blocks, representatives, head_dim, **summary)

    @property
    def live_blocks(self) -> range:
        """Ids of the blocks holding live entries (the last one may be partly filled)."""
        return range(self.first // self.block_size, -(-self.total // self.block_size))

    def slots_for(self, needed: int, slots: int) -> int:
        """Buffer length for ``needed`` live entries: whole blocks, at least doubling, at most ``capacity``."""
        blocks = max(-(-needed // self.block_size), 2 * slots // self.block_size, 1)
        return min(self.capacity, blocks * self.block_size)

    def grow(self, needed: int) -> None:
        """Make room for ``needed`` live entries; each live entry moves to slot ``id % slots`` of the new buffer."""
        old_slots = self.keys.shape[2]
        if needed <= old_slots or old_slots == self.capacity:
            return
        new_slots = self.slots_for(needed, old_slots)
        entries = torch.arange(self.first, self.total, device=self.keys.device)
        blocks = torch.tensor(self.live_blocks, device=self.keys.device, dtype=torch.long)
        for name, (ids, old_ring, new_ring) in {
            "keys": (entries, old_slots, new_slots), "values": (entries, old_slots, new_slots),
            "low": (blocks, old_slots // self.block_size, new_slots // self.block_size),
            "high": (blocks, old_slots // self.block_size, new_slots // self.block_size),
            "central": (blocks, old_slots // self.block_size, new_slots // self.block_size),
        }.items():
            old = getattr(self, name)
            grown = old.new_zeros(*old.shape[:2], new_ring, *old.shape[3:])
            grown[:, :, ids % new_ring] = old[:, :, ids % old_ring]
            setattr(self, name, grown)

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append unrotated keys, values [batch, kv_heads, n, head_dim]; the oldest whole blocks leave when full."""
        n, start = keys.shape[2], self.total
        self.grow(start + n - self.first)
        slots = self.keys.shape[2]
        written = 0
        while written < n:  # in pieces that stop at the buffer's end (more than capacity: the last ones stay)
            at = (start + written) % slots
            piece = min(n - written, slots - at)
            self.keys[:, :, at : at + piece] = keys[:, :, written : written + piece]
            self.values[:, :, at : at + piece] = values[:, :, written : written + piece]
            written += piece
        self.total += n
        overflow = self.total - self.first - self.capacity
        if overflow > 0:
            self.first += -(-overflow // self.block_size) * self.block_size
        for block in range(max(start, self.first) // self.block_size, -(-self.total // self.block_size)):
            self.summarize(block)

    def block_entries(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The live keys, values [batch, kv_heads, <= block_size, head_dim] of one block."""
        begin, end = max(block * self.block_size, self.first), min((block + 1) * self.block_size, self.total)
        at = begin % self.keys.shape[2]
        return self.keys[:, :, at : at + end - begin], self.values[:, :, at : at + end - begin]

    def summarize(self, block: int) -> None:
        """Recompute one block's minimum, maximum and representative keys from its live entries."""
        keys = self.block_entries(block)[0].float()
        slot = block % (self.keys.shape[2] // self.block_size)
        self.low[:, :, slot] = keys.amin(dim=2)
        self.high[:, :, slot] = keys.amax(dim=2)
        centrality = keys @ keys.mean(dim=2, keepdim=True).transpose(-1, -2)  # [b, hkv, n, 1]
        best = centrality.squeeze(-1).topk(min(self.representatives, keys.shape[2]), dim=-1).indices
        # a partial block repeats its best key in the free places: the maximum over them is unchanged
        best = torch.cat((best, best[..., :1].expand(*best.shape[:2], self.representatives - best.shape[-1])), -1)
        self.central[:, :, slot] = keys.gather(2, best.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))

    def summaries(self, blocks: range) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """low, high [b, hkv, len(blocks), d] and central [b, hkv, len(blocks), r, d] of the live ``blocks``
        (views where their slots do not wrap around the ring)."""
        ring = self.keys.shape[2] // self.block_size
        first = blocks.start % ring
        if first + len(blocks) <= ring:
            slots = slice(first, first + len(blocks))
        else:
            slots = torch.arange(blocks.start, blocks.stop, device=self.low.device) % ring
        return self.low[:, :, slots], self.high[:, :, slots], self.central[:, :, slots]

    def gather(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entries of the selected ``blocks`` [batch, kv_heads, m] (ascending ids): keys, values
        [b, hkv, m * block_size, d], their entry ids [b, hkv, m * block_size] and whether each is live."""
        ids = (blocks.unsqueeze(-1) * self.block_size + torch.arange(self.block_size, device=blocks.device)).flatten(2)
        live = (ids >= self.first) & (ids < self.total)
        batch, kv_heads, slots, head_dim = self.keys.shape
        # whole rows of the flattened buffers (a gather with an index per element costs several times more)
        rows = (torch.arange(batch * kv_heads, device=ids.device).view(batch, kv_heads, 1) * slots + ids % slots)
        rows = rows.flatten()
        keys = self.keys.view(-1, head_dim).index_select(0, rows).view(batch, kv_heads, -1, head_dim)
        values = self.values.view(-1, head_dim).index_select(0, rows).view(batch, kv_heads, -1, head_dim)
        return keys, values, ids, live

    def live_slots(self) -> torch.Tensor:
        """Which slots of the buffers hold live entries: bool [slots] (slot ``s`` holds the entry ``e`` of the live
        range with ``e % slots == s``, if there is one)."""
        slots = self.keys.shape[2]
        ids = self.first + (torch.arange(slots, device=self.keys.device) - self.first) % slots
        return ids < self.total

    def entries(self, row: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Live entries of one row, oldest first: keys, values [kv_heads, n, d] and the id of the first."""
        order = torch.arange(self.first, self.total, device=self.keys.device) % self.keys.shape[2]
        return self.keys[row][:, order], self.values[row][:, order], self.first


def with_neighbours(chosen: torch.Tensor, neighbours: int, live: range) -> torch.Tensor:
    """Selected block ids [b, hkv, m] (ascending) and the ``neighbours`` blocks on each side of each -> [b, hkv,
    m * (1 + 2 * neighbours)], ascending, each live block once; the places left over (a block neighbouring two
    selected ones, a neighbour outside ``live``) hold ``live.stop``, a block with no live entry, at the end."""
    offsets = torch.arange(-neighbours, neighbours + 1, device=chosen.device)
    blocks = (chosen.unsqueeze(-1) + offsets).flatten(-2).sort(dim=-1).values
    repeated = torch.zeros_like(blocks, dtype=torch.bool)
    repeated[..., 1:] = blocks[..., 1:] == blocks[..., :-1]
    unused = repeated | (blocks < live.start) | (blocks >= live.stop)
    return blocks.masked_fill(unused, live.stop).sort(dim=-1).values


def block_scores(queries: torch.Tensor, low: torch.Tensor, high: torch.Tensor, central: torch.Tensor,
                 scoring: str) -> torch.Tensor:
    """Each query's score of each block: queries [b, hkv, m, d] (in the blocks' geometry), low / high
    [b, hkv, blocks, d], central [b, hkv, blocks, r, d] -> [b, hkv, m, blocks]."""
    if scoring == "minmax":  # q_c max_c where q_c > 0, q_c min_c where q_c < 0: the largest q_c k_c any key gives
        return queries.clamp(min=0) @ high.transpose(-1, -2) + queries.clamp(max=0) @ low.transpose(-1, -2)
    return torch.einsum("bhmd,hbnrd->bhmnr", queries, central.transpose(0, 1)).amax(dim=-1)


def exact_block_scores(queries: torch.Tensor, keys: torch.Tensor, live: torch.Tensor, block_size: int, scale: float,
                       max_scores: int = 1 << 23) -> torch.Tensor:
    """Each query's exact score of each block of the ring, ``(1 / scale) log sum_k exp(scale q . k)`` over the block's
    live keys (-inf for a block with none): queries [b, hkv, m, d], keys [b, hkv, slots, d] (the ring's buffer, in
    the queries' dtype), live [slots] -> [b, hkv, m, slots // block_size]. Queries go in chunks whose score block
    holds at most ``max_scores`` numbers."""
    batch, kv_heads, m, _ = queries.shape
    slots = keys.shape[2]
    chunk = max(1, max_scores // (batch * kv_heads * slots))
    dead = ~live  # [slots]
    out = []
    for start in range(0, m, chunk):
        scores = queries[:, :, start : start + chunk] @ keys.transpose(-1, -2) * scale  # [b, hkv, chunk, slots]
        scores = scores.masked_fill_(dead, float("-inf")).unflatten(-1, (slots // block_size, block_size))
        out.append(scores.logsumexp(dim=-1) / scale)
    return torch.cat(out, dim=2)


def lift(votes: torch.Tensor) -> torch.Tensor:
    """Each token's votes [b, tokens, blocks] -> each block's lift [b, blocks]: the votes above the median of the
    block's votes over the tokens, summed (one token: its votes). A block every token votes for lifts only by
    what some of them single it out for."""
    if votes.shape[1] == 1:
        return votes[:, 0]
    return (votes - votes.median(dim=1, keepdim=True).values).clamp(min=0).sum(dim=1)


class BlockMemory:
    """The block memories of one stream's memory layers (the interface of ``KNNMemory``: add, read, entries)."""

    def __init__(self, *, capacity: int, block_size: int, top_blocks: int, scoring: str, representatives: int,
                 exact_queries: int, dtype: torch.dtype | None, positions: PositionPolicy,
                 devices: dict[int, torch.device], hold: bool = False, neighbours: int = 0,
                 pooled_from: int | None = None) -> None:
        self.capacity, self.block_size, self.top_blocks = capacity, block_size, top_blocks
        self.scoring, self.representatives, self.exact_queries = scoring, representatives, exact_queries
        self.hold, self.neighbours, self.pooled_from = hold, neighbours, pooled_from
        self.dtype = dtype  # None: the dtype of the keys that enter first
        self.positions = positions
        self.devices = devices
        self.blocks: dict[int, BlockLayer] = {}
        self.reset()

    def reset(self) -> None:
        """Forget every entry."""
        self.blocks = {}
        # layer -> (first, total, chosen): the last selection of a forward of several tokens, and the live entries
        # it was made over (one-token forwards read it while they are unchanged)
        self.held: dict[int, tuple[int, int, torch.Tensor]] = {}
        # (layer, first, total, votes [b, n, blocks]): each token's votes pooled so far by the forward selecting now
        self.pool: tuple[int, int, int, torch.Tensor] | None = None
        self.memory_start = 0  # document position of entry 0
        # set to a list to record every read: entry ids [b, hq, n, m] and attention logits [b, hq, n, m]
        self.retrievals: list | None = None
        self.selections: list | None = None  # set to a list to record (layer, selected block ids [b, hkv, m])
        self.queries: list | None = None  # set to a list to record (layer, block_queries) of every selection

    @property
    def layers(self) -> list[int]:
        """The memory layers holding entries."""
        return list(self.blocks)

    @property
    def nbytes(self) -> int:
        """Bytes the memory holds: entries (keys and values in the memory dtype) and block summaries (float32)."""
        return sum(t.nbytes for layer in self.blocks.values()
                   for t in (layer.keys, layer.values, layer.low, layer.high, layer.central))

    def add(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the next tokens of the document: unrotated keys, values [batch, kv_heads, n, head_dim].

        Returns them as stored, in memory's dtype."""
        device = self.devices.get(layer, keys.device)
        keys, values = keys.to(device, self.dtype or keys.dtype), values.to(device, self.dtype or keys.dtype)
        if layer not in self.blocks:
            self.blocks[layer] = BlockLayer(keys, self.capacity, self.block_size, self.representatives)
        self.blocks[layer].add(keys, values)
        return keys, values

    def select(self, layer: int, q: torch.Tensor, local_start: int, scale: float, sinks: int = 0) -> torch.Tensor:
        """The ids [batch, kv_heads, m] (ascending) of the blocks the forward's queries q [b, hq, n, d] select and
        their neighbours (a one-token forward: the held selection of the last longer one, while memory holds the
        same entries). Where a head reads fewer than m (neighbours shared or outside memory), its last places hold
        ids past the live blocks: entries the read masks."""
        memory = self.blocks[layer]
        entries = (memory.first, memory.total)
        held = self.held.get(layer)
        if self.hold and q.shape[2] == 1 and held is not None and held[:2] == entries:
            return held[2]
        queries = self.block_queries(layer, q, local_start, sinks)
        if self.queries is not None:
            self.queries.append((layer, queries))
        rule = "exact" if q.shape[2] <= self.exact_queries else self.scoring
        if rule == "exact" and self.pooled_from is not None and layer >= self.pooled_from:
            votes = self.pooled(layer, entries, self.query_votes(layer, queries, scale, rule), q.shape[2])
        else:
            votes = self.query_votes(layer, queries, scale, rule).sum(dim=2)
        live = memory.live_blocks
        chosen = votes.topk(min(self.top_blocks, len(live)), dim=-1).indices.sort(dim=-1).values + live.start
        if self.neighbours:
            chosen = with_neighbours(chosen, self.neighbours, live)
        if self.hold and q.shape[2] > 1:
            self.held[layer] = (*entries, chosen)
        return chosen

    def pooled(self, layer: int, entries: tuple[int, int], votes: torch.Tensor, tokens: int) -> torch.Tensor:
        """Each query's votes [b, hkv, hq / hkv * tokens, blocks] of one layer (``block_queries``' rows) -> the
        forward's block scores [b, hkv, blocks], the same for every head: each token's votes summed over the heads
        and the layers from ``pooled_from`` up to this one, then each block's ``lift``. Layers run upwards within a
        forward: a layer at or below the last one pooled starts the next forward's pool."""
        pool = votes.unflatten(2, (-1, tokens)).sum(dim=(1, 2))  # [b, tokens, blocks]
        if self.pool is not None and self.pool[0] < layer and self.pool[1:3] == entries:
            pool = pool + self.pool[3].to(pool.device)
        self.pool = (layer, *entries, pool)
        return lift(pool).unsqueeze(1).expand(-1, votes.shape[1], -1)

    def block_queries(self, layer: int, q: torch.Tensor, local_start: int, sinks: int = 0) -> torch.Tensor:
        """Queries q [b, hq, n, d] (at their positions) as blocks are scored: rotated as if a block stood right
        before the local context, the query heads of each key/value head together -> [b, hkv, hq / hkv * n, d]
        (float32; float64 for float64)."""
        batch, q_heads, n, head_dim = q.shape
        kv_heads = self.blocks[layer].keys.shape[1]
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        queries = self.positions.rotate(q.detach().to(compute), 1 - self.positions.frame(local_start, sinks))
        return queries.reshape(batch, kv_heads, q_heads // kv_heads * n, head_dim)

    def query_votes(self, layer: int, queries: torch.Tensor, scale: float, rule: str) -> torch.Tensor:
        """Each query's vote over the live blocks [b, hkv, m, blocks] under ``rule`` (``"minmax"``,
        ``"representatives"``, ``"exact"``): every query of ``block_queries`` spreads one vote, softmax(scale *
        score); a head's votes are their sum over its queries."""
        memory = self.blocks[layer]
        live = memory.live_blocks
        if rule == "exact":
            ring = memory.keys.shape[2] // self.block_size
            keys = memory.keys.to(queries.dtype)
            scores = exact_block_scores(queries, keys, memory.live_slots(), self.block_size, scale)
            scores = scores[..., torch.arange(live.start, live.stop, device=scores.device) % ring]
        else:
            low, high, central = (t.to(queries.dtype) for t in memory.summaries(live))
            scores = block_scores(queries, low, high, central, rule)
        return torch.softmax(scores * scale, dim=-1)

    def read(self, layer: int, q: torch.Tensor, local_start: int, scale: float, sinks: int = 0):
        """The selected blocks, rotated to where the attention puts them (``sinks``: sink tokens in front of the
        local context).

        q: [batch, q_heads, n, head_dim]. Returns keys, values [batch, kv_heads, m * block_size, head_dim] in q's
        dtype and mask [batch, kv_heads, m * block_size] (False: a place of a partly filled block); None before
        anything entered this layer's memory.
        """
        if layer not in self.blocks:
            return None, None, None
        chosen = self.select(layer, q, local_start, scale, sinks)
        keys, values, ids, live = self.blocks[layer].gather(chosen)
        # right before the local context: the live entries end at frame - 1 (only the newest block can be partial,
        # its free places at its end, so the live entries of each head are contiguous); every head's places lie in
        # frame - span .. frame + span - 1, whose rotations every layer of the forward shares
        span, frame = keys.shape[2], self.positions.frame(local_start, sinks)
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        table = self.positions.rotation_table(frame - span, 2 * span, keys.device, compute)
        if table is not None:
            live_count = live.sum(dim=-1, keepdim=True)  # [b, hkv, 1]
            if bool((live_count == live_count.flatten()[0]).all()):  # the usual case: one range for every head
                start = span - int(live_count.flatten()[0])
                keys = apply_rotation(keys, table[0][start : start + span], table[1][start : start + span])
            else:
                index = span - live_count + torch.arange(span, device=keys.device)  # [b, hkv, span]
                keys = apply_rotation(keys, table[0][index], table[1][index])
        keys = keys.to(q.dtype)
        if self.selections is not None:
            self.selections.append((layer, chosen))
        if self.retrievals is not None:
            self.record(q, keys, ids, live, scale)
        return keys, values.to(q.dtype), live

    def record(self, q: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor, live: torch.Tensor,
               scale: float) -> None:
        """Keep each query head's entry ids and attention logits over the blocks read (``ask``'s citations)."""
        group = q.shape[1] // keys.shape[1]
        keys, ids, live = (t.repeat_interleave(group, dim=1) for t in (keys, ids, live))
        logits = (q.float() @ keys.float().transpose(-1, -2) * scale).masked_fill(~live[:, :, None], float("-inf"))
        ids = torch.where(live, ids, -1)[:, :, None].expand(-1, -1, q.shape[2], -1)
        self.retrievals.append((ids, logits))

    def entries(self, layer: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Live entries of one row, oldest first: unrotated keys, values [kv_heads, n, head_dim] and the document
        position of the first."""
        keys, values, first = self.blocks[layer].entries(row)
        return keys, values, self.memory_start + first
