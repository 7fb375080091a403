"""S2-Attn against full attention in training: tokens/s and peak memory of one forward + backward, each in a
fresh process (peak RSS), on the base recipe model extended with PI to the sequence length.

    python benchmarks/bench_s2.py [--model runs/base/model] [--lengths 2048 8192 16384] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from machine import describe


def measure(model_path: str, length: int, attention: str, steps: int) -> dict:
    import torch
    import transformers

    from memlm import extend_context, use_attention

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa")
    extend_context(model, "linear", factor=max(1.0, length / model.config.max_position_embeddings))
    if attention == "s2":
        use_attention(model, "s2", group_size_ratio=0.25)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    model(ids, labels=ids).loss.backward()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
    seconds = (time.perf_counter() - start) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    return {"length": length, "attention": attention, "tokens_per_second": length / seconds, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/base/model")
    parser.add_argument("--lengths", type=int, nargs="*", default=[2048, 8192, 16384])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/results/s2.json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, int(args.child[0]), args.child[1], args.steps)))
        return
    print(describe())
    rows = []
    for length in args.lengths:
        for attention in ("full", "s2"):
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                                  "--child", str(length), attention], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print("\n| tokens | full: tokens/s | S2: tokens/s | speed-up | full: peak MiB | S2: peak MiB |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        full, s2 = (next(r for r in rows if r["length"] == length and r["attention"] == a) for a in ("full", "s2"))
        print(f"| {length:,} | {full['tokens_per_second']:,.0f} | {s2['tokens_per_second']:,.0f} | "
              f"{s2['tokens_per_second'] / full['tokens_per_second']:.2f}x | {full['peak_mib']:,.0f} | "
              f"{s2['peak_mib']:,.0f} |")
    with open(args.output, "w") as file:
        json.dump(rows, file, indent=2)


if __name__ == "__main__":
    main()
