"""Benchmark memlm.index against bare faiss: search latency, add throughput, memory, recall.

    python benchmarks/bench_index.py           # the full workload (a few minutes on 2 cores)
    python benchmarks/bench_index.py --quick   # smaller sizes, under a minute

Workload (full): batch 1, 8 heads, dim 64, float32, capacity 65,536 per head, 512 queries per search
(one segment), k = 32; IVF at capacity 1M with one head on clustered keys. Every figure is measured
in this run; absolute times drift on a shared machine, so compare the ratios taken side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time

import faiss
import numpy as np
import torch

from memlm.index import create_index

K = 32


def timed(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_entries(heads: int, n: int, dim: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(1, heads, n, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)


def clustered_entries(n: int, dim: int, clusters: int, seed: int) -> torch.Tensor:
    """[1, 1, n, dim]: unit-norm centres plus noise of norm ~0.8, so that neighbouring clusters overlap."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=generator), dim=-1)
    picks = torch.randint(clusters, (n,), generator=generator)
    return (centres[picks] + 0.1 * torch.randn(n, dim, generator=generator)).view(1, 1, n, dim)


def fill(index, heads: int, n: int, dim: int, seed: int, dtype=torch.float32, chunk: int = 65536) -> None:
    for start in range(0, n, chunk):
        keys = random_entries(heads, min(chunk, n - start), dim, seed + start, dtype)
        index.add(keys, keys)


def add_rate(index, heads: int, dim: int, dtype=torch.float32, segments: int = 32, segment: int = 512) -> float:
    """Entries per second for segment-sized adds into a full index (eviction active)."""
    chunks = [random_entries(heads, segment, dim, 1000 + i, dtype) for i in range(segments)]
    start = time.perf_counter()
    for keys in chunks:
        index.add(keys, keys)
    return segments * segment / (time.perf_counter() - start)


def same_neighbours(ids_a: np.ndarray, ids_b: np.ndarray) -> float:
    """Mean fraction of each query's k ids that both results share: [..., k] each."""
    a, b = ids_a.reshape(-1, ids_a.shape[-1]), ids_b.reshape(-1, ids_b.shape[-1])
    return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a, b, strict=True)]))


def table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    print(f"\n{title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) + " |")


def bench_segment_search(capacity: int, heads: int, dim: int, queries: int, repeat: int) -> None:
    keys = torch.cat([random_entries(heads, capacity, dim, 7)], dim=2)
    query = random_entries(heads, queries, dim, 8)
    # Bare faiss: one IndexFlatIP per head, the same searches.
    bare = [faiss.IndexFlatIP(dim) for _ in range(heads)]
    for head, flat in enumerate(bare):
        flat.add(keys[0, head].numpy())
    bare_ids = np.stack([flat.search(query[0, h].numpy(), K)[1] for h, flat in enumerate(bare)])
    bare_time = timed(lambda: [flat.search(query[0, h].numpy(), K) for h, flat in enumerate(bare)], repeat)
    raw = 2 * keys.numel() * 4  # keys + values, float32
    rows = [["bare faiss IndexFlatIP (keys only)", "-", f"{bare_time * 1e3:.0f}",
             f"{heads * queries / bare_time:,.0f}", "1.00", "1.000", f"{sum(f.ntotal for f in bare) * dim * 4:,}", "-"]]
    backends = [("torch", {}), ("faiss", {"kind": "flat"}), ("faiss", {"kind": "ivf"})]
    for backend, kwargs in backends:
        index = create_index(backend, dim=dim, capacity=capacity, num_heads=heads, **kwargs)
        index.add(keys, keys)
        result = index.search(query, K)
        seconds = timed(lambda index=index: index.search(query, K), repeat)
        rate = add_rate(index, heads, dim)
        name = backend + (f" {kwargs['kind']}" if kwargs else "") + (
            f" (nlist {index.nlist}, nprobe {index.nprobe})" if kwargs.get("kind") == "ivf" else "")
        rows.append([name, f"{rate * heads:,.0f}", f"{seconds * 1e3:.0f}", f"{heads * queries / seconds:,.0f}",
                     f"{bare_time / seconds:.2f}", f"{same_neighbours(result.ids[0].numpy(), bare_ids):.3f}",
                     f"{index.nbytes:,}", f"{index.nbytes / raw:.3f}"])
    table(
        f"Segment search: batch 1, {heads} heads, dim {dim}, float32, capacity {capacity:,} per head, "
        f"{queries} queries, k {K} ({torch.get_num_threads()} threads)",
        ["backend", "add entries/s (all heads, evicting)", "search ms", "query vectors/s",
         "speed vs bare faiss", "same ids as bare faiss", "index bytes", "bytes / raw k+v"],
        rows,
    )


def bench_dtypes(capacity: int, heads: int, dim: int, queries: int, repeat: int) -> None:
    rows = []
    query = random_entries(heads, queries, dim, 8)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        index = create_index("torch", dim=dim, capacity=capacity, num_heads=heads, dtype=dtype)
        fill(index, heads, capacity, dim, 7, dtype)
        seconds = timed(lambda index=index: index.search(query, K), repeat)
        rows.append([str(dtype).removeprefix("torch."), f"{seconds * 1e3:.0f}", f"{index.nbytes:,}"])
    table("torch backend by storage dtype (same workload; scores in float32)",
          ["dtype", "search ms", "index bytes"], rows)


def bench_add_scaling(capacities: list[int], heads: int, dim: int) -> None:
    rows = []
    for capacity in capacities:
        row = [f"{capacity:,}"]
        for backend, kwargs in (("torch", {}), ("faiss", {"kind": "flat"})):
            index = create_index(backend, dim=dim, capacity=capacity, num_heads=heads, **kwargs)
            fill(index, heads, capacity, dim, 3)
            rate = add_rate(index, heads, dim, segments=64)
            row.append(f"{1e9 / (rate * heads):.1f}")
        rows.append(row)
    base = [float(r[1]) for r in rows]
    for row, ns in zip(rows, base, strict=True):
        row.append(f"{ns / base[0]:.2f}")
    table(f"Add cost with eviction active: ns per entry per head ({heads} heads, dim {dim}, segments of 512)",
          ["capacity", "torch ns/entry", "faiss flat ns/entry", "torch vs smallest capacity"], rows)


def bench_ivf(capacity: int, dim: int, queries: int, nprobes: list[int], repeat: int) -> None:
    keys = clustered_entries(capacity, dim, clusters=4096, seed=11)
    query = clustered_entries(queries, dim, clusters=4096, seed=11)[:, :, -queries:]  # same centres
    flat = create_index("faiss", kind="flat", dim=dim, capacity=capacity)
    flat.add(keys, keys)
    exact = flat.search(query, K).ids[0, 0].numpy()
    flat_time = timed(lambda: flat.search(query, K), repeat)
    torch_index = create_index("torch", dim=dim, capacity=capacity)
    torch_index.add(keys, keys)
    torch_time = timed(lambda: torch_index.search(query, K), repeat)
    torch_found = same_neighbours(torch_index.search(query, K).ids[0, 0].numpy(), exact)
    rows = [["faiss flat (exact)", "-", f"{flat_time * 1e3:.0f}", "1.00", f"{torch_time / flat_time:.2f}", "1.000"],
            ["torch (exact)", "-", f"{torch_time * 1e3:.0f}", f"{flat_time / torch_time:.2f}", "1.00",
             f"{torch_found:.3f}"]]
    start = time.perf_counter()
    ivf = create_index("faiss", kind="ivf", dim=dim, capacity=capacity)
    ivf.add(keys, keys)
    build = time.perf_counter() - start
    for nprobe in nprobes:
        for head in ivf._ivf[0]:
            head.nprobe = nprobe
        seconds = timed(lambda: ivf.search(query, K), repeat)
        found = same_neighbours(ivf.search(query, K).ids[0, 0].numpy(), exact)
        rows.append([f"faiss ivf, nlist {ivf.nlist}, nprobe {nprobe}", f"{build:.1f}", f"{seconds * 1e3:.0f}",
                     f"{flat_time / seconds:.2f}", f"{torch_time / seconds:.2f}", f"{found:.3f}"])
    table(f"IVF: capacity {capacity:,}, one head, dim {dim}, clustered keys (4096 centres), {queries} queries, k {K}",
          ["index", "build s (train + add)", "search ms", "speed vs faiss flat", "speed vs torch", "recall@32"],
          rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (for a first look)")
    args = parser.parse_args()
    heads, dim, queries = 8, 64, 512
    if args.quick:
        capacity, repeat, scaling, ivf_capacity = 16384, 3, [8192, 32768], 131072
    else:
        capacity, repeat, scaling, ivf_capacity = 65536, 5, [8192, 65536, 524288], 1 << 20
    print(f"memlm.index benchmark, torch {torch.__version__}, faiss {faiss.__version__}")
    bench_segment_search(capacity, heads, dim, queries, repeat)
    bench_dtypes(capacity, heads, dim, queries, repeat)
    bench_add_scaling(scaling, heads, dim)
    bench_ivf(ivf_capacity, dim, queries, [16, 32, 64, 128], repeat)


if __name__ == "__main__":
    main()
