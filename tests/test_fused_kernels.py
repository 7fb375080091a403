"""The fused Triton kernels against the torch reference.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by
conftest.py before triton is first imported); with one they run compiled on CUDA tensors.
Shapes are small but cross block edges: queries and keys are not multiples of the 16-wide blocks
the interpreter uses, and the context carries an XL offset (ctx > seq).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from memlm.kernels import memory_attention, memory_attention_ref, select_kernel

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def fused():
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    return importlib.import_module("memlm.kernels.fused")


def make_inputs(layout, q_heads=4, kv_heads=2, seq=20, ctx=33, dim=32, top_k=5, mem_len=19, dtype=torch.float32,
                seed=0):
    """Random arguments with masks that leave some queries (retrieved) or a whole row (shared) without memory."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    batch = 2
    args = {
        "q": r(batch, seq, q_heads, dim).transpose(1, 2),  # the runtime's strided layout
        "k": r(batch, kv_heads, ctx, dim), "v": r(batch, kv_heads, ctx, dim),
        "gate": r(q_heads).float(),
    }
    if layout == "retrieved":
        args["mem_k"], args["mem_v"] = r(batch, q_heads, seq, top_k, dim), r(batch, q_heads, seq, top_k, dim)
        mask = torch.rand(batch, q_heads, seq, top_k, generator=g) > 0.3
        mask[0, 1, seq // 3] = False  # a query without memory
        mask[1, :, : seq // 2] = False  # half a sequence without memory
        args["mem_mask"] = mask.to(DEVICE)
    elif layout == "shared":
        args["mem_k"], args["mem_v"] = r(batch, kv_heads, mem_len, dim), r(batch, kv_heads, mem_len, dim)
        mask = torch.rand(batch, kv_heads, mem_len, generator=g) > 0.3
        mask[1, 0] = False  # a kv head whose queries have no memory at all
        args["mem_mask"] = mask.to(DEVICE)
    return args


def forward_and_grads(function, args, fusion, grad_out, causal=True):
    """Output and gradients of every floating input that gets one (retrieved memory is stop-gradient)."""
    args = {name: t.detach().clone().requires_grad_(name not in ("mem_mask",)) for name, t in args.items()}
    out = function(**args, fusion=fusion, causal=causal)
    wanted = [name for name in ("q", "k", "v", "mem_k", "mem_v", "gate") if name in args]
    grads = torch.autograd.grad(out, [args[name] for name in wanted], grad_out, allow_unused=True)
    return out, dict(zip(wanted, grads, strict=True))


def assert_matches_reference(fused, layout, fusion, causal=True, **shape):
    args = make_inputs(layout, **shape)
    grad_out = torch.randn(args["q"].shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, grads = forward_and_grads(fused.memory_attention_triton, args, fusion, grad_out, causal)
    expected, expected_grads = forward_and_grads(memory_attention_ref, args, fusion, grad_out, causal)
    torch.testing.assert_close(out, expected)
    for name, grad in grads.items():
        reference = expected_grads[name]
        if reference is None:  # the gate without gate fusion, retrieved memory
            assert grad is None or not grad.any(), name
        else:
            torch.testing.assert_close(grad, reference, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("layout", ["none", "retrieved", "shared"])
@pytest.mark.parametrize("fusion", ["gate", "joint"])
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 4), (4, 2)])
def test_forward_and_backward_equal_the_reference_in_float32(fused, layout, fusion, q_heads, kv_heads):
    assert_matches_reference(fused, layout, fusion, q_heads=q_heads, kv_heads=kv_heads)


@pytest.mark.parametrize(("layout", "fusion", "dim"), [
    ("retrieved", "gate", 16), ("shared", "joint", 16), ("retrieved", "joint", 64), ("shared", "gate", 64),
    ("shared", "gate", 48),  # not a power of two: the kernels pad the head dimension
])
def test_head_dims(fused, layout, fusion, dim):
    assert_matches_reference(fused, layout, fusion, q_heads=4, kv_heads=1, dim=dim)


@pytest.mark.parametrize(("seq", "ctx", "causal"), [(1, 40, True), (1, 40, False), (17, 17, True), (30, 12, False)])
def test_generation_square_and_non_causal_contexts(fused, seq, ctx, causal):
    assert_matches_reference(fused, "retrieved", "gate", causal=causal, seq=seq, ctx=ctx)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("layout", "fusion"), [("retrieved", "gate"), ("shared", "joint")])
def test_low_precision_error_is_within_three_times_the_reference_error(fused, dtype, layout, fusion):
    """Against the float32 reference, the kernels err at most 3x as much as the reference run on inputs of that
    dtype (which rounds only its inputs and outputs: it multiplies and normalises in float32, the kernels multiply
    in the dtype)."""
    args = make_inputs(layout, seq=40, ctx=70, dim=64, top_k=8, mem_len=40)
    grad_out = torch.randn(args["q"].shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    exact, exact_grads = forward_and_grads(memory_attention_ref, args, fusion, grad_out)
    low = {name: t if name in ("gate", "mem_mask") else t.to(dtype) for name, t in args.items()}
    results = {
        kernel: forward_and_grads(function, low, fusion, grad_out.to(dtype))
        for kernel, function in (("ref", memory_attention_ref), ("triton", fused.memory_attention_triton))
    }
    atol = 1e-4 if dtype == torch.float16 else 1e-3

    def error(result, name):
        value = result[0] if name == "out" else result[1][name]
        return (value.float() - (exact if name == "out" else exact_grads[name])).abs().max().item()

    for name in ["out", *(name for name, grad in exact_grads.items() if grad is not None)]:
        assert error(results["triton"], name) <= 3 * error(results["ref"], name) + atol, name


def test_retrieved_memory_is_stop_gradient_on_both_paths(fused):
    args = make_inputs("retrieved")
    for function in (fused.memory_attention_triton, memory_attention_ref):
        q, mem_k = args["q"].clone().requires_grad_(), args["mem_k"].clone().requires_grad_()
        out = function(q, args["k"], args["v"], mem_k, args["mem_v"], args["mem_mask"], args["gate"])
        grad_q, grad_mem_k = torch.autograd.grad(out.sum(), (q, mem_k), allow_unused=True)
        assert grad_q is not None and grad_mem_k is None


def test_unsupported_inputs_say_what_was_expected(fused):
    args = make_inputs("retrieved")
    q, k, v = args["q"], args["k"], args["v"]
    call = fused.memory_attention_triton
    with pytest.raises(ValueError, match="q, k and v must share one dtype"):
        call(q, k.half(), v)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        call(q, k.transpose(2, 3).contiguous().transpose(2, 3), v)
    with pytest.raises(ValueError, match="mem_k must have a dtype of"):
        call(q, k, v, args["mem_k"].double(), args["mem_v"].double(), gate=args["gate"])
    big = torch.zeros(1, 1, 2, 512, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim must be at most 256"):
        call(big, big, big)
    meta = torch.zeros(1, 1, 2, 16, device="meta")
    assert "need CUDA tensors" in fused.unsupported(meta, meta, meta)
    with pytest.raises(ValueError, match="mem_mask must be a bool tensor"):  # the shared shape checks apply too
        call(q, k, v, args["mem_k"], args["mem_v"], args["mem_mask"].float(), args["gate"])


def test_dispatch_follows_memlm_kernel(fused, monkeypatch):
    args = make_inputs("shared")
    expected = memory_attention_ref(**args)
    monkeypatch.setenv("MEMLM_KERNEL", "triton")
    assert select_kernel(**args) == "triton"
    torch.testing.assert_close(memory_attention(**args), expected)
    monkeypatch.setenv("MEMLM_KERNEL", "ref")
    assert select_kernel(**args) == "ref"
    monkeypatch.setenv("MEMLM_KERNEL", "auto")
    assert select_kernel(**args) == ("triton" if DEVICE == "cuda" else "ref")
    monkeypatch.setenv("MEMLM_KERNEL", "cuda")
    with pytest.raises(ValueError, match="MEMLM_KERNEL must be one of"):
        memory_attention(**args)


def test_the_runtime_runs_on_the_kernels(fused, tiny_llama, monkeypatch):
    """Streaming through XL cache + kNN memory on the Triton path: equal to a full forward (joint fusion, top-k
    covering all memory) and, with gate fusion, the same loss and gate gradients as the reference path."""
    from memlm import MemoryConfig, attach

    from conftest import document

    model = tiny_llama.to(DEVICE)
    ids = document(64, seed=3).to(DEVICE)
    calls, kernel = [], fused.memory_attention_triton

    def counted(*args):
        calls.append(args[3] is not None)  # mem_k given
        return kernel(*args)

    monkeypatch.setattr(fused, "memory_attention_triton", counted)
    monkeypatch.setenv("MEMLM_KERNEL", "triton")
    exact = MemoryConfig(segment_length=16, xl_length=16, memory_layers=(0, 1), fusion="joint",
                         memory_positions="original", top_k=40, memory_capacity=64)
    mem_model = attach(model, exact)
    with torch.no_grad(), mem_model.session() as session:
        logits = session.feed(ids, return_logits=True).logits
    mem_model.detach()
    torch.testing.assert_close(logits, model(ids).logits, atol=1e-4, rtol=0)
    # every layer of each of the 4 segments; memory from the third on (the XL cache holds the one before)
    assert len(calls) == 2 * 4 and sum(calls) == 2 * 2

    gated = MemoryConfig(segment_length=16, xl_length=16, memory_layers=(1,), top_k=8, memory_capacity=64,
                         gate_init=0.5)
    results = {}
    for path in ("triton", "ref"):
        monkeypatch.setenv("MEMLM_KERNEL", path)
        mem_model = attach(model, gated)
        with mem_model.session() as session:
            loss = session.feed(ids, labels=ids).loss
        (gate_grad,) = torch.autograd.grad(loss, mem_model.memory_module.gates)
        results[path] = loss.detach(), gate_grad
        mem_model.detach()
    torch.testing.assert_close(results["triton"], results["ref"])
    assert results["ref"][1].abs().sum() > 0


def test_the_autotune_filter_keeps_blocks_that_fit(fused):
    """The GPU configurations (the interpreter runs one) are pruned by segment length and register budget."""
    import triton

    def blocks(pairs, named_args, **meta):
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}) for m, n in pairs]
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in fused._prune(configs, named_args, **meta)]

    forward = fused._FORWARD_BLOCKS
    assert blocks(forward, {"seq": 1}, BLOCK_D=128, GATE=True, LAYOUT="retrieved") == [(16, 32)]  # generation
    assert blocks(forward, {"seq": 4096}, BLOCK_D=128, GATE=True, LAYOUT="retrieved") == [
        (64, 64), (64, 32), (32, 32), (16, 32)]  # two softmax states: smaller tiles
    assert blocks(forward, {"seq": 4096}, BLOCK_D=64, GATE=False, LAYOUT="none") == forward
    backward_kv = {"seq": 4096, "DK": None}
    assert blocks(fused._BACKWARD_BLOCKS, backward_kv, BLOCK_D=256) == [(32, 32), (16, 32)]
    assert blocks([(64, 64)], backward_kv, BLOCK_D=256) == [(64, 64)]  # nothing fits: the smallest is kept
