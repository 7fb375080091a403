"""What block retrieval costs: tokens/s against the plain XL stream, memory per stored token; fresh processes.

    python benchmarks/bench_blocks.py [--model smollm2-135m] [--lengths 4096,8192,16384] [--dtype float32]

For each length and mode (``xl-only``: the model's local context, no memory; ``blocks``: the model's default memory,
block retrieval at every layer, ``memlm.models``) a fresh process streams that many random tokens through a
session and reports tokens/s (the whole feed), then asks a 12-token question and generates 8 tokens (the forwards
that score blocks exactly): seconds per generated token. Also the peak RSS of the process and the bytes the block
memory holds (entries in the memory dtype + block summaries). Prints the CPU and torch's capability: compare only
within one run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import torch

from memlm.models import load_model

MODES = {"xl-only": {"memory_layers": ()}, "blocks": {}}  # blocks: the model's default memory


def stream(model: str, dtype: str, mode: str, length: int, queue) -> None:
    mem_model, _ = load_model(model, dtype=dtype, **MODES[mode])
    ids = torch.randint(100, mem_model.model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), mem_model.session() as session:
        session.feed(ids[:, :512])  # warm-up
        start = time.perf_counter()
        session.feed(ids[:, 512:])
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        session.generate(ids[:, -12:], max_new_tokens=8, min_new_tokens=8)
        answer = (time.perf_counter() - start) / 8
        memory = getattr(session.state.memory, "nbytes", 0)
    queue.put(((length - 512) / seconds, answer, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, memory))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    from machine import describe

    print(f"{describe()}; {args.model}, {args.dtype}\n")
    print("| tokens | xl-only tok/s | blocks tok/s | blocks / xl-only | answer s/token xl-only | answer s/token blocks "
          "| peak RSS xl-only (MiB) | peak RSS blocks (MiB) | block memory (MiB) | memory bytes / token |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    context = multiprocessing.get_context("spawn")
    for length in (int(n) for n in args.lengths.split(",")):
        results = {}
        for mode in MODES:
            queue = context.Queue()
            process = context.Process(target=stream, args=(args.model, args.dtype, mode, length, queue))
            process.start()
            results[mode] = queue.get()
            process.join()
        (xl, xl_answer, xl_rss, _), (blocks, answer, blocks_rss, memory) = results["xl-only"], results["blocks"]
        entries = length - 512  # tokens that left the local context (512) entered memory
        print(f"| {length:,} | {xl:,.0f} | {blocks:,.0f} | {blocks / xl:.2f}x | {xl_answer:.3f} | {answer:.3f} "
              f"| {xl_rss:,.0f} | {blocks_rss:,.0f} | {memory / 2**20:,.0f} | {memory / entries:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
