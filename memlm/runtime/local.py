"""The local context: which tokens every layer keeps and attends to directly (Transformer-XL, Dai et al. 2019).

A stream is a sequence of *segments* of ``segment_length`` tokens. The local context of the tokens
being processed is [sinks ; XL cache ; RMT read tokens ; the open segment so far ; the new tokens] (RMT
write tokens follow the new tokens in the forward that closes a segment, ``memory/rmt.py``, and are
never kept). When a segment closes, the read tokens are dropped, the last ``xl_length`` tokens stay
as the XL cache, and the older ones are handed over (``close_segment`` returns them) so that they
enter the memory at the moment they leave: no token is attended twice.

Attention sinks (StreamingLLM, Xiao et al. 2023; LM-Infinite's global branch, Han et al. 2023): the
document's first ``sink_tokens`` tokens, when they leave the XL cache, stay in front of it for good
instead of entering memory.

Keys are kept unrotated; the position policy rotates them on use. Per layer the cache holds
keys, values [batch, kv_heads, local, head_dim] on the layer's device: views of a *room* allocated once per layer
and reused by every segment (a forward writes its tokens in place; closing a segment moves the kept tokens to the
front), so a stream allocates nothing per segment that outlives it. Where a graph runs through the cache
(CrossBatch training), tensors are concatenated instead, as autograd needs.
"""

from __future__ import annotations

import torch


class LocalContext:
    """The cached keys/values of every layer and the counters that place them in the document."""

    def __init__(self, segment_length: int, xl_length: int, sink_tokens: int = 0) -> None:
        self.segment_length, self.xl_length, self.sink_tokens = segment_length, xl_length, sink_tokens
        self.reset()

    def reset(self) -> None:
        # layer -> unrotated keys, values [batch, kv_heads, sinks + cache + read + open, head_dim]
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rooms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> preallocated keys, values
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # what the forward in flight computed
        self.new = (0, 0, 0)  # read, text, write tokens of the forward in flight
        self.local_start = 0  # document position of the first cached text token after the sinks
        self.sink_length = 0  # sink tokens kept (the document's first tokens, once they left the XL cache)
        self.cache_length = 0  # tokens of closed segments kept (the XL cache)
        self.read_length = 0  # RMT read tokens of the open segment
        self.open_length = 0  # tokens of the segment not yet closed

    @property
    def tokens_seen(self) -> int:
        """Text tokens of the document so far (committed forwards)."""
        return self.local_start + self.cache_length + self.open_length

    @property
    def length(self) -> int:
        """Entries of the local context: sinks, cache, read tokens, open segment."""
        return self.sink_length + self.cache_length + self.read_length + self.open_length

    @property
    def in_forward(self) -> bool:
        return self.new != (0, 0, 0)

    def begin(self, n: int, read: int = 0, write: int = 0) -> None:
        """A forward of ``read`` RMT read tokens, ``n`` text tokens and ``write`` RMT write tokens starts."""
        if not 0 < n <= self.segment_length - self.open_length:
            raise ValueError(f"{n} new tokens do not fit the open segment ({self.open_length} of "
                             f"{self.segment_length} tokens used)")
        self.pending, self.new = {}, (read, n, write)

    def extend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record the forward's unrotated keys, values [batch, kv_heads, new, d] of ``layer``; returns the layer's
        local context before them (unrotated keys, values [batch, kv_heads, length, d]; None if empty)."""
        self.pending[layer] = (keys, values)
        return self.cache.get(layer, (None, None))

    def commit(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The forward succeeded: its read and text tokens join the local context (write tokens never do).

        When that completes the segment, it closes: returns layer -> the unrotated keys, values
        [batch, kv_heads, evicted, d] that left the local context (empty otherwise).
        """
        read, n, _ = self.new
        for layer, (k, v) in self.pending.items():
            self.append(layer, k[:, :, : read + n], v[:, :, : read + n])
        self.pending, self.new = {}, (0, 0, 0)
        self.read_length += read
        self.open_length += n
        return self.close_segment() if self.open_length == self.segment_length else {}

    def abort(self) -> None:
        """The forward failed: drop what it computed, keep everything stored."""
        self.pending, self.new = {}, (0, 0, 0)

    def close_segment(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Drop the read tokens; keep the last ``xl_length`` tokens (and the sinks); return the others per layer."""
        sinks = self.sink_length
        start, end = self.read_slots
        kept = self.cache_length + self.open_length
        drop = max(0, kept - self.xl_length)
        # the leaving tokens that are among the document's first sink_tokens become sinks
        new_sinks = max(0, min(drop, self.sink_tokens - self.local_start))
        evicted = {}
        for layer, (k, v) in self.cache.items():
            # the text entries in order (the read tokens left out), then which of them leave and which stay
            every = torch.arange(k.shape[2], device=k.device)
            text = torch.cat((every[:start], every[end:])) if end > start else every
            if drop > new_sinks:
                leaving = text[sinks + new_sinks : sinks + drop]
                evicted[layer] = (k.index_select(2, leaving), v.index_select(2, leaving))
            staying = torch.cat((text[: sinks + new_sinks], text[sinks + drop :]))
            self.store(layer, k.index_select(2, staying), v.index_select(2, staying))
        self.local_start += drop
        self.sink_length += new_sinks
        self.cache_length = kept - drop
        self.read_length = self.open_length = 0
        return evicted

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add keys, values [batch, kv_heads, m, d] at the end of a layer's local context."""
        cached = self.cache.get(layer)
        if cached is None:
            self.store(layer, k, v)
            return
        if self.in_graph(k, v, *cached):
            self.cache[layer] = (torch.cat((cached[0], k), dim=2), torch.cat((cached[1], v), dim=2))
            return
        length = cached[0].shape[2]
        room = self.room(layer, cached[0], length + k.shape[2])
        for buffer, old, new in zip(room, cached, (k, v), strict=True):
            if old.data_ptr() != buffer.data_ptr():  # restored or detached: not in the room yet
                buffer[:, :, :length] = old
            buffer[:, :, length : length + new.shape[2]] = new
        self.cache[layer] = tuple(buffer[:, :, : length + k.shape[2]] for buffer in room)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Make keys, values [batch, kv_heads, m, d] (tensors of their own, not views of the room) a layer's local
        context."""
        if self.in_graph(k, v):
            self.cache[layer] = (k, v)
            return
        room = self.room(layer, k, k.shape[2])
        for buffer, new in zip(room, (k, v), strict=True):
            buffer[:, :, : new.shape[2]] = new
        self.cache[layer] = tuple(buffer[:, :, : k.shape[2]] for buffer in room)

    def room(self, layer: int, like: torch.Tensor, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's preallocated keys, values [batch, kv_heads, room, d] of ``like``'s kind, with room for
        ``needed`` tokens (sinks + XL cache + a segment: made once; larger only for RMT read tokens)."""
        room = self.rooms.get(layer)
        size = max(needed, self.sink_tokens + self.xl_length + self.segment_length)
        batch, heads, _, dim = like.shape
        if room is None or room[0].shape[2] < needed or room[0].shape[:2] != (batch, heads) or \
                room[0].shape[3] != dim or room[0].dtype != like.dtype or room[0].device != like.device:
            room = tuple(like.new_empty(batch, heads, size, dim) for _ in range(2))
            self.rooms[layer] = room
        return room

    @staticmethod
    def in_graph(*tensors: torch.Tensor) -> bool:
        return any(t.requires_grad for t in tensors)

    @property
    def read_slots(self) -> tuple[int, int]:
        """Where the open segment's RMT read tokens sit in the local context: [start, end)."""
        start = self.sink_length + self.cache_length
        return start, start + self.read_length

    def detach_graph(self) -> None:
        """Cut the graph behind the cached tensors; keep their values."""
        self.cache = {layer: (k.detach(), v.detach()) for layer, (k, v) in self.cache.items()}

    def text_entries(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The text tokens of a layer's local context, keys, values [batch, kv_heads, n, d] (read tokens left out)."""
        k, v = self.cache[layer]
        start, end = self.read_slots
        return tuple(torch.cat((t[:, :, :start], t[:, :, end:]), dim=2) for t in (k, v))

    # ------------------------------------------------------------------------------- persistence

    COUNTERS = ("local_start", "sink_length", "cache_length", "read_length", "open_length")

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Tensors ``cache.{layer}.keys|values`` and the counters."""
        if self.in_forward:
            raise RuntimeError("cannot save a stream in the middle of a forward")
        tensors = {}
        for layer, (keys, values) in self.cache.items():
            # copies: the cache is a view of the room, which the stream's next segment overwrites
            tensors[f"cache.{layer}.keys"], tensors[f"cache.{layer}.values"] = keys.clone(), values.clone()
        return tensors, {name: getattr(self, name) for name in self.COUNTERS}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], counters: dict[str, int],
                        devices: dict[int, torch.device]) -> None:
        """Restore what ``state_dict`` returned, each layer's tensors on ``devices[layer]``."""
        layers = sorted({int(name.split(".")[1]) for name in tensors if name.startswith("cache.")})
        self.cache = {layer: (tensors[f"cache.{layer}.keys"].to(devices[layer]),
                              tensors[f"cache.{layer}.values"].to(devices[layer])) for layer in layers}
        for name in self.COUNTERS:
            setattr(self, name, int(counters.get(name, 0)))
