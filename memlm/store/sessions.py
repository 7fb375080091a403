"""Sessions to and from a MemoryStore: save what a session read, load stored documents into a session.

One stored document continues exactly where its ingestion ended (memory entries, local context,
RMT memory). Several: their memories are loaded into the index in the given order (each one's local
context too, as the entries that would have entered memory next) and the local context starts empty.
The store is used through its methods only (``bind``, ``memory``, ``state``, ``begin``, ``commit``,
``delete``), so this module does not import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .records import Document, Segment, check_doc_id


@dataclass
class Source:
    """A stored document's memory inside a session: index entry ids first_entry .. first_entry + entries - 1
    hold the document's tokens first_token, first_token + 1, ..."""

    document: str
    first_entry: int
    entries: int
    first_token: int = 0


def session_state(session) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """A batch-1 session's state for the store: local context tensors [kv_heads, local, d], counters, RMT memory."""
    tensors, counters = session.state.state_dict()
    tensors = {name: t[0] for name, t in tensors.items()}  # batch 1
    if session.rmt is not None:
        counters["rmt_segments"] = session.rmt.segments
        if session.rmt.memory is not None:
            tensors["rmt.memory"] = session.rmt.memory[0]
    return tensors, counters


def load_documents(store, session, documents: list[Document]) -> None:
    """Load stored documents (checked by the store) into a fresh batch-1 session (see ``MemoryModel.session``)."""
    if session.batch_size != 1 or session.state.crossbatch is not None:
        raise ValueError("stored documents load into a batch-1 session without crossbatch")
    store.bind(session.mem_model)
    state, device = session.state, session.mem_model.device
    if len(documents) == 1:
        (document,) = documents
        tensors, counters = store.state(document.id)
        state.load_state_dict({name: t[None] for name, t in tensors.items() if name.startswith("cache.")}, counters)
        entries = load_segments(state, store, document.id)
        if session.rmt is not None:
            session.rmt.segments = counters.get("rmt_segments", 0)
            if "rmt.memory" in tensors:
                session.rmt.memory = tensors["rmt.memory"][None].to(device, session.mem_model.dtype)
        session.sources = [Source(document.id, 0, entries, document.memory_start)]
        return
    first = 0
    for document in documents:
        entries = load_segments(state, store, document.id)
        tensors, counters = store.state(document.id)
        tail = 0
        for layer in state.memory_layers:
            if f"cache.{layer}.keys" in tensors:
                keys = text_entries(tensors[f"cache.{layer}.keys"], counters)
                values = text_entries(tensors[f"cache.{layer}.values"], counters)
                state.add_memory(layer, keys[None], values[None])
                tail = keys.shape[1]
        session.sources.append(Source(document.id, first, entries + tail, document.memory_start))
        first += entries + tail
    state.local.local_start = first  # the loaded entries stand before the (empty) local context


def load_segments(state, store, doc_id: str, chunk_bytes: int = 64 << 20) -> int:
    """Add a document's stored memory entries to the session's memory, ``chunk_bytes`` at a time (few large adds
    are faster than one per segment; an index gives entries the same slots however they arrive); returns the
    entry count."""
    entries = 0
    for memory, count in store.memory(doc_id, chunk_bytes):
        for layer, (keys, values) in memory.items():
            state.add_memory(layer, keys[None], values[None])
        entries += count
    return entries


def text_entries(cached: torch.Tensor, counters: dict[str, int]) -> torch.Tensor:
    """The text tokens of a stored local context [kv_heads, local, head_dim] (sinks first): RMT read tokens left
    out."""
    start = counters.get("sink_length", 0) + counters["cache_length"]
    return torch.cat((cached[:, :start], cached[:, start + counters["read_length"] :]), dim=1)


def save_session(store, session, doc_id: str) -> Document:
    """``Session.save_document``: store a session's document as complete."""
    check_doc_id(doc_id)
    if session.batch_size != 1:
        raise ValueError(f"save_document stores one document: the session must have batch_size 1, got "
                         f"{session.batch_size}")
    if session.sources:
        raise ValueError("this session was opened over stored documents; save_document stores a document a session "
                         "read itself (feed its text into a fresh session)")
    store.bind(session.mem_model)
    state = session.state
    ids = session.history.stream()[0][0].cpu()
    memory, memory_start = {}, 0
    for layer in state.knn.layers if state.memory is not None else ():
        keys, values, memory_start = state.knn.entries(layer)
        memory[layer] = (keys, values)
    segment = Segment(ids=ids, text=b"", memory=memory)
    document = store.begin(doc_id)
    document.status, document.tokens, document.memory_start = "complete", ids.numel(), memory_start
    document.segments, document.entries = 1, segment.entries
    tensors, counters = session_state(session)
    counters["memory_start"] = memory_start  # a reloaded index numbers its entries from the first live one
    try:
        store.commit(document, segment, (tensors, counters))
    except BaseException:
        store.delete(doc_id)
        raise
    return document
