"""Streaming speed on an idle and on a busy machine: fixed thread counts against memlm's thread policy.

    python benchmarks/bench_threads.py [--model tiny] [--tokens 4096] [--busy 0,1,2] [--repeats 3]

For 0, 1, 2, ... competing CPU-bound processes (``python -c "while True: pass"``), a session streams ``--tokens``
random tokens (after a one-segment warm-up) on 1 thread, on every core, and under the default policy
(``memlm/runtime/threads.py``); tokens/s is the median of ``--repeats`` feeds, the routes are the thread counts the
policy's forwards ran on. Ratios are to the policy's speed on the idle machine, all in this run.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import subprocess
import sys
import time

import torch

from memlm import ThreadPolicy
from memlm.models import load_model
from memlm.runtime.threads import available_cores

from machine import describe


def stream(mem_model, ids: torch.Tensor, policy: ThreadPolicy | None,
           repeats: int) -> tuple[float, collections.Counter]:
    """(median tokens/s, forwards per thread count) of feeding ``ids`` [1, n] after one warm-up segment."""
    routes = collections.Counter()
    hook = mem_model.model.register_forward_pre_hook(lambda module, args: routes.update([torch.get_num_threads()]))
    speeds = []
    try:
        for _ in range(repeats):
            with torch.no_grad(), mem_model.session(threads=policy) as session:
                warm = mem_model.config.segment_length
                session.feed(ids[:, :warm])
                start = time.perf_counter()
                session.feed(ids[:, warm:])
                speeds.append((ids.shape[1] - warm) / (time.perf_counter() - start))
    finally:
        hook.remove()
    return statistics.median(speeds), routes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (memlm-tiny) or smollm2")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--busy", default="0,1,2", help="competing processes, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(describe())
    mem_model, _ = load_model(args.model, dtype="float32")
    ids = torch.randint(100, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    cores = available_cores()
    routes = {"1 thread": ThreadPolicy(1, adaptive=False), f"{cores} threads": ThreadPolicy(cores, adaptive=False),
              "policy": None}
    print(f"\n{args.model}, {args.tokens:,} tokens, segments of {mem_model.config.segment_length}; tokens/s "
          "(x the policy on the idle machine)\n")
    print("| busy processes | " + " | ".join(routes) + " | policy's forwards (threads x forwards) |")
    print("|---|" + "---|" * (len(routes) + 1))
    idle = None
    for busy in (int(n) for n in args.busy.split(",")):
        competitors = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            time.sleep(0.5)
            results = {name: stream(mem_model, ids, policy, args.repeats) for name, policy in routes.items()}
        finally:
            for process in competitors:
                process.kill()
                process.wait()
        idle = idle or results["policy"][0]
        cells = [f"{speed:,.0f} ({speed / idle:.2f}x)" for speed, _ in results.values()]
        taken = ", ".join(f"{t} x {n}" for t, n in sorted(results["policy"][1].items()))
        print(f"| {busy} | " + " | ".join(cells) + f" | {taken} |", flush=True)


if __name__ == "__main__":
    main()
