"""LongNet's dilated attention (memlm/kernels/dilated_attention.py) and its differentiable fused block (flash_block.py):
against a naive float64 loop of the definition, dense attention, one process vs 2 and 4 gloo ranks, in a model."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

from memlm import use_attention
from memlm.kernels import attention_block, dilated_attention, dilated_attention_ref, flash_block

flash_module = importlib.import_module("memlm.kernels.flash_block")  # the module, not the function it exports

PATTERNS = [((4, 8), (1, 2)), ((5,), (1,)), ((3, 6, 20), (1, 2, 3)), ((8, 16), (2, 4))]


def naive(q, k, v, lengths, rates, causal=True):
    """Per head and query: the union over patterns of the keys of its sparse segment, weighted by each pattern's
    softmax denominator, i.e. one softmax over the keys of all patterns that contain the query (with multiplicity).
    Written with differentiable torch ops, one query at a time."""
    batch, q_heads, nq, d = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    rows = []
    for b in range(batch):
        for h in range(q_heads):
            kv = h // (q_heads // kv_heads)
            for qi in range(nq):
                i = n - nq + qi
                keys = []
                for w, r in zip(lengths, rates, strict=True):
                    s = i // w * w
                    if (i - s) % r != h % r:
                        continue  # the query is not in this pattern in head h
                    keys += [j for j in range(s, min(s + w, n)) if (j - s) % r == h % r and (not causal or j <= i)]
                if not keys:
                    rows.append(torch.zeros(d, dtype=q.dtype))
                    continue
                scores = torch.stack([q[b, h, qi] @ k[b, kv, j] for j in keys]) / math.sqrt(d)
                rows.append(torch.softmax(scores, 0) @ torch.stack([v[b, kv, j] for j in keys]))
    return torch.stack(rows).view(batch, q_heads, nq, d)


def inputs(q_heads, kv_heads, n, dtype=torch.float64, seed=0, batch=2, grad=False):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, n, 8, generator=generator, dtype=dtype).requires_grad_(grad)
            for h in (q_heads, kv_heads, kv_heads)]


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 4), (4, 2), (6, 2), (4, 1)])  # (6, 2): offsets split unevenly
@pytest.mark.parametrize("n", [16, 13])
@pytest.mark.parametrize("patterns", PATTERNS)
@pytest.mark.parametrize("causal", [True, False])
def test_dilated_attention_equals_a_naive_loop(q_heads, kv_heads, n, patterns, causal):
    q, k, v = inputs(q_heads, kv_heads, n, seed=n + q_heads)
    expected = naive(q, k, v, *patterns, causal=causal)
    torch.testing.assert_close(dilated_attention(q, k, v, *patterns, causal=causal), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dilated_attention_ref(q, k, v, *patterns, causal=causal), expected, rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize(("q_heads", "kv_heads", "patterns"), [(4, 2, PATTERNS[2]), (6, 2, PATTERNS[0]),
                                                                (4, 4, PATTERNS[3])])
def test_gradients_equal_the_naive_loop_through_the_mixing_weights(q_heads, kv_heads, patterns):
    q, k, v = inputs(q_heads, kv_heads, 15, seed=1, batch=1, grad=True)
    weight = torch.randn(1, q_heads, 15, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = []
    for function in (dilated_attention, naive):
        (function(q, k, v, *patterns) * weight).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_decoding_queries_equal_the_last_rows_of_the_full_attention():
    q, k, v = inputs(4, 2, 21)
    for patterns in PATTERNS:
        full = dilated_attention(q, k, v, *patterns)
        for last in (1, 4, 9):
            torch.testing.assert_close(dilated_attention(q[:, :, -last:], k, v, *patterns), full[:, :, -last:],
                                       rtol=1e-12, atol=1e-12)


def test_one_pattern_covering_the_sequence_is_dense_causal_attention():
    q, k, v = inputs(8, 2, 37)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for w in (37, 64):
        torch.testing.assert_close(dilated_attention(q, k, v, (w,), (1,)), dense, rtol=1e-12, atol=1e-12)


def test_float32_and_a_query_outside_every_pattern():
    q, k, v = inputs(4, 2, 24, dtype=torch.float32, grad=True)
    out = dilated_attention(q, k, v, (8,), (2,))  # r = 2 only: each head sees half the positions
    expected = naive(*(t.detach().double() for t in (q, k, v)), (8,), (2,))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32 and (out[:, 0, 1::2] == 0).all() and (out[:, 1, 0::2] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))  # merge_blocks of -inf and -inf: no NaN


def test_bad_patterns_are_refused():
    q, k, v = inputs(4, 2, 16)
    for lengths, rates, match in [((), (), "non-empty and of equal length"), ((4, 8), (1,), "equal length"),
                                  ((0,), (1,), "segment_lengths must be positive"),
                                  ((4,), (-1,), "dilation_rates must be positive"),
                                  ((4.0,), (1,), "positive integers"), ((True,), (1,), "positive integers")]:
        with pytest.raises(ValueError, match=match):
            dilated_attention(q, k, v, lengths, rates)
    with pytest.raises(ValueError, match="non-causal dilated attention is self-attention"):
        dilated_attention(q[:, :, -3:], k, v, (4,), (1,), causal=False)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        dilated_attention(*inputs(3, 2, 16), (4,), (1,))


# -------------------------------------------------------------------------------------------------- flash_block


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 4), (6, 2)])
@pytest.mark.parametrize(("n", "ctx", "causal"), [(9, 9, True), (7, 12, False)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernels", ["cpu flash", "pure torch"])
def test_flash_block_equals_attention_block_in_values_and_in_gradients_of_out_and_lse(
        q_heads, kv_heads, n, ctx, causal, masked, dtype, kernels, monkeypatch):
    if kernels == "pure torch":  # the path of every device without torch's CPU flash kernels
        monkeypatch.setattr(flash_module, "cpu_kernels", lambda q: None)
        monkeypatch.setattr(flash_module, "BLOCK_SCORES", 40)  # the backward in many chunks
    else:
        assert flash_module.cpu_kernels(torch.zeros(1, dtype=dtype)) is not None  # this torch has them
    generator = torch.Generator().manual_seed(n + q_heads)
    q = torch.randn(2, q_heads, n, 8, dtype=dtype, generator=generator, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, ctx, 8, dtype=dtype, generator=generator, requires_grad=True) for _ in "kv")
    mask = None
    if masked:
        mask = torch.rand(2, q_heads, 1, ctx, generator=generator) > 0.4
        mask[0, 1] = False  # a head that sees nothing
        mask[1, 0, 0, 0] = False  # causal: query 0 of this head sees nothing
    weight_out = torch.randn(2, q_heads, n, 8, dtype=dtype, generator=generator)
    weight_lse = torch.randn(2, q_heads, n, dtype=dtype, generator=generator)
    results = []
    for function in (flash_block, attention_block):
        out, lse = function(q, k, v, mask=mask, causal=causal)
        ((out * weight_out).sum() + (torch.where(lse.isfinite(), lse, 0) * weight_lse).sum()).backward()
        results.append([out, lse, *(t.grad.clone() for t in (q, k, v))])
        for t in (q, k, v):
            t.grad = None
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)  # -inf lse rows equal too


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 4e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize(("n", "ctx", "causal"), [(9, 9, True), (7, 12, False)])
def test_flash_block_in_half_precision_runs_the_cpu_kernel_forward_and_the_float32_backward(
        dtype, tolerance, n, ctx, causal, monkeypatch):
    """bfloat16 / float16 on CPU: the forward is torch's flash kernel (never the score matrix), the backward the
    pure-torch one in float32; values and gradients of out and lse equal the float64 block to the dtype's rounding,
    with grouped heads and rows that see nothing; the lse comes back in float32."""
    kernels = flash_module.cpu_kernels(torch.zeros(1, dtype=dtype))
    assert kernels is not None and kernels[1] is None
    monkeypatch.setattr(flash_module, "attention_block", lambda *args, **kwargs: pytest.fail("took the score matrix"))
    generator = torch.Generator().manual_seed(n + ctx)
    q64 = torch.randn(2, 6, n, 16, dtype=torch.float64, generator=generator)
    k64, v64 = (torch.randn(2, 2, ctx, 16, dtype=torch.float64, generator=generator) for _ in "kv")
    mask = torch.rand(2, 6, 1, ctx, generator=generator) > 0.4
    mask[0, 1] = False  # a head that sees nothing
    mask[1, 0, 0, 0] = False  # causal: query 0 of this head sees nothing
    weight_out = torch.randn(2, 6, n, 16, dtype=torch.float64, generator=generator)
    weight_lse = torch.randn(2, 6, n, dtype=torch.float64, generator=generator)
    results = []
    for precision, function in ((dtype, flash_block), (torch.float64, attention_block)):
        leaves = [t.to(precision).requires_grad_() for t in (q64, k64, v64)]
        out, lse = function(*leaves, mask=mask, causal=causal)
        assert out.dtype == precision and lse.dtype == (torch.float64 if precision == torch.float64 else torch.float32)
        finite_lse = torch.where(lse.isfinite(), lse, 0).double()
        ((out.double() * weight_out).sum() + (finite_lse * weight_lse).sum()).backward()
        results.append([out.detach().double(), lse.detach().double(), *(leaf.grad.double() for leaf in leaves)])
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)  # -inf lse rows equal too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA route (memory-efficient SDPA) needs a CUDA GPU")
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 4), (8, 2)])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_block_on_cuda_runs_the_fused_kernel_in_both_directions(q_heads, kv_heads, dtype, tolerance, causal):
    """Values and gradients of out and lse against the float64 dense block (45 queries: not whole tiles of 32),
    and memory O(n): 8,192 queries and keys in 4 heads would be 1 GiB of float32 scores."""
    generator = torch.Generator().manual_seed(q_heads)
    q64 = torch.randn(2, q_heads, 45, 64, dtype=torch.float64, generator=generator)
    k64, v64 = (torch.randn(2, kv_heads, 45, 64, dtype=torch.float64, generator=generator) for _ in "kv")
    weight_out = torch.randn(2, q_heads, 45, 64, dtype=torch.float64, generator=generator)
    weight_lse = torch.randn(2, q_heads, 45, dtype=torch.float64, generator=generator)
    assert flash_module.cuda_kernels(q64.to("cuda", dtype), None) is not None
    results = []
    for device, precision, function in (("cuda", dtype, flash_block), ("cpu", torch.float64, attention_block)):
        leaves = [t.to(device, precision).requires_grad_() for t in (q64, k64, v64)]
        out, lse = function(*leaves, causal=causal)
        ((out.double() * weight_out.to(device)).sum() + (lse.double() * weight_lse.to(device)).sum()).backward()
        results.append([t.detach().double().cpu() for t in (out, lse, *(leaf.grad for leaf in leaves))])
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    torch.cuda.reset_peak_memory_stats()
    q = torch.randn(1, 4, 8192, 64, device="cuda", requires_grad=True)
    out, lse = flash_block(q, q, q, causal=True)
    (out.sum() + lse.sum()).backward()
    assert torch.cuda.max_memory_allocated() < 256 * 2**20


def test_flash_block_refuses_what_it_cannot_compute():
    q, k, v = inputs(4, 2, 8)
    with pytest.raises(ValueError, match="causal mask is square"):
        flash_block(q[:, :, :3], k, v, causal=True)
    with pytest.raises(TypeError, match="mask must be bool"):
        flash_block(q, k, v, mask=torch.ones(8, 8))
    with pytest.raises(ValueError, match="does not broadcast"):
        flash_block(q, k, v, mask=torch.ones(3, 4, 8, 8, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------- distributed


def _rank_attention(rank: int, world: int, store: str, out: str, cases) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        results = []
        for q_heads, kv_heads, n, patterns, causal in cases:
            q, k, v = inputs(q_heads, kv_heads, n, grad=True)
            weight = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(7))
            local = n // world
            shard = slice(rank * local, (rank + 1) * local)
            q_s, k_s, v_s = (t.detach()[:, :, shard].clone().requires_grad_() for t in (q, k, v))
            o = dilated_attention(q_s, k_s, v_s, *patterns, causal=causal, group=dist.group.WORLD)
            (o * weight[:, :, shard]).sum().backward()
            parts = [o.detach(), q_s.grad, k_s.grad, v_s.grad]
            gathered = [[torch.empty_like(p) for _ in range(world)] for p in parts]
            for part, into in zip(parts, gathered, strict=True):
                dist.all_gather(into, part)
            results.append([torch.cat(g, dim=2) for g in gathered])
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_over_gloo_ranks_equals_one_process_in_outputs_and_gradients(world, tmp_path):
    # n 64 on 4 ranks: shards of 16; (8, 1), (16, 2) stay local, (32, 4) spans 2 ranks, (128, 8) all of them
    cases = [(4, 2, 64, ((8, 16, 32, 128), (1, 2, 4, 8)), True), (6, 2, 64, ((16, 64), (1, 4)), True),
             (4, 4, 64, ((8, 32), (1, 2)), False)]
    out = str(tmp_path / "ranks.pt")
    mp.spawn(_rank_attention, args=(world, str(tmp_path / "store"), out, cases), nprocs=world, join=True)
    for (q_heads, kv_heads, n, patterns, causal), got in zip(cases, torch.load(out), strict=True):
        q, k, v = inputs(q_heads, kv_heads, n, grad=True)
        weight = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(7))
        o = dilated_attention(q, k, v, *patterns, causal=causal)
        (o * weight).sum().backward()
        for shard_result, single in zip(got, [o.detach(), q.grad, k.grad, v.grad], strict=True):
            torch.testing.assert_close(shard_result, single, rtol=1e-10, atol=1e-10)


def _rank_refusals(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        q, k, v = inputs(4, 2, 12 if rank == 0 else 16)
        try:
            dilated_attention(q, k, v, (4,), (1,), group=dist.group.WORLD)
        except ValueError as error:
            assert "same shape" in str(error)
        else:
            raise AssertionError("shards of different lengths were accepted")
        q, k, v = inputs(4, 2, 12)
        try:  # 8 neither divides nor is a multiple of the shard length 12
            dilated_attention(q, k, v, (8,), (1,), group=dist.group.WORLD)
        except ValueError as error:
            assert "does not fit shards of 12 tokens" in str(error)
        else:
            raise AssertionError("a pattern that straddles shards was accepted")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_attention_refuses_uneven_shards_and_straddling_segments(tmp_path):
    mp.spawn(_rank_refusals, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


# ------------------------------------------------------------------------------------------ use_attention("dilated")


def gqa_llama():
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double()


LLAMA_PATTERNS = {"segment_lengths": (8, 16, 32), "dilation_rates": (1, 2, 4)}


def test_use_attention_dilated_trains_and_generates_with_the_kernel():
    model = gqa_llama()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))

    def reference(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return dilated_attention_ref(q, k, v, (8, 16, 32), (1, 2, 4), scale=scaling).transpose(1, 2), None

    transformers.AttentionInterface.register("test_dilated_ref", reference)
    transformers.AttentionMaskInterface.register("test_dilated_ref", transformers.masking_utils.sdpa_mask)
    model.set_attn_implementation("test_dilated_ref")
    model(ids, labels=ids).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        expected_logits = model(ids).logits
    model.zero_grad()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        dense = model(ids).logits

    assert use_attention(model, "dilated", **LLAMA_PATTERNS) is model
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected_logits, rtol=1e-9, atol=1e-9)
        assert not torch.allclose(expected_logits, dense, atol=1e-6)
        # decoding with a cache reads the same patterns as recomputing every prefix
        cached = model.generate(ids[:1, :20], max_new_tokens=12, do_sample=False, pad_token_id=0)
        uncached = model.generate(ids[:1, :20], max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)
    use_attention(model, None)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, rtol=0, atol=0)


def test_use_attention_dilated_refuses_bad_settings_and_padding():
    model = gqa_llama()
    with pytest.raises(ValueError, match="equal length"):
        use_attention(model, "dilated", segment_lengths=(8, 16), dilation_rates=(1,))
    with pytest.raises(ValueError, match="ProcessGroup"):
        use_attention(model, "dilated", group="world", **LLAMA_PATTERNS)
    with pytest.raises(ValueError, match="options"):
        use_attention(model, "dilated", segment_length=8)
    use_attention(model, "dilated", **LLAMA_PATTERNS)
    ids = torch.randint(0, 300, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="unpadded batches"):
        model(ids, attention_mask=mask)


def _rank_model(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = use_attention(gqa_llama(), "dilated", group=dist.group.WORLD, **LLAMA_PATTERNS)
        ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(1))
        local = 64 // world
        shard = slice(rank * local, (rank + 1) * local)
        targets = torch.cat((ids[:, 1:], torch.full((2, 1), -100)), dim=1)  # next tokens, across shard borders
        logits = model(ids[:, shard], position_ids=torch.arange(64)[shard].expand(2, -1)).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[:, shard].flatten(), reduction="sum")
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():
            dist.all_reduce(p.grad)
            grads[name] = p.grad
        gathered = [torch.empty_like(logits) for _ in range(world)]
        dist.all_gather(gathered, logits.detach())
        if rank == 0:
            torch.save({"logits": torch.cat(gathered, dim=1), "grads": grads}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_model_sharded_over_two_ranks_equals_the_whole_model(tmp_path):
    out = str(tmp_path / "model.pt")
    mp.spawn(_rank_model, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    sharded = torch.load(out)
    model = use_attention(gqa_llama(), "dilated", **LLAMA_PATTERNS)
    ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(1))
    logits = model(ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    torch.testing.assert_close(sharded["logits"], logits.detach(), rtol=1e-9, atol=1e-9)
    for name, p in model.named_parameters():
        torch.testing.assert_close(sharded["grads"][name], p.grad, rtol=1e-8, atol=1e-10)


def test_a_recipe_fine_tunes_with_dilated_attention_and_saves_a_plain_model(tmp_path):
    from memlm.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model:\n"
        "  llama: {vocab_size: 320, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,\n"
        "          num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}\n"
        "attention: {name: dilated, segment_lengths: [16, 32, 64], dilation_rates: [1, 2, 4]}\n"
        "memory: {segment_length: 64, xl_length: 0, memory_layers: []}\n"
        "task: {name: associative_recall, pairs: 4, keys: 8, values: 8}\n"
        "train: {steps: 2, batch_size: 2, document_tokens: 64, trainable: all, progress: false}\n"
    )
    assert main(["train", "--config", str(recipe), "--output", str(tmp_path / "run")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert model.config._attn_implementation in ("sdpa", "eager")
