"""The local context: the FIFO hand-over to memory, persistence, and XL caches that evict against transformers.

The reference for an evicting XL cache is transformers' own model fed one segment per forward with a
``DynamicCache`` cut to its last ``xl_length`` tokens after each segment.
"""

from __future__ import annotations

import pytest
import torch

from memlm import MemoryConfig, attach
from memlm.runtime.local import LocalContext

from conftest import cut_cache_logits, document, session_logits


def tagged(n: int, start: int) -> torch.Tensor:
    """Keys [1, 1, n, 1] whose value is the token's document position."""
    return torch.arange(start, start + n, dtype=torch.float32).view(1, 1, n, 1)


def test_a_closing_segment_keeps_the_last_xl_tokens_and_hands_over_the_rest():
    local = LocalContext(segment_length=4, xl_length=6)
    handed = []
    for start in range(0, 12, 2):  # forwards of two tokens
        local.begin(2)
        local.extend(0, tagged(2, start), tagged(2, start))
        evicted = local.commit()
        if evicted:
            handed.append(evicted[0][0].flatten().tolist())
    assert handed == [[0.0, 1.0], [2.0, 3.0, 4.0, 5.0]]  # the first segment fit the cache whole
    assert local.local_start == 6 and local.cache_length == 6 and local.open_length == 0
    assert local.cache[0][0].flatten().tolist() == [6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    # every token was handed over exactly once, in document order, the moment it left the local context
    assert [p for part in handed for p in part] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_read_tokens_never_stay_and_a_failed_forward_changes_nothing():
    local = LocalContext(segment_length=3, xl_length=2)
    local.begin(3, read=2, write=2)
    local.extend(0, torch.cat((tagged(2, -10), tagged(3, 0), tagged(2, -20)), dim=2), tagged(7, 0))
    evicted = local.commit()
    assert evicted[0][0].flatten().tolist() == [0.0]  # the write tokens were never kept, the read tokens dropped
    assert local.cache[0][0].flatten().tolist() == [1.0, 2.0] and local.read_length == 0
    local.begin(1)
    local.extend(0, tagged(1, 99), tagged(1, 99))
    local.abort()
    assert local.cache[0][0].flatten().tolist() == [1.0, 2.0] and not local.in_forward
    with pytest.raises(ValueError, match="4 new tokens do not fit the open segment"):
        local.begin(4)


def test_state_dict_round_trip_and_no_saving_mid_forward():
    local = LocalContext(segment_length=4, xl_length=3)
    for start in (0, 4, 8):
        local.begin(4)
        local.extend(1, tagged(4, start), tagged(4, start))
        local.commit()
    tensors, counters = local.state_dict()
    again = LocalContext(segment_length=4, xl_length=3)
    again.load_state_dict(tensors, counters, {1: torch.device("cpu")})
    assert again.tokens_seen == local.tokens_seen == 12 and torch.equal(again.cache[1][0], local.cache[1][0])
    local.begin(1)
    with pytest.raises(RuntimeError, match="in the middle of a forward"):
        local.state_dict()


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("position_mode", ["rebase", "absolute"])
def test_an_evicting_xl_cache_equals_transformers_with_a_cut_dynamic_cache(name, position_mode, request):
    """A document 5x longer than the cache, segments that do not divide it, keys re-rotated every segment."""
    model = request.getfixturevalue(name)
    xl, segment = 16, 12
    ids = document(5 * xl + 7, seed=11)
    expected = cut_cache_logits(model, ids, segment, xl)
    assert not torch.allclose(expected, model(ids).logits, atol=1e-2)  # eviction changes what the model sees
    mem_model = attach(model, MemoryConfig(segment_length=segment, xl_length=xl, memory_layers=(),
                                           position_mode=position_mode))
    torch.testing.assert_close(session_logits(mem_model, ids), expected, atol=1e-4, rtol=0)
    # and fed in pieces that cut segments anywhere
    torch.testing.assert_close(session_logits(mem_model, ids, chunks=[5, 20, 1, 33, 28]), expected, atol=1e-4, rtol=0)


def test_a_long_stream_reuses_one_room_per_layer_and_one_id_ring(tiny_llama):
    """Nothing a stream keeps is allocated per segment: the XL cache is a view of a room made once per layer, the
    token ids a ring; and the stream streamed through rooms gives transformers' own evicting cache's logits."""
    config = MemoryConfig(segment_length=16, xl_length=24, memory_layers=(-1,), top_k=4, memory_capacity=64)
    mem_model = attach(tiny_llama, config)
    ids = document(16 * 12, seed=9)
    with mem_model.session(history_tokens=40) as session:
        session.feed(ids[:, :32])
        rooms = {layer: (k.data_ptr(), v.data_ptr()) for layer, (k, v) in session.state.local.rooms.items()}
        ring = session.history.ids.data_ptr()
        for start in range(32, 192, 16):
            session.feed(ids[:, start : start + 16])
        local = session.state.local
        assert {layer: (k.data_ptr(), v.data_ptr()) for layer, (k, v) in local.rooms.items()} == rooms
        for layer, (k, v) in local.cache.items():  # the cache is the front of its room
            assert k.data_ptr() == rooms[layer][0] and v.data_ptr() == rooms[layer][1] and k.shape[2] == 24
        assert session.history.ids.data_ptr() == ring and session.history.ids.shape[1] == 40
        assert torch.equal(session.stream_ids()[0], ids[:, -40:])
    mem_model.detach()
    plain = attach(tiny_llama, MemoryConfig(segment_length=16, xl_length=24, memory_layers=()))
    with plain.session() as session:
        session.feed(ids[:, :32])
        reference = [session.feed(ids[:, start : start + 16], return_logits=True).logits
                     for start in range(32, 192, 16)]
    plain.detach()
    expected = cut_cache_logits(tiny_llama, ids, segment=16, xl=24)[:, 32:]
    torch.testing.assert_close(torch.cat(reference, dim=1), expected, atol=1e-5, rtol=0)
