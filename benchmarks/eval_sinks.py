"""Unbounded streams without training: attention sinks (StreamingLLM) and Λ-attention (LM-Infinite) on War and Peace.

    memlm train --config examples/train_base.yaml --output runs/base        # the model, trained at 256 tokens
    python benchmarks/eval_sinks.py --model runs/base --text ../shared/data/war_and_peace.txt \
        [--tokens 1048576] [--output benchmarks/results/sinks.json] [--plot docs/sinks.png]

Perplexity of one long stretch of the book (from a tenth in, past the Gutenberg header) by the predicted
token's distance from the start (buckets up to 256, 1K, 4K, 16K, 64K, 256K, 1M), in five modes:

* ``full``: the plain model, one forward over the first ``--full-tokens`` (its positions run past the 256 it
  was trained on);
* ``window``: streamed through a session with an XL cache and no memory (a window of 128-256 tokens,
  positions rebased every segment);
* ``sinks + window``: the same with the first 4 tokens kept as attention sinks (StreamingLLM);
* ``lambda``: Λ-attention in one forward per ``--lambda-tokens`` chunk (global 10, window 256, distance cap 256:
  LM-Infinite), ``memlm.use_attention``;
* ``sinks + xl + memory``: sinks, the XL cache and a kNN memory at the last layer (untrained gate, FIFO
  capacity 65,536).

Speed: tokens/s of the sinks stream against StreamingLLM's baseline, a sliding window recomputed from scratch
for every token (measured on ``--recompute-tokens`` tokens), as a ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from memlm import use_attention
from memlm.eval.runner import bucketed, perplexity, perplexity_table
from memlm.tiny import load_default

from machine import describe

BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, math.inf)
SEGMENT = {"segment_length": 128, "xl_length": 128, "position_mode": "rebase"}
STREAMED = {
    "window": {**SEGMENT, "memory_layers": ()},
    "sinks + window": {**SEGMENT, "memory_layers": (), "sink_tokens": 4},
    "sinks + xl + memory": {**SEGMENT, "memory_layers": (-1,), "sink_tokens": 4, "memory_capacity": 65536},
}


@torch.no_grad()
def forward_losses(model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Next-token losses [n - 1] of ids [n], one forward per ``chunk`` tokens (each chunk from position 0)."""
    losses = []
    for start in range(0, ids.numel() - 1, chunk):
        window = ids[start : start + chunk + 1]
        logits = model(window[None, :-1]).logits[0]
        losses.append(torch.nn.functional.cross_entropy(logits.float(), window[1:], reduction="none"))
    return torch.cat(losses)


@torch.no_grad()
def recompute_speed(model, ids: torch.Tensor, window: int, tokens: int) -> float:
    """Tokens/s of StreamingLLM's baseline: every token's logits from a fresh forward over the ``window`` before it."""
    start = time.perf_counter()
    for t in range(window, window + tokens):
        model(ids[None, t - window : t + 1])
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/base", help="a memlm model directory (memlm train output)")
    parser.add_argument("--text", required=True, help="the held-out text (War and Peace)")
    parser.add_argument("--tokens", type=int, default=1 << 20, help="stream length (default 1,048,576)")
    parser.add_argument("--full-tokens", type=int, default=16384, help="plain full attention: one forward this long")
    parser.add_argument("--lambda-tokens", type=int, default=65536, help="Λ-attention: tokens per forward")
    parser.add_argument("--memory-tokens", type=int, default=262144, help="tokens for the memory mode (O(n x cap))")
    parser.add_argument("--recompute-tokens", type=int, default=256)
    parser.add_argument("--output", default="benchmarks/results/sinks.json")
    parser.add_argument("--plot", help="PNG: perplexity by distance, per mode")
    args = parser.parse_args()
    print(describe())
    torch.manual_seed(0)

    base, tokenizer = load_default(args.model)
    model = base.detach()
    text = Path(args.text).read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text[len(text) // 10 :], add_special_tokens=False)["input_ids"])
    if ids.numel() < args.tokens + 1:
        print(f"the text has {ids.numel():,} tokens after its first tenth; streaming all of them")
    ids = ids[: args.tokens + 1]
    results, speeds = {}, {}

    start = time.perf_counter()
    results["full"] = bucketed(forward_losses(model, ids[: args.full_tokens + 1], args.full_tokens), BUCKETS)
    speeds["full"] = args.full_tokens / (time.perf_counter() - start)
    print(f"full: {results['full']['ppl']}", flush=True)

    use_attention(model, "lambda", global_tokens=10, local_window=256, distance_cap=256)
    start = time.perf_counter()
    results["lambda"] = bucketed(forward_losses(model, ids, args.lambda_tokens), BUCKETS)
    speeds["lambda"] = (ids.numel() - 1) / (time.perf_counter() - start)
    use_attention(model, None)
    print(f"lambda: {results['lambda']['ppl']}", flush=True)

    for name, overrides in STREAMED.items():
        mem_model, _ = load_default(args.model, **overrides)
        stream = ids if "memory" not in name else ids[: args.memory_tokens + 1]
        start = time.perf_counter()
        results[name] = perplexity(mem_model, stream, buckets=BUCKETS)
        speeds[name] = (stream.numel() - 1) / (time.perf_counter() - start)
        print(f"{name}: {results[name]['ppl']} ({speeds[name]:,.0f} tokens/s)", flush=True)

    baseline = "recompute (256-token window)"
    speeds[baseline] = recompute_speed(model, ids, 256, args.recompute_tokens)
    print("\n" + perplexity_table(results))
    print("\n| mode | tokens/s | vs window recomputation |\n|---|---|---|")
    for name, speed in speeds.items():
        print(f"| {name} | {speed:,.0f} | {speed / speeds[baseline]:.1f}x |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"perplexity": results, "tokens_per_second": speeds}, indent=2) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4))
        for name, result in results.items():
            ends = [r["to"] or r["from"] * 4 for r in result["buckets"]]
            axis.plot(ends, [r["ppl"] for r in result["buckets"]], marker="o", label=name)
        axis.set(xscale="log", yscale="log", xlabel="tokens from the start (bucket end)", ylabel="perplexity",
                 title="base model (trained at 256 tokens) on War and Peace")
        axis.legend()
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
