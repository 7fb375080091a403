"""The token ids a session keeps: the last ``limit`` of the stream, per row, in one preallocated ring.

Generation's logits processors read them (a repetition penalty, n-gram bans) and ``save_document`` stores them.
Appending copies a forward's ids into the ring, so no tensor made for one forward outlives it: a stream that
kept every forward's ids as a tensor of its own would pin small blocks all over the heap, and the allocator could
then neither reuse nor return the space between them (resident memory grows with the stream). The ring grows by
doubling up to ``limit`` (``None``: without bound, for a session that must keep every id).
"""

from __future__ import annotations

import torch


class IdHistory:
    """The last ``limit`` ids [batch, n] of a stream and their real-token mask (None while every id is real)."""

    def __init__(self, batch_size: int, limit: int | None) -> None:
        self.batch_size, self.limit = batch_size, limit
        self.ids: torch.Tensor | None = None  # [batch, room] long: id t of the stream sits in slot t % room
        self.real: torch.Tensor | None = None  # [batch, room] bool, made when the first padded forward comes
        self.total = 0  # ids appended per row

    @property
    def kept(self) -> int:
        """Ids per row still held."""
        return self.total if self.limit is None else min(self.total, self.limit)

    @property
    def dropped(self) -> int:
        """Ids per row forgotten (beyond ``limit``)."""
        return self.total - self.kept

    def append(self, ids: torch.Tensor, real: torch.Tensor | None) -> None:
        """Add a forward's ids [batch, n] and its real mask [batch, n] (None: all real)."""
        n = ids.shape[1]
        if self.limit is not None and n > self.limit:  # only the newest fit
            self.total += n - self.limit
            ids, real = ids[:, -self.limit :], None if real is None else real[:, -self.limit :]
            n = self.limit
        self._reserve(self.total + n, ids.device)
        if real is not None and self.real is None:
            self.real = torch.ones_like(self.ids, dtype=torch.bool)
        for buffer, part in ((self.ids, ids), (self.real, real)):
            if buffer is not None:
                self._write(buffer, torch.ones_like(ids, dtype=torch.bool) if part is None else part)
        self.total += n

    def stream(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kept ids [batch, kept], oldest first, and their real mask (None: all real); copies."""
        if self.ids is None:
            return torch.empty(self.batch_size, 0, dtype=torch.long), None
        return self._ordered(self.ids), None if self.real is None else self._ordered(self.real)

    def _write(self, buffer: torch.Tensor, part: torch.Tensor) -> None:
        room, n = buffer.shape[1], part.shape[1]
        start = self.total % room
        head = min(n, room - start)
        buffer[:, start : start + head] = part[:, :head]
        buffer[:, : n - head] = part[:, head:]

    def _ordered(self, buffer: torch.Tensor) -> torch.Tensor:
        room = buffer.shape[1]
        if self.total <= room:
            return buffer[:, : self.total].clone()
        start = self.total % room
        return torch.cat((buffer[:, start:], buffer[:, :start]), dim=1)

    def _reserve(self, needed: int, device: torch.device) -> None:
        """Room for ``needed`` ids (at most ``limit``); a grown ring keeps the ids in order (it has not wrapped:
        a ring wraps only once it is ``limit`` long)."""
        room = 0 if self.ids is None else self.ids.shape[1]
        if needed <= room or (self.limit is not None and room == self.limit):
            return
        grown = max(needed, 2 * room, 1024)
        if self.limit is not None:
            grown = min(grown, self.limit)
        self.ids = self._grown(self.ids, torch.zeros(self.batch_size, grown, dtype=torch.long, device=device))
        if self.real is not None:
            self.real = self._grown(self.real, torch.ones(self.batch_size, grown, dtype=torch.bool, device=device))

    def _grown(self, old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        if old is not None:
            new[:, : self.total] = old[:, : self.total]
        return new
