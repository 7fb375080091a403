"""memlm.kernels reference: both layouts and fusions against plain attention written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memlm.kernels import memory_attention, memory_attention_ref


def inputs(q_heads=4, kv_heads=2, seq=5, ctx=9, dim=16, mem=6, top_k=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return {
        "q": r(2, q_heads, seq, dim), "k": r(2, kv_heads, ctx, dim), "v": r(2, kv_heads, ctx, dim),
        "shared_k": r(2, kv_heads, mem, dim), "shared_v": r(2, kv_heads, mem, dim),
        "retrieved_k": r(2, q_heads, seq, top_k, dim), "retrieved_v": r(2, q_heads, seq, top_k, dim),
        "gate": r(q_heads),
    }


def explicit_attention(q, keys, values, visible, scale):
    """Softmax attention with a per-query key set: q [b,h,s,d], keys/values [b,h,s,n,d], visible [b,h,s,n]."""
    scores = torch.einsum("bhsd,bhsnd->bhsn", q, keys) * scale
    probs = scores.masked_fill(~visible, -math.inf).softmax(dim=-1)
    return torch.einsum("bhsn,bhsnd->bhsd", probs, values)


def per_query(x, q_heads, seq):
    """[b, kv_heads, n, d] -> [b, q_heads, seq, n, d]: every query head sees its kv head's rows."""
    x = x.repeat_interleave(q_heads // x.shape[1], dim=1)
    return x.unsqueeze(2).expand(-1, -1, seq, -1, -1)


def local_reference(t, scale):
    q_heads, seq, ctx = t["q"].shape[1], t["q"].shape[2], t["k"].shape[2]
    visible = torch.ones(seq, ctx, dtype=torch.bool).tril(ctx - seq).expand(2, q_heads, seq, ctx)
    return explicit_attention(t["q"], per_query(t["k"], q_heads, seq), per_query(t["v"], q_heads, seq), visible, scale)


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 4), (4, 2), (4, 1)])
def test_shared_joint_is_one_softmax_over_memory_and_local_keys(q_heads, kv_heads):
    t = inputs(q_heads, kv_heads)
    mask = torch.rand(2, kv_heads, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    scale = 0.3
    out = memory_attention_ref(t["q"], t["k"], t["v"], t["shared_k"], t["shared_v"], mask, fusion="joint", scale=scale)
    keys = torch.cat([per_query(t["shared_k"], q_heads, 5), per_query(t["k"], q_heads, 5)], dim=3)
    values = torch.cat([per_query(t["shared_v"], q_heads, 5), per_query(t["v"], q_heads, 5)], dim=3)
    causal = torch.ones(5, 9, dtype=torch.bool).tril(4).expand(2, q_heads, 5, 9)
    mem_visible = mask.repeat_interleave(q_heads // kv_heads, dim=1).unsqueeze(2).expand(-1, -1, 5, -1)
    expected = explicit_attention(t["q"], keys, values, torch.cat([mem_visible, causal], dim=3), scale)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("fusion", ["gate", "joint"])
def test_retrieved_layout_equals_shared_layout_when_every_query_gets_the_same_entries(fusion):
    t = inputs()
    retrieved_k, retrieved_v = per_query(t["shared_k"], 4, 5), per_query(t["shared_v"], 4, 5)
    shared = memory_attention_ref(t["q"], t["k"], t["v"], t["shared_k"], t["shared_v"], gate=t["gate"], fusion=fusion)
    retrieved = memory_attention_ref(t["q"], t["k"], t["v"], retrieved_k, retrieved_v, gate=t["gate"], fusion=fusion)
    torch.testing.assert_close(retrieved, shared)


def test_gate_mixes_two_separate_softmaxes_per_head():
    t = inputs()
    scale = 1 / 4
    mask = torch.ones(2, 4, 5, 3, dtype=torch.bool)
    mask[:, :, :, 2] = False
    out = memory_attention_ref(t["q"], t["k"], t["v"], t["retrieved_k"], t["retrieved_v"], mask, gate=t["gate"])
    memory = explicit_attention(t["q"], t["retrieved_k"], t["retrieved_v"], mask, scale)
    g = torch.sigmoid(t["gate"]).view(1, -1, 1, 1)
    torch.testing.assert_close(out, g * memory + (1 - g) * local_reference(t, scale))


@pytest.mark.parametrize("fusion", ["gate", "joint"])
def test_queries_without_memory_get_the_local_result(fusion):
    t = inputs()
    mask = torch.ones(2, 4, 5, 3, dtype=torch.bool)
    mask[0, 1, 2] = False  # one query has no entry at all
    mask[1] = False  # nor has the whole second sequence
    out = memory_attention_ref(t["q"], t["k"], t["v"], t["retrieved_k"], t["retrieved_v"], mask, gate=t["gate"],
                               fusion=fusion)
    local = local_reference(t, 1 / 4)
    torch.testing.assert_close(out[0, 1, 2], local[0, 1, 2])
    torch.testing.assert_close(out[1], local[1])
    assert not torch.allclose(out[0, 0], local[0, 0])
    no_memory = memory_attention(t["q"], t["k"], t["v"])
    torch.testing.assert_close(no_memory, local)


def test_gate_gradient_matches_finite_differences():
    t = inputs(seq=3, ctx=4, dim=8, top_k=2)
    gate = t["gate"].clone().requires_grad_()
    q = t["q"].clone().requires_grad_()

    def f(q, gate):
        return memory_attention_ref(q, t["k"], t["v"], t["retrieved_k"], t["retrieved_v"], gate=gate)

    assert torch.autograd.gradcheck(f, (q, gate))


def test_local_part_uses_sdpa_semantics_for_a_square_context():
    t = inputs(q_heads=2, kv_heads=2, seq=7, ctx=7)
    expected = F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True)
    torch.testing.assert_close(memory_attention_ref(t["q"], t["k"], t["v"]), expected)


def test_bad_arguments_say_what_was_expected():
    t = inputs()
    q, k, v = t["q"], t["k"], t["v"]
    cases = [
        ((q[0], k, v), {}, ValueError, "q must be a 4-d tensor"),
        ((q, k, v[..., :8]), {}, ValueError, "k and v must both be"),
        ((q, k[:, :1].expand(-1, 3, -1, -1), v[:, :1].expand(-1, 3, -1, -1)), {}, ValueError, "multiple of kv_heads"),
        ((q, k[:, :, :3], v[:, :, :3]), {}, ValueError, "ctx >= seq"),
        ((q, k, v, t["shared_k"]), {}, ValueError, "given together"),
        ((q, k, v, t["shared_k"][..., :8], t["shared_v"][..., :8]), {"gate": t["gate"]}, ValueError, "mem_k must be"),
        ((q, k, v, t["shared_k"], t["shared_v"]), {}, ValueError, "needs gate logits of shape \\[q_heads=4\\]"),
        ((q, k, v, t["shared_k"], t["shared_v"], torch.ones(2, 2, 6)), {"gate": t["gate"]}, ValueError,
         "mem_mask must be a bool tensor of shape \\[2, 2, 6\\]"),
        ((q, k, v), {"fusion": "add"}, ValueError, "fusion must be one of"),
        ((q.long(), k, v), {}, TypeError, "q must be floating point"),
    ]
    for args, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            memory_attention(*args, **kwargs)
