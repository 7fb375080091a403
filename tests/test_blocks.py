"""Blocks of (out, lse) and their merge, and memory attention built on them, against naive float64 loops (1e-12).

The references below are written from the definitions, one query and one key at a time, with Python
floats: no tensor code of memlm is reused.
"""

from __future__ import annotations

import math

import pytest
import torch

from memlm.kernels import attention_block, attention_output, causal_mask, memory_attention_ref, merge_blocks

TOL = {"atol": 1e-12, "rtol": 0.0}


def naive_softmax_attention(q, keys, values, visible, scale, softcap=None, sink=None):
    """One query q [d] over keys/values [n, d] (lists of float64 tensors), visible [n] bools -> (out [d], lse)."""
    logits = []
    for key, seen in zip(keys, visible, strict=True):
        if not seen:
            continue
        s = float(sum(a * b for a, b in zip(q.tolist(), key.tolist(), strict=True))) * scale
        logits.append(softcap * math.tanh(s / softcap) if softcap is not None else s)
    all_logits = logits + ([sink] if sink is not None else [])
    if not all_logits:
        return torch.zeros(q.shape[0], dtype=torch.float64), -math.inf
    top = max(all_logits)
    denominator = sum(math.exp(s - top) for s in all_logits)
    lse = top + math.log(denominator)
    out = torch.zeros(q.shape[0], dtype=torch.float64)
    kept = [value for value, seen in zip(values, visible, strict=True) if seen]
    for s, value in zip(logits, kept, strict=True):
        out += math.exp(s - lse) * value
    return out, lse


def random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def naive_block(q, k, v, visible, scale, softcap=None, sinks=None):
    """attention_block by loops: visible [b, hq, n, ctx] bool; GQA by kv head h // group."""
    batch, q_heads, n, dim = q.shape
    group = q_heads // k.shape[1]
    out = torch.zeros(batch, q_heads, n, dim, dtype=torch.float64)
    lse = torch.zeros(batch, q_heads, n, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            for i in range(n):
                sink = None if sinks is None else float(sinks[h])
                o, s = naive_softmax_attention(q[b, h, i], k[b, h // group], v[b, h // group],
                                               visible[b, h, i].tolist(), scale, softcap, sink)
                out[b, h, i], lse[b, h, i] = o, s
    return out, lse


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 4), (6, 2), (3, 1)])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_attention_block_is_softmax_attention_with_its_log_denominator(q_heads, kv_heads, softcap):
    q, k, v = random(2, q_heads, 5, 8, seed=1), random(2, kv_heads, 9, 8, seed=2), random(2, kv_heads, 9, 8, seed=3)
    mask = torch.rand(2, q_heads, 5, 9, generator=torch.Generator().manual_seed(4)) > 0.4
    mask[0, 0, 0] = False  # a query that sees no key at all
    out, lse = attention_block(q, k, v, mask=mask, causal=True, scale=0.3, softcap=softcap)
    visible = mask & causal_mask(5, 9)
    expected_out, expected_lse = naive_block(q, k, v, visible, 0.3, softcap)
    assert out.dtype == lse.dtype == torch.float64
    torch.testing.assert_close(out, expected_out, **TOL)
    torch.testing.assert_close(lse, expected_lse, **TOL)
    assert lse[0, 0, 0] == -math.inf and (out[0, 0, 0] == 0).all()


@pytest.mark.parametrize(("n", "ctx", "with_mask"), [(5, 9, True), (6, 6, False), (6, 6, True), (4, 10, False)])
def test_attention_output_is_the_out_of_the_block(n, ctx, with_mask):
    """SDPA's fused route to the block's out, for when the lse is not needed (empty rows give 0 on both)."""
    q, k, v = random(2, 6, n, 8, seed=40), random(2, 2, ctx, 8, seed=41), random(2, 2, ctx, 8, seed=42)
    mask = torch.rand(2, 6, n, ctx, generator=torch.Generator().manual_seed(43)) > 0.5 if with_mask else None
    if with_mask:
        mask[1, 3, 0] = False
    expected, _ = attention_block(q, k, v, mask=mask, causal=True, scale=0.3)
    torch.testing.assert_close(attention_output(q, k, v, mask=mask, causal=True, scale=0.3), expected, **TOL)


def test_causal_mask_with_a_sliding_window_sees_the_latest_keys_only():
    visible = causal_mask(3, 6, window=2)
    assert visible.tolist() == [
        [False, False, True, True, False, False],
        [False, False, False, True, True, False],
        [False, False, False, False, True, True],
    ]


def test_merge_of_disjoint_blocks_is_the_block_of_their_union():
    q, k, v = random(1, 4, 6, 8, seed=5), random(1, 2, 11, 8, seed=6), random(1, 2, 11, 8, seed=7)
    whole = attention_block(q, k, v, scale=0.25)
    first = attention_block(q, k[:, :, :4], v[:, :, :4], scale=0.25)
    rest = attention_block(q, k[:, :, 4:], v[:, :, 4:], scale=0.25)
    out, lse = merge_blocks(*first, *rest)
    torch.testing.assert_close(out, whole[0], **TOL)
    torch.testing.assert_close(lse, whole[1], **TOL)
    # a block in which a query saw nothing leaves the other as it is; nothing in both gives 0 and -inf
    empty = (torch.zeros_like(first[0]), torch.full_like(first[1], -math.inf))
    out, lse = merge_blocks(*empty, *first)
    torch.testing.assert_close(out, first[0], **TOL)
    out, lse = merge_blocks(*empty, *empty)
    assert (out == 0).all() and (lse == -math.inf).all()


def test_merge_gradients_stay_finite_where_a_query_saw_nothing():
    """exp(-inf - -inf) is NaN: a query outside every block (a LongNet query outside all patterns) must not turn the
    gradients of the others into NaN."""
    out_a, out_b = random(1, 2, 3, 4, seed=1).requires_grad_(), random(1, 2, 3, 4, seed=2).requires_grad_()
    lse_a = torch.tensor([[[-math.inf, 0.5, 1.0]] * 2], dtype=torch.float64, requires_grad=True)
    lse_b = torch.tensor([[[-math.inf, -math.inf, 2.0]] * 2], dtype=torch.float64, requires_grad=True)
    out, lse = merge_blocks(out_a, lse_a, out_b, lse_b)
    (out.sum() + lse[:, :, 1:].sum()).backward()
    for t in (out_a, out_b, lse_a, lse_b):
        assert torch.isfinite(t.grad).all()
    assert (out_a.grad[:, :, 0] == 0).all() and (lse_a.grad[:, :, 0] == 0).all()
    torch.testing.assert_close(lse_a.grad[:, :, 1], torch.ones(1, 2, dtype=torch.float64))  # lse = lse_a there


def test_float32_inputs_give_a_float32_log_denominator_and_out_in_q_dtype():
    q, k, v = (random(1, 2, 3, 8, seed=s).to(torch.bfloat16) for s in (8, 9, 10))
    out, lse = attention_block(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


def test_dropout_keeps_the_denominator_so_dropped_blocks_still_merge_exactly():
    q, k, v = random(1, 2, 4, 8, seed=11), random(1, 2, 7, 8, seed=12), random(1, 2, 7, 8, seed=13)
    plain_out, plain_lse = attention_block(q, k, v)
    torch.manual_seed(0)
    out, lse = attention_block(q, k, v, dropout=0.5)
    torch.testing.assert_close(lse, plain_lse, **TOL)
    assert not torch.allclose(out, plain_out)
    torch.manual_seed(0)  # the same draw, by hand: drop softmax weights, scale by 1 / (1 - p)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(out, torch.nn.functional.dropout(probs, 0.5) @ v, **TOL)


def naive_memory_attention(q, k, v, mem_k, mem_v, mem_mask, gate, fusion, scale, window=None, softcap=None,
                           sinks=None):
    """memory_attention_ref's definition, one query at a time: local (causal, windowed) and retrieved entries
    [b, hq, n, top_k, d] mixed by a gate or in one softmax (sinks join the local softmax)."""
    batch, q_heads, n, _ = q.shape
    ctx, group = k.shape[2], q_heads // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(q_heads):
            for i in range(n):
                row = ctx - n + i
                local_visible = [j <= row and (window is None or j > row - window) for j in range(ctx)]
                entries = [mem_k[b, h, i, e] for e in range(mem_k.shape[3])]
                entry_values = [mem_v[b, h, i, e] for e in range(mem_k.shape[3])]
                seen = mem_mask[b, h, i].tolist()
                sink = None if sinks is None else float(sinks[h])
                if fusion == "joint":
                    keys = list(k[b, h // group]) + entries
                    values = list(v[b, h // group]) + entry_values
                    out[b, h, i] = naive_softmax_attention(q[b, h, i], keys, values, local_visible + seen, scale,
                                                           softcap, sink)[0]
                    continue
                local = naive_softmax_attention(q[b, h, i], k[b, h // group], v[b, h // group], local_visible, scale,
                                                softcap, sink)[0]
                if not any(seen):
                    out[b, h, i] = local
                    continue
                memory = naive_softmax_attention(q[b, h, i], entries, entry_values, seen, scale, softcap)[0]
                g = 1 / (1 + math.exp(-float(gate[h])))
                out[b, h, i] = g * memory + (1 - g) * local
    return out


@pytest.mark.parametrize("fusion", ["gate", "joint"])
@pytest.mark.parametrize(("window", "softcap", "with_sinks"), [(None, None, False), (3, 1.5, True)])
def test_memory_attention_ref_is_its_definition_in_float64(fusion, window, softcap, with_sinks):
    q, k, v = random(2, 4, 5, 8, seed=20), random(2, 2, 9, 8, seed=21), random(2, 2, 9, 8, seed=22)
    mem_k, mem_v = random(2, 4, 5, 3, 8, seed=23), random(2, 4, 5, 3, 8, seed=24)
    mem_mask = torch.rand(2, 4, 5, 3, generator=torch.Generator().manual_seed(25)) > 0.3
    mem_mask[1, 2] = False
    gate, sinks = random(4, seed=26), random(4, seed=27) if with_sinks else None
    out = memory_attention_ref(q, k, v, mem_k, mem_v, mem_mask, gate=gate, fusion=fusion, scale=0.35, window=window,
                               softcap=softcap, sinks=sinks)
    expected = naive_memory_attention(q, k, v, mem_k, mem_v, mem_mask, gate, fusion, 0.35, window, softcap, sinks)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, **TOL)


def test_shared_memory_joint_is_one_float64_softmax():
    q, k, v = random(1, 4, 3, 8, seed=30), random(1, 2, 6, 8, seed=31), random(1, 2, 6, 8, seed=32)
    mem_k, mem_v = random(1, 2, 5, 8, seed=33), random(1, 2, 5, 8, seed=34)
    mem_mask = torch.tensor([[[True, False, True, True, False], [False, True, True, True, True]]])
    out = memory_attention_ref(q, k, v, mem_k, mem_v, mem_mask, fusion="joint", scale=0.3)
    # the shared layout is the retrieved layout with every query given the same entries
    per_query = lambda t: t.repeat_interleave(2, dim=1).unsqueeze(2).expand(-1, -1, 3, -1, -1)  # noqa: E731
    mask = mem_mask.repeat_interleave(2, dim=1).unsqueeze(2).expand(-1, -1, 3, -1)
    expected = naive_memory_attention(q, k, v, per_query(mem_k), per_query(mem_v), mask, None, "joint", 0.3)
    torch.testing.assert_close(out, expected, **TOL)


def test_bad_block_inputs_say_what_was_expected():
    q = random(1, 4, 3, 8)
    with pytest.raises(ValueError, match="q_heads \\(4\\) must be a multiple of kv_heads \\(3\\)"):
        attention_block(q, random(1, 3, 5, 8), random(1, 3, 5, 8))
    with pytest.raises(ValueError, match="k and v must both be"):
        attention_block(q, random(1, 2, 5, 8), random(1, 2, 4, 8))
    with pytest.raises(TypeError, match="mask must be bool"):
        attention_block(q, random(1, 2, 5, 8), random(1, 2, 5, 8), mask=torch.ones(3, 5))
    with pytest.raises(ValueError, match="does not broadcast"):
        attention_block(q, random(1, 2, 5, 8), random(1, 2, 5, 8), mask=torch.ones(3, 4, dtype=torch.bool))


def joint_inputs(n: int, ctx: int, seed: int) -> dict:
    """memory_attention's arguments for block retrieval's joint fusion, float64: 6 query heads over 3 key/value
    heads, n queries at the end of ctx local keys, 10 shared memory entries, some absent, one key/value head with
    none at all."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 6, n, 16, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, 3, ctx, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    mem_k, mem_v = (torch.randn(2, 3, 10, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    mem_mask = torch.rand(2, 3, 10, generator=generator) > 0.3
    mem_mask[1, 2] = False
    return dict(q=q, k=k, v=v, mem_k=mem_k, mem_v=mem_v, mem_mask=mem_mask, fusion="joint")


@pytest.mark.parametrize("n,ctx", [(7, 7), (7, 19), (1, 12)])
def test_joint_memory_attention_by_flash_blocks_is_the_reference(n, ctx, monkeypatch):
    """Block retrieval's joint softmax over [shared memory ; cache ; causal segment] as torch's flash blocks equals
    the reference (float64), with grouped heads, absent entries and a key/value head with no memory at all; auto
    takes it without a graph only, and a forced flash path refuses what it cannot compute."""
    from memlm.kernels import memory_attention, select_kernel

    args = joint_inputs(n, ctx, seed=n + ctx)
    q = args["q"]
    assert select_kernel(**args) == "flash"
    torch.testing.assert_close(memory_attention(**args), memory_attention_ref(**args), atol=1e-12, rtol=0)
    assert select_kernel(**{**args, "q": q.clone().requires_grad_()}) == "ref"  # training keeps the reference
    assert select_kernel(**{**args, "fusion": "gate", "gate": torch.zeros(6)}) == "ref"
    monkeypatch.setenv("MEMLM_KERNEL", "flash")
    with pytest.raises(ValueError, match="MEMLM_KERNEL=flash runs the joint fusion over shared memory"):
        memory_attention(**{**args, "fusion": "gate", "gate": torch.zeros(6, dtype=torch.float64)})


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_joint_memory_attention_in_half_precision_takes_the_flash_blocks(dtype, tolerance):
    """A bfloat16 / float16 model's block retrieval on CPU runs torch's flash kernel too (auto, without a graph),
    and equals the float64 reference to the dtype's rounding."""
    from memlm.kernels import memory_attention, select_kernel

    exact = joint_inputs(7, 19, seed=5)
    half = {**exact, **{name: exact[name].to(dtype) for name in ("q", "k", "v", "mem_k", "mem_v")}}
    assert select_kernel(**half) == "flash"
    out = memory_attention(**half)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), memory_attention_ref(**exact), atol=tolerance, rtol=tolerance)
