"""Benchmark the streaming runtime: memlm vs plain forwards, scaling with document length, full attention.

    python benchmarks/bench_stream.py            # the full workload (about 15 minutes on 2 cores)
    python benchmarks/bench_stream.py --quick    # smaller sizes, a few minutes
    python benchmarks/bench_stream.py --previous DIR   # also: this memlm against another one, interleaved

``--previous DIR`` names a directory where another memlm is installed (``pip install --no-deps --target DIR
CHECKOUT``): two worker processes, one per version, stream the same tokens through the same model and take
turns segment by segment, so the drift of a shared machine hits both alike.

Random-weight models (speed does not depend on the weights), float32, this machine's CPU threads.
Every figure is measured in this run; compare the ratios, which are taken side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

# Printed tables share one helper with the index benchmark (this folder is on sys.path when run as a script).
from bench_index import table

from memlm import MemoryConfig, attach

from machine import describe


def llama(layers: int, hidden: int, heads: int, vocab: int, max_positions: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tokens(n: int, vocab: int) -> torch.Tensor:
    return torch.randint(vocab, (1, n), generator=torch.Generator().manual_seed(0))


def rss_mib() -> float:
    """Resident memory of this process now, MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident memory, MiB (VmHWM: ru_maxrss of a child starts at its parent's peak)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


@torch.no_grad()
def memlm_rate(model, config: MemoryConfig, ids: torch.Tensor) -> float:
    mem_model = attach(model, config)
    try:
        with mem_model.session() as session:
            start = time.perf_counter()
            session.feed(ids)
            return ids.shape[1] / (time.perf_counter() - start)
    finally:
        mem_model.detach()


def interleaved(model, variants: list[tuple[str, MemoryConfig]], ids: torch.Tensor,
                warmup: int = 0) -> list[list[str]]:
    """Plain 512-token forwards and every memlm variant, each on its own copy of the model, advancing together one
    segment each in turn (so that the drift of a shared machine hits them alike): rows of run, tokens/s, vs plain,
    timing the ids after the first ``warmup`` (fed first, untimed: e.g. to fill the memory)."""
    n_tokens = ids.shape[1] - warmup
    seconds = dict.fromkeys(["plain"] + [name for name, _ in variants], 0.0)
    with contextlib.ExitStack() as stack:
        runs = {"plain": lambda segment: model(segment, logits_to_keep=1)}
        for name, config in variants:
            runs[name] = stack.enter_context(attach(copy.deepcopy(model), config).session()).feed
        for start in range(0, ids.shape[1], 512):
            for name, run in runs.items():
                begin = time.perf_counter()
                run(ids[:, start : start + 512])
                if start >= warmup:
                    seconds[name] += time.perf_counter() - begin
    return [["plain 512-token forwards, no memory" if name == "plain" else name, f"{n_tokens / s:,.0f}",
             f"{seconds['plain'] / s:.2f}"] for name, s in seconds.items()]


@torch.no_grad()
def bench_vs_plain(n_tokens: int) -> None:
    """The 12-layer model with and without memory, interleaved."""
    model = llama(layers=12, hidden=768, heads=12, vocab=32000, max_positions=4096)
    ids = tokens(n_tokens, 32000)
    variants = [
        ("memlm: xl 512", MemoryConfig(segment_length=512, xl_length=512, memory_layers=())),
        ("memlm: xl 512 + kNN memory (1 layer, 65,536, k 32)",
         MemoryConfig(segment_length=512, xl_length=512, memory_layers=(-4,), top_k=32, memory_capacity=65536)),
        ("memlm: the same, memory in faiss IVF (nlist 256, nprobe 16)",
         MemoryConfig(segment_length=512, xl_length=512, memory_layers=(-4,), top_k=32, memory_capacity=65536,
                      index="faiss", index_kwargs={"kind": "ivf"})),
    ]
    rows = interleaved(model, variants, ids)
    table(f"Streaming {n_tokens:,} tokens through a random Llama (12 layers, hidden 768, 12 heads, vocab 32,000), "
          f"segment 512", ["run", "tokens/s", "vs plain"], rows)


PEER = ("lucidrains' memorizing-transformers-pytorch 0.4.1, kNN layers at two layers, HNSW index: 1,535 tokens/s, "
        "0.40x its plain model (issue 25, measured 2026-12-03 on this machine class; not rerun here)")


@torch.no_grad()
def bench_memory_overhead(n_tokens: int, warmup: int) -> None:
    """The Memorizing Transformers workload of issue 25: memory layers at two layers, 65,536 entries, top-k 32, XL
    512, 512-token segments, a random Llama with 8 kv heads of 64. All runs advance together, one segment each in
    turn; ``warmup`` tokens first, untimed (65,536 fill the memory: then the timed tokens run at the memory's
    steady state, full and evicting)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1152, num_hidden_layers=6,
                                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)
    model = transformers.LlamaForCausalLM(config).eval()
    parameters = sum(p.numel() for p in model.parameters())
    ids = tokens(warmup + n_tokens, 8192)
    memory = {"segment_length": 512, "xl_length": 512, "memory_layers": (2, 4), "top_k": 32,
              "memory_capacity": 65536}
    variants = [
        ("memlm: xl 512", MemoryConfig(segment_length=512, xl_length=512, memory_layers=())),
        ("memlm: xl 512 + kNN, exact one stage (float32)", MemoryConfig(**memory, index_kwargs={"search": "exact"})),
        ("memlm: xl 512 + kNN, exact two-stage (bfloat16 screen)",
         MemoryConfig(**memory, index_kwargs={"search": "two-stage"})),
        ("memlm: xl 512 + kNN, faiss IVF (nlist 256, nprobe 16)",
         MemoryConfig(**memory, index="faiss", index_kwargs={"kind": "ivf"})),
    ]
    rows = interleaved(model, variants, ids, warmup)
    after = f" after {warmup:,} untimed" if warmup else ""
    table(f"Streaming {n_tokens:,} random tokens{after} through a random Llama ({parameters / 1e6:.1f}M "
          f"parameters: 6 layers, hidden 512, 8 kv heads of 64), memory at layers 2 and 4 (65,536 entries, k 32), "
          "segment 512",
          ["run", "tokens/s", "vs plain"], rows)
    print(f"\nPeer, quoted: {PEER}")


@torch.no_grad()
def bench_scaling(checkpoints: list[int], window: int = 32) -> None:
    model = llama(layers=4, hidden=128, heads=4, vocab=32000, max_positions=2048)
    config = MemoryConfig(segment_length=512, xl_length=512, memory_layers=(-1,), top_k=32, memory_capacity=65536)
    mem_model = attach(model, config)
    rows = []
    with mem_model.session() as session:
        done, latencies, generator = 0, [], torch.Generator().manual_seed(0)
        for checkpoint in checkpoints:
            while done < checkpoint:
                ids = torch.randint(32000, (1, 512), generator=generator)
                start = time.perf_counter()
                session.feed(ids)
                latencies.append(time.perf_counter() - start)
                done += 512
            recent = sorted(latencies[-window:])
            entries = int(session.state.knn.indexes[3].size[0])
            rows.append([f"{checkpoint:,}", f"{1e3 * recent[len(recent) // 2]:.1f}", f"{entries:,}",
                         f"{rss_mib():,.0f}", f"{peak_rss_mib():,.0f}"])
    mem_model.detach()
    base = float(rows[0][1])
    for row in rows:
        row.insert(2, f"{float(row[1]) / base:.2f}")
    table("Tiny Llama (4 layers, hidden 128, 4 heads), segment 512, xl 512, memory layer 3 (65,536, k 32)",
          ["tokens streamed", f"segment ms (median of last {window})", "vs first", "entries in memory", "RSS MiB",
           "peak RSS MiB"], rows)


@torch.no_grad()
def bench_vs_full(lengths: list[int]) -> None:
    model = llama(layers=12, hidden=768, heads=12, vocab=32000, max_positions=max(lengths))
    config = MemoryConfig(segment_length=512, xl_length=512, memory_layers=(-4,), top_k=32, memory_capacity=65536)
    rows = []
    for n in lengths:
        ids = tokens(n, 32000)
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        full = n / (time.perf_counter() - start)
        rate = memlm_rate(model, config, ids)
        rows.append([f"{n:,}", f"{full:,.0f}", f"{rate:,.0f}", f"{rate / full:.2f}"])
    table("memlm (segment 512, xl 512, kNN memory) vs one full-attention forward of the whole document, "
          "12-layer Llama", ["document tokens", "full forward tokens/s", "memlm tokens/s", "memlm vs full"], rows)


@torch.no_grad()
def bench_rmt(n_tokens: int, sizes: list[int], segment: int = 512) -> None:
    """Per-segment latency with N RMT tokens, early and late in the stream, against a plain longer segment."""
    model = llama(layers=4, hidden=128, heads=4, vocab=32000, max_positions=4096)
    ids = tokens(n_tokens, 32000)
    early = n_tokens // 4
    rows = []
    for n in sizes:
        row = [str(n)]
        for config in (MemoryConfig(segment_length=segment, xl_length=512, memory_layers=(), rmt_tokens=n),
                       MemoryConfig(segment_length=segment + 2 * n, xl_length=512, memory_layers=())):
            mem_model = attach(model, config)
            latencies = []
            with mem_model.session() as session:
                for start in range(0, n_tokens, config.segment_length):
                    begin = time.perf_counter()
                    session.feed(ids[:, start : start + config.segment_length])
                    latencies.append(time.perf_counter() - begin)
            mem_model.detach()
            window = max(1, early // config.segment_length)
            for part in (latencies[:window], latencies[-window:]):
                row.append(f"{1e3 * sorted(part)[window // 2]:.1f}")
        row.insert(3, f"{float(row[2]) / float(rows[0][2]) if rows else 1.0:.2f}")
        row.append(f"{rss_mib():,.0f}")
        rows.append(row)
    table(f"RMT: tiny Llama (4 layers, hidden 128), segment {segment}, xl 512, {n_tokens:,} tokens; median ms per "
          f"segment in the first and last {early:,} tokens",
          ["rmt_tokens N", f"ms, first {early:,}", f"ms, last {early:,}", "last vs N=0",
           f"no RMT, segment {segment}+2N: first", "... last", "RSS MiB"], rows)


VERSION_VARIANTS = {
    "xl 512": {"segment_length": 512, "xl_length": 512, "memory_layers": ()},
    "xl 512 + kNN memory (1 layer, 65,536, k 32)": {"segment_length": 512, "xl_length": 512, "memory_layers": (-4,),
                                                    "top_k": 32, "memory_capacity": 65536, "fusion": "gate"},
}


@torch.no_grad()
def version_worker(variant: str, n_tokens: int) -> None:
    """One side of ``bench_versions``: feeds a segment per line read from stdin and prints its seconds."""
    import memlm

    model = llama(layers=12, hidden=768, heads=12, vocab=32000, max_positions=4096)
    ids = tokens(n_tokens, 32000)
    with memlm.attach(model, MemoryConfig(**VERSION_VARIANTS[variant])).session() as session:
        print(memlm.__file__, flush=True)
        for start in range(0, n_tokens, 512):
            sys.stdin.readline()
            begin = time.perf_counter()
            session.feed(ids[:, start : start + 512])
            print(time.perf_counter() - begin, flush=True)


def bench_versions(previous: Path, n_tokens: int) -> None:
    rows = []
    for variant in VERSION_VARIANTS:
        workers = {}
        for version, path in (("previous", previous), ("this", None)):
            env = dict(os.environ)
            if path is not None:
                env["PYTHONPATH"] = os.pathsep.join([str(path), *filter(None, [env.get("PYTHONPATH")])])
            workers[version] = subprocess.Popen(
                [sys.executable, __file__, "--worker", variant, "--worker-tokens", str(n_tokens)], env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent)
        where = {version: worker.stdout.readline().strip() for version, worker in workers.items()}
        if where["previous"] == where["this"]:
            raise SystemExit(f"--previous {previous} holds no other memlm: both workers imported {where['this']}")
        seconds = dict.fromkeys(workers, 0.0)
        for _ in range(0, n_tokens, 512):
            for version, worker in workers.items():
                worker.stdin.write("go\n")
                worker.stdin.flush()
                seconds[version] += float(worker.stdout.readline())
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
        rates = {version: n_tokens / s for version, s in seconds.items()}
        rows.append([variant, f"{rates['previous']:,.0f}", f"{rates['this']:,.0f}",
                     f"{rates['this'] / rates['previous']:.3f}"])
    table(f"memlm v1 vs v2: {n_tokens:,} tokens, a random 12-layer Llama (hidden 768), segment 512, the two "
          f"versions taking turns segment by segment (previous: {previous})",
          ["run", "v1 tokens/s", "v2 tokens/s", "v2 / v1"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (for a first look)")
    parser.add_argument("--previous", type=Path, help="a directory with another memlm installed, to compare with")
    parser.add_argument("--only-versions", action="store_true", help="with --previous: only that comparison")
    parser.add_argument("--only", choices=("scaling", "overhead"), help="only this table (in this process)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        version_worker(args.worker, args.worker_tokens)
        return
    print(describe())
    if args.only == "scaling":
        bench_scaling([16384, 65536] if args.quick else [65536, 262144, 1048576])
        return
    if args.only == "overhead":
        bench_memory_overhead(8192, 0) if args.quick else bench_memory_overhead(65536, 0)
        if not args.quick:
            bench_memory_overhead(32768, 65536)
        return
    if args.previous:
        bench_versions(args.previous, 16384 if args.quick else 65536)
        if args.only_versions:
            return
    print(f"memlm streaming benchmark, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.quick:
        bench_rmt(16384, [0, 4, 16, 64])
        bench_vs_plain(8192)
        bench_memory_overhead(8192, 0)
        bench_vs_full([4096])
    else:
        bench_rmt(65536, [0, 4, 16, 64])
        bench_vs_plain(65536)
        bench_memory_overhead(65536, 0)
        bench_memory_overhead(32768, 65536)
        bench_vs_full([8192, 16384])
    # resident memory is the point of the scaling table: a fresh process, which nothing above has grown
    sys.stdout.flush()
    subprocess.run([sys.executable, __file__, "--only", "scaling", *(["--quick"] if args.quick else [])], check=True)


if __name__ == "__main__":
    main()
