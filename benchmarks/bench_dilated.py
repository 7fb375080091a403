"""LongNet's dilated attention against dense causal SDPA attention: time and peak memory of one attention layer, each
measurement in a fresh process (peak RSS above the process's RSS before the inputs exist), and the sharded kernel
launched with torchrun over gloo ranks (per-rank peak memory).

    python benchmarks/bench_dilated.py [--lengths 4096 16384 65536] [--ranks 2] [--plot docs/dilated.png]

One layer, batch 1, 8 heads of 64, float32; LongNet's geometric patterns w = 2048, 4096, ... up to the length with
r = 1, 2, 4, ... ``forward``: no gradients (inference); ``train``: forward + backward of a random projection.
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


def patterns(length: int) -> tuple[list[int], list[int]]:
    lengths = [2048 << i for i in range(20) if 2048 << i <= max(length, 2048)]
    return lengths, [1 << i for i in range(len(lengths))]


def rss_mib() -> float:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(length: int, attention: str, mode: str, repeats: int, group=None) -> dict:
    import torch

    from memlm.kernels import dilated_attention

    torch.manual_seed(0)
    world = 1 if group is None else torch.distributed.get_world_size(group)
    local = length // world
    before = rss_mib()
    q, k, v = (torch.randn(1, HEADS, local, DIM, requires_grad=mode == "train") for _ in range(3))
    weight = torch.randn(1, HEADS, local, DIM)
    lengths, rates = patterns(length)

    def run():
        with torch.set_grad_enabled(mode == "train"):
            if attention == "dense":
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                out = dilated_attention(q, k, v, lengths, rates, group=group)
            if mode == "train":
                (out * weight).sum().backward()

    run()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    seconds = (time.perf_counter() - start) / repeats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before  # Linux: KiB
    return {"length": length, "attention": attention, "mode": mode, "ranks": world, "seconds": seconds,
            "tokens_per_second": length / seconds, "peak_mib": peak, "patterns": [lengths, rates]}


def distributed_child(length: int, mode: str, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
        result = measure(length, "dilated", mode, repeats, group=dist.group.WORLD)
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, result["peak_mib"])
        if dist.get_rank() == 0:
            print(json.dumps({**result, "peak_mib": max(peaks)}))
    finally:
        dist.destroy_process_group()


def child(args, *extra) -> dict:
    out = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), *extra], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="*", default=[4096, 16384, 65536])
    parser.add_argument("--modes", nargs="*", default=["forward", "train"])
    parser.add_argument("--ranks", type=int, default=2, help="gloo ranks for the sharded run (0: none)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/dilated.json")
    parser.add_argument("--plot", default="docs/dilated.png")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--distributed-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(int(args.child[0]), args.child[1], args.child[2], args.repeats)))
        return
    if args.distributed_child:
        distributed_child(int(args.distributed_child[0]), args.distributed_child[1], args.repeats)
        return
    print(describe())
    rows = []
    for mode in args.modes:
        for length in args.lengths:
            for attention in ("dense", "dilated"):
                rows.append(child(args, "--child", str(length), attention, mode))
                print(rows[-1], flush=True)
            if args.ranks > 1:
                out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      f"--nproc-per-node={args.ranks}", __file__, "--repeats", str(args.repeats),
                                      "--distributed-child", str(length), mode],
                                     capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    print(f"\n| mode | tokens | dense SDPA: s | dilated: s | dilated speed-up | dense: peak MiB | dilated: peak MiB "
          f"| dilated on {args.ranks} ranks: s | per-rank peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        for length in args.lengths:
            cell = {r["attention"] if r["ranks"] == 1 else "sharded": r for r in rows
                    if r["length"] == length and r["mode"] == mode}
            dense, dilated, sharded = cell["dense"], cell["dilated"], cell.get("sharded")
            ranks = (f"{sharded['seconds']:.2f} | {sharded['peak_mib']:,.0f}" if sharded else "- | -")
            print(f"| {mode} | {length:,} | {dense['seconds']:.2f} | {dilated['seconds']:.2f} | "
                  f"{dense['seconds'] / dilated['seconds']:.2f}x | {dense['peak_mib']:,.0f} | "
                  f"{dilated['peak_mib']:,.0f} | {ranks} |")
    with open(args.output, "w") as file:
        json.dump(rows, file, indent=2)
    if args.plot:
        plot(rows, args)


def plot(rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(args.modes), figsize=(5 * len(args.modes), 4), squeeze=False)
    for axis, mode in zip(axes[0], args.modes, strict=True):
        for attention, label in (("dense", "dense causal SDPA"), ("dilated", "LongNet dilated")):
            points = sorted((r["length"], r["seconds"]) for r in rows
                            if r["mode"] == mode and r["attention"] == attention and r["ranks"] == 1)
            axis.plot(*zip(*points, strict=True), marker="o", label=label)
        axis.set(xscale="log", yscale="log", xlabel="tokens", ylabel="seconds", title=f"one layer, {mode}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
