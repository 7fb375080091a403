"""The position policy and the kNN memory's geometry: the top-k is picked by the score the attention then uses.

References: a rotation written by hand (pairs of channels, float64) and a brute-force top-k over every
live memory entry; the session tests compare position modes, which RoPE makes equivalent.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers

from memlm import MemoryConfig, attach
from memlm.memory.knn import KNNMemory
from memlm.positions.policy import PositionPolicy

from conftest import document, session_logits

HEAD_DIM = 16


def rotary_module() -> torch.nn.Module:
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=HEAD_DIM, rope_theta=500.0)
    return transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)


def hand_rotate(x: torch.Tensor, position: float, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [..., d] rotated to ``position``: channel i pairs with i + d/2 (Llama's rotate_half), angle p * inv_freq[i]."""
    x, half = x.double(), x.shape[-1] // 2
    angle = float(position) * inv_freq.double()
    cos, sin = angle.cos(), angle.sin()
    first, second = x[..., :half], x[..., half:]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def test_rotation_matches_the_hand_rotation_at_large_and_negative_positions():
    rotary = rotary_module()
    policy = PositionPolicy("absolute", "first", rotary)
    keys = torch.randn(3, HEAD_DIM, dtype=torch.float64)
    for position in (0, 7, -13, 1_000_003):
        moved = policy.rotate(keys, torch.tensor(position))
        torch.testing.assert_close(moved, hand_rotate(keys, position, rotary.inv_freq), atol=1e-12, rtol=0)
    assert PositionPolicy("rebase", "first", None).rotate(keys, 5) is keys  # no rotary: positions live in the states


def test_a_rotation_table_rotates_as_the_hand_rotation_and_follows_new_frequencies():
    """Block memory rotates what it selects from one table per forward: its rows are the hand rotation at their
    positions (large ones too), and a table asked for again after the frequencies changed in place (dynamic NTK,
    extend_context) is recomputed."""
    from memlm.positions.rotary import apply_rotation

    rotary = rotary_module()
    policy = PositionPolicy("absolute", "first", rotary)
    keys = torch.randn(5, HEAD_DIM, dtype=torch.float64)
    for first in (-3, 1_000_000):
        cos, sin = policy.rotation_table(first, 5, keys.device, torch.float64)
        for row in range(5):
            expected = hand_rotate(keys[row], first + row, rotary.inv_freq)
            torch.testing.assert_close(apply_rotation(keys[row], cos[row], sin[row]), expected, atol=1e-9, rtol=0)
    assert policy.rotation_table(1_000_000, 5, keys.device, torch.float64)[0] is cos  # kept while nothing changed
    rotary.inv_freq.mul_(0.5)
    cos, sin = policy.rotation_table(1_000_000, 5, keys.device, torch.float64)
    expected = hand_rotate(keys[2], 1_000_002, rotary.inv_freq)
    torch.testing.assert_close(apply_rotation(keys[2], cos[2], sin[2]), expected, atol=1e-9, rtol=0)
    assert PositionPolicy("rebase", "first", None).rotation_table(0, 5, keys.device, torch.float64) is None


@pytest.mark.parametrize(("position_mode", "memory_positions"),
                         list(itertools.product(("rebase", "absolute"), ("first", "original"))))
def test_search_picks_the_brute_force_top_k_under_the_attention_score(position_mode, memory_positions):
    """FIFO memory with eviction (capacity 20 of 30 entries), top_k 4 < memory, GQA (4 query heads, 2 kv heads)."""
    rotary, top_k, local_start = rotary_module(), 4, 30
    policy = PositionPolicy(position_mode, memory_positions, rotary)
    memory = KNNMemory(index="torch", index_kwargs={}, capacity=20, top_k=top_k, batch_size=1, dtype=torch.float32,
                       positions=policy, devices={0: torch.device("cpu")})
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 30, HEAD_DIM, generator=generator)  # unrotated, document positions 0 .. 29
    values = torch.randn(1, 2, 30, HEAD_DIM, generator=generator)
    for start in range(0, 30, 10):
        memory.add(0, keys[:, :, start : start + 10], values[:, :, start : start + 10])
    memory.retrievals = []
    frame = policy.frame(local_start)
    unrotated_q = torch.randn(1, 4, 3, HEAD_DIM, generator=generator)
    q = torch.stack([hand_rotate(unrotated_q[:, :, i], frame + 5 + i, rotary.inv_freq) for i in range(3)], dim=2)
    found_k, found_v, mask = memory.read(0, q.float(), local_start, scale=0.25)
    ids = memory.retrievals[0][0]
    assert mask.all() and found_k.shape == (1, 4, 3, top_k, HEAD_DIM)

    live = range(10, 30)
    for head, i in itertools.product(range(4), range(3)):
        kv = head // 2
        attended = {}
        for j in live:
            where = frame if memory_positions == "first" else j - local_start + frame
            attended[j] = hand_rotate(keys[0, kv, j], where, rotary.inv_freq)
        scores = {j: float(q[0, head, i] @ key) for j, key in attended.items()}
        best = sorted(scores, key=scores.get, reverse=True)[:top_k]
        assert sorted(ids[0, head, i].tolist()) == sorted(best)
        for slot, j in enumerate(ids[0, head, i].tolist()):
            torch.testing.assert_close(found_k[0, head, i, slot].double(), attended[j], atol=1e-5, rtol=0)
            torch.testing.assert_close(found_v[0, head, i, slot], values[0, kv, j])
        # the recorded logits are the attention's: score x scale
        recorded = memory.retrievals[0][1][0, head, i]
        torch.testing.assert_close(recorded.double(), torch.tensor([scores[j] for j in ids[0, head, i].tolist()],
                                                                   dtype=torch.float64) * 0.25, atol=1e-5, rtol=0)


@pytest.mark.parametrize("memory_positions", ["first", "original"])
def test_saved_entries_come_back_unrotated_in_either_geometry(memory_positions):
    policy = PositionPolicy("rebase", memory_positions, rotary_module())
    memory = KNNMemory(index="torch", index_kwargs={}, capacity=8, top_k=2, batch_size=1, dtype=torch.float32,
                       positions=policy, devices={0: torch.device("cpu")})
    keys = torch.randn(1, 2, 12, HEAD_DIM)
    memory.add(0, keys[:, :, :5], keys[:, :, :5])
    memory.add(0, keys[:, :, 5:], keys[:, :, 5:])
    stored, _, first = memory.entries(0)
    assert first == 4  # entries 0 .. 3 were evicted
    torch.testing.assert_close(stored, keys[0, :, 4:], atol=1e-5, rtol=0)


def test_policy_frames_and_local_positions():
    rebase, absolute = PositionPolicy("rebase", "first", None), PositionPolicy("absolute", "first", None)
    assert rebase.frame(100) == 0 and absolute.frame(100) == 100
    assert rebase.local_positions(100, 3, 4, torch.device("cpu")).tolist() == [3, 4, 5, 6]
    assert absolute.local_positions(100, 3, 2, torch.device("cpu")).tolist() == [103, 104]


@pytest.mark.parametrize(("fusion", "memory_positions"),
                         list(itertools.product(("gate", "joint"), ("first", "original"))))
def test_rebase_equals_absolute_with_eviction_and_top_k_below_memory(tiny_llama, fusion, memory_positions):
    """RoPE depends on distances only: both position modes give one model, in every fusion x memory_positions."""
    ids = document(200, seed=7)
    logits = {}
    for mode in ("rebase", "absolute"):
        config = MemoryConfig(segment_length=16, xl_length=16, memory_layers=(0, 1), top_k=4, memory_capacity=48,
                              fusion=fusion, memory_positions=memory_positions, position_mode=mode, gate_init=0.0)
        mem_model = attach(tiny_llama, config)
        logits[mode] = session_logits(mem_model, ids)
        mem_model.detach()
    torch.testing.assert_close(logits["rebase"], logits["absolute"], atol=1e-4, rtol=0)
