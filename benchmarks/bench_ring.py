"""Ring Attention over gloo ranks: per-rank peak memory and tokens/s of one causal attention layer at a fixed total
length on 1, 2 and 4 ranks, memlm's ``ring_attention`` (zigzag) beside ring-attention-pytorch's ``ring_flash_attn``
(lucidrains, PyPI, pure torch), each cell in fresh processes launched with torchrun; then both against full SDPA on
the same inputs (max abs error of the unsharded outputs).

    python benchmarks/bench_ring.py [--length 32768] [--ranks 1 2 4] [--check-length 4096]

One layer, batch 1, 8 heads of 64, float32. ``forward``: no gradients; ``train``: forward + backward of a random
projection of the output. Peak memory: the rank's peak RSS (inputs included) above its RSS after a warm-up on a
short sequence, the largest over ranks. On one CPU machine the ranks share its cores (each gets cores / ranks
threads) and gloo moves the blocks through local sockets: these timings say nothing of NCCL on GPUs. On a GPU
machine run the same script with ``--backend nccl`` (one rank per GPU, CUDA tensors; peak memory is then
``torch.cuda.max_memory_allocated``), e.g. ``python benchmarks/bench_ring.py --backend nccl --ranks 1 2 4 8``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from machine import describe

HEADS, DIM = 8, 64


def rss_mib() -> float:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def attention(name: str):
    """(q, k, v) [b, h, n_local, d] -> out [b, h, n_local, d] for this rank's shard."""
    if name == "memlm":
        from memlm.kernels import ring_attention

        return lambda q, k, v: ring_attention(q, k, v, causal=True)
    import torch.distributed as dist
    from ring_attention_pytorch import ring_flash_attn  # contiguous shards, [b, n, h, d]

    ring = dist.get_world_size() > 1  # on one rank its backward would send to itself, which gloo refuses

    def peer(q, k, v):
        out = ring_flash_attn(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, ring_reduce_col=ring)
        return out.transpose(1, 2)

    return peer


def measure(name: str, length: int, mode: str, repeats: int, device) -> dict:
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    function = attention(name)

    def inputs(tokens: int):
        generator = torch.Generator().manual_seed(rank)
        tensors = [torch.randn(1, HEADS, tokens, DIM, generator=generator).to(device) for _ in range(4)]
        return [t.requires_grad_(mode == "train") for t in tensors[:3]] + tensors[3:]

    def run(q, k, v, weight):
        with torch.set_grad_enabled(mode == "train"):
            out = function(q, k, v)
            if mode == "train":
                (out * weight).sum().backward()

    # a warm-up on a short sequence first: thread pools, kernels and gloo's buffers are set up before the baseline,
    # so the peak above it is what this length costs
    run(*inputs(2 * world * 64))
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mib()
    tensors = inputs(length // world)
    run(*tensors)  # warm-up at this length
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        run(*tensors)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    seconds = (time.perf_counter() - start) / repeats
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before  # Linux: KiB
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    return {"attention": name, "length": length, "mode": mode, "ranks": world, "seconds": seconds,
            "tokens_per_second": length / seconds, "peak_mib_per_rank": max(peaks)}


def agreement(length: int, device) -> dict:
    """Max abs error against full causal SDPA of the unsharded outputs and input gradients, float32 and float64."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from memlm.kernels import ring_shard, ring_unshard

    rank, world = dist.get_rank(), dist.get_world_size()
    errors = {}
    for dtype in (torch.float32, torch.float64):
        generator = torch.Generator().manual_seed(0)
        q, k, v, weight = (torch.randn(1, HEADS, length, DIM, generator=generator, dtype=dtype).to(device)
                           for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()
        (F.scaled_dot_product_attention(q, k, v, is_causal=True) * weight).sum().backward()
        full = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True)
        for name, layout in (("memlm", "zigzag"), ("peer", "contiguous")):
            shards = [ring_shard(t.detach(), 2, rank, world, layout).requires_grad_() for t in (q, k, v)]
            try:
                out = attention(name)(*shards)
                (out * ring_shard(weight, 2, rank, world, layout)).sum().backward()
            except RuntimeError as error:  # the peer computes in float32 only (its float64 run overflows)
                errors[f"{name} {str(dtype).removeprefix('torch.')}"] = f"fails: {str(error)[:60]}"
                continue
            worst = 0.0
            for got, expected in zip((out.detach(), *(s.grad for s in shards)), (full, q.grad, k.grad, v.grad),
                                     strict=True):
                parts = [torch.empty_like(got) for _ in range(world)]
                dist.all_gather(parts, got.contiguous())
                worst = max(worst, (ring_unshard(parts, 2, layout) - expected).abs().max().item())
            errors[f"{name} {str(dtype).removeprefix('torch.')}"] = worst
    return {"check_length": length, "ranks": world, "max_abs_error": errors}


def child(args) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group(args.backend)
    try:
        device = torch.device("cpu")
        if args.backend == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
        name, mode = args.child
        result = agreement(args.check_length, device) if name == "agreement" else measure(
            name, args.length, mode, args.repeats, device)
        if dist.get_rank() == 0:
            print(json.dumps(result))
    finally:
        dist.destroy_process_group()


def launch(args, ranks: int, *cell: str) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", __file__,
               "--length", str(args.length), "--check-length", str(args.check_length), "--repeats",
               str(args.repeats), "--backend", args.backend, "--child", *cell]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cell)} on {ranks} ranks failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="*", default=["forward", "train"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--check-length", type=int, default=4096)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--attentions", nargs="*", default=["memlm", "peer"])
    parser.add_argument("--output", default="benchmarks/results/ring.json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(describe())
    rows, checks = [], []
    for mode in args.modes:
        for ranks in args.ranks:
            for name in args.attentions:
                rows.append(launch(args, ranks, name, mode))
                print(rows[-1], flush=True)
    for ranks in args.ranks:
        checks.append(launch(args, ranks, "agreement", "-"))
        print(checks[-1], flush=True)
    print(f"\n{args.length:,} tokens, one causal layer, {HEADS} heads of {DIM}, float32, {args.backend}")
    print("| mode | ranks | memlm: s | tokens/s | per-rank peak MiB | peak vs 1 rank | ring-attention-pytorch: s | "
          "per-rank peak MiB | memlm speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        one = next(r for r in rows if r["mode"] == mode and r["attention"] == "memlm" and r["ranks"] == args.ranks[0])
        for ranks in args.ranks:
            memlm, peer = (next((r for r in rows if r["mode"] == mode and r["attention"] == a and r["ranks"] == ranks),
                                None) for a in ("memlm", "peer"))
            versus = (f"{peer['seconds']:.2f} | {peer['peak_mib_per_rank']:,.0f} | "
                      f"{peer['seconds'] / memlm['seconds']:.2f}x" if peer else "- | - | -")
            print(f"| {mode} | {ranks} | {memlm['seconds']:.2f} | {memlm['tokens_per_second']:,.0f} | "
                  f"{memlm['peak_mib_per_rank']:,.0f} | {memlm['peak_mib_per_rank'] / one['peak_mib_per_rank']:.2f} | "
                  f"{versus} |")
    print(f"\nmax abs error against full SDPA at {args.check_length:,} tokens (outputs and q, k, v gradients)")
    names = list(checks[0]["max_abs_error"])
    print("| ranks | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for check in checks:
        cells = (f"{e:.1e}" if isinstance(e, float) else e for e in (check["max_abs_error"][n] for n in names))
        print(f"| {check['ranks']} | " + " | ".join(cells) + " |")
    with open(args.output, "w") as file:
        json.dump({"rows": rows, "agreement": checks}, file, indent=2)


if __name__ == "__main__":
    main()
