"""Ring Attention (memlm/kernels/ring_attention.py) and use_attention(model, "ring"): every rank's shard, gathered and
unsharded, against full attention on one process (scaled_dot_product_attention, attention_block, a tiny Llama) on
2, 3 and 4 gloo ranks; the layouts' round trip; the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import transformers

from memlm import attach, ring_shard_inputs, use_attention
from memlm.config import MemoryConfig
from memlm.kernels import attention_block, ring_attention, ring_shard, ring_unshard

#: (q heads, kv heads, tokens per chunk of the 2N-chunk zigzag, causal, layout)
CASES = [(4, 4, 3, True, "zigzag"), (4, 2, 5, True, "zigzag"), (6, 2, 2, False, "zigzag"),
         (4, 1, 3, True, "contiguous"), (4, 2, 4, False, "contiguous")]


def inputs(q_heads, kv_heads, n, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, h, n, 8, dtype=dtype, generator=g) for h in (q_heads, kv_heads, kv_heads))


def llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      attention_dropout=0.0)
    return transformers.LlamaForCausalLM(config).double()


def gather(t: torch.Tensor, world: int, layout: str) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return ring_unshard(parts, 2, layout)


def check_kernel(rank: int, world: int) -> None:
    for q_heads, kv_heads, chunk, causal, layout in CASES:
        q, k, v = (t.requires_grad_() for t in inputs(q_heads, kv_heads, 2 * world * chunk))
        d_out = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(3))
        full = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        full.backward(d_out)
        shards = [ring_shard(t.detach(), 2, rank, world, layout).requires_grad_() for t in (q, k, v)]
        out = ring_attention(*shards, causal=causal, layout=layout)
        out.backward(ring_shard(d_out, 2, rank, world, layout))
        for got, expected in zip((out.detach(), *(s.grad for s in shards)), (full, q.grad, k.grad, v.grad),
                                 strict=True):
            torch.testing.assert_close(gather(got, world, layout), expected, rtol=1e-9, atol=1e-9)
    # the lse is differentiable too: a loss on both outputs, against attention_block over the whole sequence
    q, k, v = (t.requires_grad_() for t in inputs(4, 2, 4 * world, seed=5))
    out, lse = attention_block(q, k, v, causal=True)
    (out.sum() + (lse * torch.linspace(-1, 1, lse.shape[-1], dtype=lse.dtype)).sum()).backward()
    shards = [ring_shard(t.detach(), 2, rank, world).requires_grad_() for t in (q, k, v)]
    out_s, lse_s = ring_attention(*shards, return_lse=True)
    weights = ring_shard(torch.linspace(-1, 1, lse.shape[-1], dtype=lse.dtype), 0, rank, world)
    (out_s.sum() + (lse_s * weights).sum()).backward()
    parts = [torch.empty_like(lse_s) for _ in range(world)]
    dist.all_gather(parts, lse_s.detach())
    torch.testing.assert_close(ring_unshard(parts, 2), lse.detach(), rtol=1e-9, atol=1e-9)
    for shard, whole in zip(shards, (q, k, v), strict=True):
        torch.testing.assert_close(gather(shard.grad, world, "zigzag"), whole.grad, rtol=1e-9, atol=1e-9)
    # float32 accumulates in float32 and matches to float32 precision
    q, k, v = inputs(4, 2, 6 * world, dtype=torch.float32)
    out = ring_attention(*(ring_shard(t, 2, rank, world) for t in (q, k, v)))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(gather(out, world, "zigzag"), full, rtol=1e-5, atol=1e-5)


def check_refusals(rank: int, world: int) -> None:
    q, k, v = inputs(4, 2, 4 if rank == 0 else 6)  # shards of different lengths: every rank raises, none hangs
    with pytest.raises(ValueError, match="one shape and dtype"):
        ring_attention(q, k, v)
    q, k, v = inputs(4, 2, 5)
    with pytest.raises(ValueError, match="two equal chunks"):
        ring_attention(q, k, v)
    with pytest.raises(ValueError, match="no cache"):
        ring_attention(q, k[:, :, :3], v[:, :, :3], layout="contiguous")


def check_llama(rank: int, world: int) -> None:
    """Logits, the loss and every parameter gradient of a sharded Llama equal the single-process model."""
    ids = torch.randint(0, 64, (2, 8 * world), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100
    single = llama()
    logits = single(input_ids=ids).logits
    # float64 loss (transformers' loss upcasts to float32 only): sum over scored tokens / their count
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    (F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / (targets != -100).sum()).backward()
    model = use_attention(llama(), "ring")
    inputs_ = ring_shard_inputs(ids, labels)
    gathers, all_gather = [], dist.all_gather
    dist.all_gather = lambda *args, **kwargs: (gathers.append(1), all_gather(*args, **kwargs))[1]
    try:
        sharded = model(**inputs_, use_cache=False)
    finally:
        dist.all_gather = all_gather
    assert len(gathers) == 1 < model.config.num_hidden_layers  # shapes and positions checked once per forward
    shard_loss = F.cross_entropy(sharded.logits.flatten(0, 1), inputs_["shift_labels"].flatten(),
                                 reduction="sum") / inputs_["num_items_in_batch"]
    shard_loss.backward()
    torch.testing.assert_close(gather(sharded.logits.detach()[:, None], world, "zigzag")[:, 0], logits.detach(),
                               rtol=1e-9, atol=1e-9)
    hf_loss = sharded.loss.detach().clone()  # transformers' own loss: the shards' shares sum to the whole
    dist.all_reduce(hf_loss)
    torch.testing.assert_close(hf_loss, single(input_ids=ids, labels=labels).loss.detach(), rtol=1e-6, atol=1e-6)
    for (name, p), (_, p_single) in zip(model.named_parameters(), single.named_parameters(), strict=True):
        dist.all_reduce(p.grad)
        torch.testing.assert_close(p.grad, p_single.grad, rtol=1e-9, atol=1e-9, msg=name)
    # a memory session streams segments: on a ring model it is refused, not silently wrong
    mem_model = attach(model, MemoryConfig(segment_length=8, xl_length=8, memory_layers=[]))
    with pytest.raises(ValueError, match=r"global position|cache"), mem_model.session(batch_size=2) as session:
        session.feed(ids[:, :16])
    mem_model.detach()


def _rank(rank: int, world: int, store: str, checks: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        for check in checks:
            globals()[check](rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_attention_over_gloo_ranks_equals_full_attention_in_outputs_and_gradients(world, tmp_path):
    checks = ("check_kernel", "check_refusals") + (("check_llama",) if world in (2, 3) else ())
    mp.spawn(_rank, args=(world, str(tmp_path / "store"), checks), nprocs=world, join=True)


def test_one_rank_ring_is_causal_attention(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        check_kernel(0, 1)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_shard_and_unshard_round_trip(world, layout):
    x = torch.arange(3 * 2 * world * 4 * 2).view(3, 2 * world * 4, 2)
    shards = [ring_shard(x, 1, r, world, layout) for r in range(world)]
    assert all(s.shape == (3, 8, 2) for s in shards)
    torch.testing.assert_close(ring_unshard(shards, 1, layout), x)
    assert torch.equal(torch.cat(shards, 1).sort(1).values, x)  # every token on exactly one rank


def test_zigzag_gives_rank_r_chunks_r_and_2n_minus_1_minus_r():
    x = torch.arange(12)  # 3 ranks: 6 chunks of 2
    assert ring_shard(x, 0, 0, 3).tolist() == [0, 1, 10, 11]
    assert ring_shard(x, 0, 2, 3).tolist() == [4, 5, 6, 7]
    assert ring_shard(x, 0, 1, 3, layout="contiguous").tolist() == [4, 5, 6, 7]


def test_shard_refusals():
    x = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="multiple of 6"):
        ring_shard(x, 1, 0, 3)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_shard(x, 1, 0, 2, layout="striped")
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 2\)"):
        ring_shard(torch.zeros(8), 0, 2, 2)
    with pytest.raises(ValueError, match="one shape"):
        ring_unshard([torch.zeros(4), torch.zeros(6)], 0)
    with pytest.raises(ValueError, match="non-empty list"):
        ring_unshard([], 0)


def test_without_a_process_group_ring_attention_says_what_it_needs():
    q, k, v = inputs(4, 2, 8)
    with pytest.raises(ValueError, match=r"initialized torch\.distributed process group"):
        ring_attention(q, k, v)
    model = use_attention(llama(), "ring")
    with pytest.raises(ValueError, match=r"initialized torch\.distributed process group"):
        model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"initialized torch\.distributed process group"):
        ring_shard_inputs(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"group must be a torch\.distributed ProcessGroup"):
        use_attention(llama(), "ring", group=3)
    with pytest.raises(ValueError, match="layout must be one of"):
        use_attention(llama(), "ring", layout="striped")
