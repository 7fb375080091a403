"""Benchmark the fused Triton memory attention against the unfused torch path.

    python benchmarks/bench_kernels.py            # GPU: the full table; CPU: the reference path + a compile check
    python benchmarks/bench_kernels.py --quick    # fewer, shorter shapes

Workload (the issue's): batch 1, 32 query heads (and 32 kv heads), head_dim 128, seq 512 / 2048 / 8192
with a causal local context of the same length, retrieved memory with top_k 32 per query, gate
fusion, bfloat16. FLOPs count the matrix products only: local causal attention 4 * heads * d * (visible
query-key pairs), memory 4 * heads * seq * top_k * d; the backward is counted as 2.5x the forward.

* fused fwd / fwd+bwd: ``memory_attention_triton``.
* unfused fwd / fwd+bwd: ``memory_attention_ref`` (SDPA for the local part, then the memory scores,
  softmax, weighted values and the gate mix as separate torch ops).
* local only: the Triton kernels without memory against ``scaled_dot_product_attention`` itself.

On a machine without a GPU the script says so, times the reference path in float32 on smaller shapes,
and compiles the Triton kernels for sm_80 and sm_90 (no GPU is needed to compile) to show they build.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from bench_index import table, timed

from memlm.kernels import memory_attention_ref

from machine import describe

HEADS, HEAD_DIM, TOP_K = 32, 128, 32


def inputs(seq: int, device: str, dtype: torch.dtype, heads: int = HEADS, requires_grad: bool = False) -> dict:
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    args = {"q": r(1, heads, seq, HEAD_DIM), "k": r(1, heads, seq, HEAD_DIM), "v": r(1, heads, seq, HEAD_DIM)}
    for name in args:
        args[name].requires_grad_(requires_grad)
    args["mem_k"], args["mem_v"] = r(1, heads, seq, TOP_K, HEAD_DIM), r(1, heads, seq, TOP_K, HEAD_DIM)
    args["gate"] = torch.zeros(heads, device=device, requires_grad=requires_grad)
    return args


def flops(seq: int, heads: int = HEADS, memory: bool = True) -> float:
    """Forward FLOPs of the matrix products (causal: seq * (seq + 1) / 2 visible pairs per head)."""
    local = 4 * heads * HEAD_DIM * seq * (seq + 1) / 2
    return local + (4 * heads * seq * TOP_K * HEAD_DIM if memory else 0)


def forward_backward(function, args: dict) -> callable:
    out_grad = torch.randn_like(args["q"])

    def step():
        out = function(**args)
        torch.autograd.grad(out, [args[n] for n in ("q", "k", "v", "gate")], out_grad, allow_unused=True)

    return step


def bench_gpu(seqs: list[int]) -> None:
    import triton.testing

    from memlm.kernels.fused import memory_attention_triton

    def ms(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100)

    rows, local_rows = [], []
    for seq in seqs:
        args = inputs(seq, "cuda", torch.bfloat16, requires_grad=True)
        with torch.no_grad():
            fused_fwd = ms(lambda args=args: memory_attention_triton(**args))
            unfused_fwd = ms(lambda args=args: memory_attention_ref(**args))
        fused_both = ms(forward_backward(memory_attention_triton, args))
        unfused_both = ms(forward_backward(memory_attention_ref, args))
        gflop = flops(seq) / 1e9  # GFLOP / ms = TFLOP/s
        rows.append([seq, f"{fused_fwd:.3f}", f"{gflop / fused_fwd:.1f}", f"{unfused_fwd:.3f}",
                     f"{gflop / unfused_fwd:.1f}",
                     f"{unfused_fwd / fused_fwd:.2f}x", f"{fused_both:.3f}", f"{unfused_both:.3f}",
                     f"{unfused_both / fused_both:.2f}x"])
        q, k, v = args["q"].detach(), args["k"].detach(), args["v"].detach()
        with torch.no_grad():
            local = ms(lambda q=q, k=k, v=v: memory_attention_triton(q, k, v))
            sdpa = ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        local_gflop = flops(seq, memory=False) / 1e9
        local_rows.append([seq, f"{local:.3f}", f"{local_gflop / local:.1f}", f"{sdpa:.3f}",
                           f"{local_gflop / sdpa:.1f}", f"{sdpa / local:.0%}"])
        del args
    device = torch.cuda.get_device_name()
    table(f"Fused vs unfused memory attention ({device}; bf16, batch 1, {HEADS} heads, d {HEAD_DIM}, "
          f"top_k {TOP_K}, gate; ms and TFLOP/s)",
          ["seq", "fused fwd ms", "TFLOP/s", "unfused fwd ms", "TFLOP/s", "fwd speed-up", "fused fwd+bwd ms",
           "unfused fwd+bwd ms", "fwd+bwd speed-up"], rows)
    table(f"Local part alone: Triton kernel vs SDPA ({device}; causal, no memory)",
          ["seq", "Triton ms", "TFLOP/s", "SDPA ms", "TFLOP/s", "Triton / SDPA throughput"], local_rows)


def bench_cpu(seqs: list[int], heads: int, repeat: int) -> None:
    print(f"No GPU present: timing the reference path (what memlm runs on the CPU) with {heads} heads, float32, "
          f"on {torch.get_num_threads()} threads; the Triton kernels are compiled below, not run.")
    rows = []
    for seq in seqs:
        args = inputs(seq, "cpu", torch.float32, heads=heads, requires_grad=True)
        with torch.no_grad():
            fwd = timed(lambda args=args: memory_attention_ref(**args), repeat) * 1e3
            q, k, v = (args[n].detach() for n in ("q", "k", "v"))
            sdpa = timed(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeat) * 1e3
        both = timed(forward_backward(memory_attention_ref, args), repeat) * 1e3
        gf = flops(seq, heads) / 1e9
        rows.append([seq, f"{fwd:.1f}", f"{gf / fwd * 1e3:.1f}", f"{both:.1f}", f"{sdpa:.1f}",
                     f"{(fwd - sdpa) / fwd:.0%}"])
    table(f"Reference path on the CPU (float32, batch 1, {heads} heads, d {HEAD_DIM}, top_k {TOP_K}, gate)",
          ["seq", "fwd ms", "GFLOP/s", "fwd+bwd ms", "local SDPA alone ms", "share outside SDPA"], rows)


def compile_check(archs: tuple[int, ...] = (80, 90)) -> None:
    """Compile the three kernels for NVIDIA targets without a GPU and report their shared memory."""
    import os

    os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from memlm.kernels import fused

    pointers = {name: "*bf16" for name in ("Q", "K", "V", "MK", "MV", "OUT", "PARTS", "DQ", "DO_L", "DO_M", "DO",
                                          "DK", "DV")}
    pointers.update(MMASK="*u8", VALID="*u8", GATE_LOGITS="*fp32", LSE="*fp32", DELTA="*fp32")
    shared = {"CAUSAL": True, "DOT_F32": False, "PRECISION": "tf32", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128}
    cases = [
        ("forward, retrieved, gate", fused._forward,
         {"LAYOUT": "retrieved", "GATE": True, "HAS_MASK": True, "SAVE_PARTS": True}),
        ("forward, shared, joint", fused._forward,
         {"LAYOUT": "shared", "GATE": False, "HAS_MASK": True, "SAVE_PARTS": False}),
        ("backward dQ, retrieved, gate", fused._backward_q, {"LAYOUT": "retrieved", "GATE": True, "HAS_MASK": True}),
        ("backward dK/dV", fused._backward_kv, {"HAS_VALID": True}),
    ]
    rows = []
    for arch in archs:
        for name, kernel, constexprs in cases:
            jit = kernel.fn  # under the autotuner
            constexprs = {k: v for k, v in {**shared, **constexprs}.items() if k in jit.arg_names}
            signature = {
                arg: "constexpr" if arg in constexprs else pointers.get(arg, "fp32" if "scale" in arg else "i32")
                for arg in jit.arg_names
            }
            start = time.perf_counter()
            compiled = triton.compile(ASTSource(jit, signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32))
            rows.append([f"sm_{arch}", name, f"{compiled.metadata.shared // 1024} KiB",
                         f"{time.perf_counter() - start:.1f}"])
    table("Triton kernels compiled for NVIDIA GPUs on this CPU machine (bf16, head_dim 128, blocks 64x64)",
          ["target", "kernel", "shared memory", "compile s (0.0: Triton's disk cache)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter shapes")
    args = parser.parse_args()
    print(describe())
    if torch.cuda.is_available():
        bench_gpu([512, 2048] if args.quick else [512, 2048, 8192])
    else:
        bench_cpu([512] if args.quick else [512, 2048], heads=8 if args.quick else HEADS, repeat=3)
        compile_check((90,) if args.quick else (80, 90))


if __name__ == "__main__":
    main()
