"""What a pretrained model costs here: first load (GGUF -> safetensors cache), cached load, plain forward speed.

    python benchmarks/bench_models.py [--model smollm2-135m] [--lengths 512,2048]

The first load converts into a fresh temporary cache (so it always measures the conversion), the second reads
that cache. Forward speed: the plain model (no session), one forward of random ids per length, batch 1, in
float32 and bfloat16, as tokens/s and as the bfloat16 / float32 ratio. Prints the CPU and its capability:
bfloat16 is fast only where the CPU multiplies it natively (AVX512-BF16, AMX).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import torch

from memlm.models import load_pretrained

from machine import describe


def forward_speed(model, length: int, repeats: int = 2) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids[:, :32])  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            best = min(best, time.perf_counter() - start)
    return length / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="512,2048")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    print(describe() + "\n")
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        load_pretrained(args.model, cache=cache)
        first = time.perf_counter() - start
        start = time.perf_counter()
        mem_model, _ = load_pretrained(args.model, cache=cache)
        cached = time.perf_counter() - start
    print("| load | seconds |\n|---|---|")
    print(f"| first (convert the GGUF into the cache) | {first:.1f} |\n| cached | {cached:.1f} |\n")
    model = mem_model.detach()
    speeds = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        speeds[dtype] = [forward_speed(model, n) for n in lengths]
    print("| plain forward, tokens/s | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for dtype, row in speeds.items():
        print(f"| {str(dtype).removeprefix('torch.')} | " + " | ".join(f"{v:,.0f}" for v in row) + " |")
    ratios = [b / f for b, f in zip(speeds[torch.bfloat16], speeds[torch.float32], strict=True)]
    print("| bfloat16 / float32 | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    print(f"\npeak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
