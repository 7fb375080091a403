"""Benchmark memlm.index against bare faiss: search latency, add throughput, memory, recall.

    python benchmarks/bench_index.py           # the full workload (a few minutes on 2 cores)
    python benchmarks/bench_index.py --quick   # smaller sizes, under a minute
    python benchmarks/bench_index.py --text ../shared/data/war_and_peace.txt   # also: real model keys
    python benchmarks/bench_index.py --device cuda   # on a GPU: the two-stage table there, faiss-gpu flat beside

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

from machine import describe

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


def alternating(calls: dict, repeat: int) -> dict:
    """Median seconds of each call, the calls taking turns ``repeat`` times after one warm-up round (so that the
    drift of a shared machine hits them alike); GPU work is waited for."""
    times = {name: [] for name in calls}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    for round_ in range(repeat + 1):
        for name, fn in calls.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


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
    backends = [("torch", {"search": "exact"}), ("torch", {"search": "two-stage"}), ("faiss", {"kind": "flat"}),
                ("faiss", {"kind": "ivf"})]
    for backend, kwargs in backends:
        index = create_index(backend, dim=dim, capacity=capacity, num_heads=heads, **kwargs)
        index.add(keys, keys)
        result = index.search(query, K)
        seconds = timed(lambda index=index: index.search(query, K, scratch=True), repeat)
        rate = add_rate(index, heads, dim)
        name = backend + (f" {next(iter(kwargs.values()))}" if kwargs else "") + (
            f" (nlist {index.nlist}, nprobe {index.nprobe})" if kwargs.get("kind") == "ivf" else "")
        rows.append([name, f"{rate * heads:,.0f}", f"{seconds * 1e3:.0f}", f"{heads * queries / seconds:,.0f}",
                     f"{bare_time / seconds:.2f}", f"{same_neighbours(result.ids[0].numpy(), bare_ids):.3f}",
                     f"{index.nbytes:,}", f"{index.nbytes / raw:.3f}"])
    table(
        f"Segment search: batch 1, {heads} heads, dim {dim}, float32, capacity {capacity:,} per head, "
        f"{queries} queries, k {K} ({torch.get_num_threads()} threads; memlm's searches return keys and values too, "
        "in reused buffers as the kNN reader asks)",
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


def same_scores(exact, found) -> float:
    """Fraction of queries whose k best scores are exact's, rank by rank (to float32 rounding): recall where two
    entries of one score may come in either order."""
    close = torch.isclose(found.scores, exact.scores, rtol=1e-5, atol=1e-5) | (
        torch.isinf(found.scores) & torch.isinf(exact.scores))
    return float(close.all(dim=-1).float().mean())


def recall(exact, found) -> float:
    """recall@k: the fraction of exact's k best ids that ``found`` returns."""
    return same_neighbours(found.ids.flatten(0, 1).numpy(), exact.ids.flatten(0, 1).numpy())


@torch.no_grad()
def model_keys(text_path: str, capacity: int, queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys memlm-tiny stores in its memory layer while reading ``text_path`` (capacity of them, [1, heads, n,
    dim]) and the search queries [1, heads, q, dim] of the segments read after them, exactly as the layer searches."""
    from memlm import load_default

    mem_model, tokenizer = load_default(memory_capacity=capacity)
    with open(text_path, encoding="utf-8") as file:
        text = file.read()
    segment = mem_model.config.segment_length
    ids = tokenizer(text[: 8 * (capacity + 4 * queries)], return_tensors="pt").input_ids
    assert ids.shape[1] > capacity + mem_model.config.xl_length + queries, "text too short for this capacity"
    recorded = []
    with mem_model.session() as session:
        session.feed(ids[:, : capacity + mem_model.config.xl_length])  # the memory is full from here on
        index = next(iter(session.state.knn.indexes.values()))
        keys = index.entries(0)[0].unsqueeze(0)  # [1, heads, capacity, dim], stored as the layer stores them
        search = index.search
        index.search = lambda q, k, **kw: recorded.append(q.clone()) or search(q, k, **kw)  # record, then search
        start = capacity + mem_model.config.xl_length
        while sum(q.shape[2] for q in recorded) < queries:
            session.feed(ids[:, start : start + segment])
            start += segment
    mem_model.detach()
    return keys.float(), torch.cat(recorded, dim=2)[:, :, :queries].float()


def bench_two_stage(kinds: dict, repeat: int, device: str = "cpu") -> None:
    """Two-stage exact search against one stage, on keys of several kinds: speed, answers, route (on CUDA also
    faiss-gpu's flat search, and the screen needs float32 accumulation: see ``memlm/index/two_stage.py``)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    rows = []
    for name, (keys, query) in kinds.items():
        keys, query = keys.to(device), query.to(device)
        heads, capacity, dim = keys.shape[1], keys.shape[2], keys.shape[3]
        indexes = {}
        for search in ("exact", "two-stage", *(["faiss flat"] if cuda else ["torch screen"])):
            backend = {"backend": "faiss", "kind": "flat"} if search == "faiss flat" else {
                "search": "exact" if search == "exact" else "two-stage"}
            index = indexes[search] = create_index(dim=dim, capacity=capacity, num_heads=heads, device=device,
                                                   **backend)
            index.two_stage_native = search != "torch screen"  # screen.cpp where it runs, and the torch screen
            index.add(keys, keys)
        exact = indexes["exact"].search(query, K)
        found = indexes["two-stage"].search(query, K)
        route = indexes["two-stage"].last_search
        calls = {search: lambda index=index, query=query: index.search(query, K, scratch=True)
                 for search, index in indexes.items()}
        # the one-stage search as it was before issue 25: results gathered into fresh tensors
        calls["before"] = lambda index=indexes["exact"], query=query: index.search(query, K)
        times = alternating(calls, repeat)
        rows.append([name, f"{heads} x {capacity:,} x {dim}", query.shape[2], f"{times['before'] * 1e3:.1f}",
                     f"{times['exact'] * 1e3:.1f}", f"{times['two-stage'] * 1e3:.1f}",
                     f"{times['before'] / times['two-stage']:.2f}", f"{times['exact'] / times['two-stage']:.2f}",
                     f"{recall(exact, found):.3f}", f"{same_scores(exact, found):.3f}", route]
                    + ([f"{times['faiss flat'] * 1e3:.1f}"] if cuda else [f"{times['torch screen'] * 1e3:.1f}"]))
    screen = "torch screen" if cuda else "screen.cpp"
    table(f"Two-stage exact search (bfloat16 screen, float32 re-score; {screen}) against one stage, k {K}, on {device}",
          ["keys", "heads x entries x dim", "queries per head", "one stage, fresh results ms (before)",
           "one stage ms", "two-stage ms", "speed-up vs before", "speed-up vs one stage", "recall@32 (ids)",
           "queries with exact scores", "route taken"]
          + (["faiss-gpu flat ms"] if cuda else ["two-stage with the torch screen ms"]), rows)


def bench_crossover(sizes: list[int], repeat: int) -> None:
    """Where the two-stage search starts to pay: one stage against two-stage (screen.cpp, and the torch screen) by
    memory size, head size and queries per search, taking turns; and the route ``auto`` takes there."""
    rows = []
    for dim in (16, 64):
        for queries in (4, 8, 64, 512):
            for n in sizes:
                keys, query = random_entries(8, n, dim, 7), random_entries(8, queries, dim, 8)
                indexes = {search: create_index(dim=dim, capacity=n, num_heads=8,
                                                search="two-stage" if search == "torch screen" else search)
                           for search in ("exact", "two-stage", "torch screen", "auto")}
                indexes["torch screen"].two_stage_native = False
                for index in indexes.values():
                    index.add(keys, keys)
                indexes["auto"].search(query, K, scratch=True)
                calls = {search: lambda index=indexes[search], query=query: index.search(query, K, scratch=True)
                         for search in ("exact", "two-stage", "torch screen")}
                times = alternating(calls, repeat)
                rows.append([dim, queries, f"{n:,}", f"{times['exact'] * 1e3:.1f}", f"{times['two-stage'] * 1e3:.1f}",
                             f"{times['exact'] / times['two-stage']:.2f}", f"{times['torch screen'] * 1e3:.1f}",
                             f"{times['exact'] / times['torch screen']:.2f}", indexes["auto"].last_search])
    table(f"One stage against two-stage by size: 8 heads, k {K}, random keys, on this CPU "
          f"({torch.get_num_threads()} threads)",
          ["head dim", "queries per head", "entries", "one stage ms", "two-stage ms (screen.cpp)", "speed-up",
           "two-stage ms (torch screen)", "speed-up", "auto takes"], rows)


def bench_matmul_peak(capacity: int, heads: int, dim: int, queries: int, repeat: int) -> None:
    """The screen's matmul against what this machine's matmul reaches: float32 and bfloat16."""
    keys = random_entries(heads, capacity, dim, 7)[0]
    query = random_entries(heads, queries, dim, 8)[0]
    block = 2048
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        k, q_t = keys.to(dtype), query.to(dtype).transpose(1, 2).contiguous()
        out = torch.empty(heads, block, queries, dtype=dtype)
        blocked = timed(lambda k=k, q_t=q_t, out=out: [torch.bmm(k[:, s : s + block], q_t, out=out)
                                                       for s in range(0, capacity, block)], repeat)
        whole = timed(lambda k=k, q_t=q_t: torch.bmm(k, q_t), repeat)
        square = torch.randn(4096, 4096).to(dtype)
        peak = timed(lambda square=square: square @ square, repeat)
        flops, peak_rate = 2 * heads * capacity * queries * dim, 2 * 4096**3 / peak
        rows.append([str(dtype).removeprefix("torch."), f"{whole * 1e3:.0f}", f"{flops / whole / 1e9:.0f}",
                     f"{blocked * 1e3:.0f}", f"{flops / blocked / 1e9:.0f}", f"{peak_rate / 1e9:.0f}",
                     f"{flops / blocked / peak_rate:.2f}"])
    table(f"The screen's matmul ({heads} heads x {capacity:,} keys x {queries} queries x {dim}) on this CPU "
          f"({torch.get_num_threads()} threads)",
          ["dtype", "whole score matrix ms", "GFLOP/s", f"blocks of {block} keys ms", "GFLOP/s",
           "4096^3 matmul GFLOP/s (the peak reached)", "blocked / peak"], rows)


def score_recall(exact, found, query: torch.Tensor) -> float:
    """recall@k where ties count: the fraction of returned entries whose true product reaches the exact k-th score
    (model keys repeat, and any k of equal entries are a right answer; id recall then measures tie-breaking)."""
    kth = exact.scores[..., -1:].double()
    true = torch.einsum("bhqkd,bhqd->bhqk", found.keys.double(), query.double())
    return float(((true >= kth - 1e-5 * kth.abs() - 1e-6) & found.mask).float().mean())


def bench_ivf_model_keys(keys: torch.Tensor, query: torch.Tensor, nprobes: list[int], repeat: int) -> None:
    """The approximate mode on real model keys: faiss IVF over the Euclidean transform against inner-product IVF,
    recall@32 (ties counted) and speed against the exact search in one stage, the route ``auto`` settles on here
    (these keys repeat: the screen gives up)."""
    heads, capacity, dim = keys.shape[1], keys.shape[2], keys.shape[3]
    exact_index = create_index("torch", dim=dim, capacity=capacity, num_heads=heads, search="exact")
    exact_index.add(keys, keys)
    exact = exact_index.search(query, K)
    distinct = torch.unique(keys[0, 0], dim=0).shape[0]
    rows = []
    for mips in ("euclidean", "inner-product"):
        for nprobe in nprobes:
            ivf = create_index("faiss", kind="ivf", dim=dim, capacity=capacity, num_heads=heads, nlist=256,
                               nprobe=nprobe, mips=mips)
            ivf.add(keys, keys)
            times = alternating({"exact": lambda: exact_index.search(query, K, scratch=True),
                                 "ivf": lambda ivf=ivf: ivf.search(query, K, scratch=True)}, repeat)
            found = ivf.search(query, K)
            rows.append([f"faiss ivf ({mips}), nlist 256, nprobe {nprobe}", f"{times['ivf'] * 1e3:.0f}",
                         f"{times['exact'] * 1e3:.0f}", f"{times['exact'] / times['ivf']:.2f}",
                         f"{score_recall(exact, found, query):.3f}", f"{recall(exact, found):.3f}"])
    table(f"Approximate search on memlm-tiny's memory keys ({heads} heads x {capacity:,} x {dim}; {distinct:,} "
          f"distinct keys in head 0), {query.shape[2]} queries per head, k {K}; each row's two searches take turns",
          ["index", "search ms", "exact ms (one stage)", "speed vs exact", "recall@32 (ties count)",
           "recall@32 (ids)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (for a first look)")
    parser.add_argument("--text", help="a text file (e.g. war_and_peace.txt): also measure on memlm-tiny's keys")
    parser.add_argument("--device", default="cpu", help="cuda: only the two-stage table, on the GPU")
    parser.add_argument("--crossover", action="store_true", help="only the table of where two-stage starts to pay")
    args = parser.parse_args()
    print(describe())
    heads, dim, queries = 8, 64, 512
    if args.quick:
        capacity, repeat, scaling, ivf_capacity = 16384, 3, [8192, 32768], 131072
    else:
        capacity, repeat, scaling, ivf_capacity = 65536, 5, [8192, 65536, 524288], 1 << 20
    print(f"memlm.index benchmark, torch {torch.__version__}, faiss {faiss.__version__}")
    if args.crossover:
        return bench_crossover([4096, 8192, 16384, 32768], repeat)
    if args.device == "cpu":
        bench_segment_search(capacity, heads, dim, queries, repeat)
    kinds = {f"random, {n:,} entries": (random_entries(heads, n, dim, 7), random_entries(heads, queries, dim, 8))
             for n in (capacity // 4, capacity // 2)}
    kinds["random"] = (random_entries(heads, capacity, dim, 7), random_entries(heads, queries, dim, 8))
    points = clustered_entries(heads * (capacity + queries), dim, clusters=4096, seed=11)
    points = points.view(1, heads, capacity + queries, dim)
    kinds["clustered (4096 centres)"] = (points[:, :, :capacity].contiguous(), points[:, :, capacity:].contiguous())
    large = clustered_entries(ivf_capacity + queries, dim, clusters=4096, seed=11)
    kinds[f"clustered, one head of {ivf_capacity:,}"] = (large[:, :, :ivf_capacity].contiguous(),
                                                          large[:, :, ivf_capacity:].contiguous())
    if args.text:
        kinds["memlm-tiny memory layer, War and Peace"] = model_keys(args.text, capacity, queries)
    bench_two_stage(kinds, 2 * repeat, args.device)
    if args.device != "cpu":
        return
    bench_crossover([4096, 8192, 16384, 32768], repeat)
    bench_matmul_peak(capacity, heads, dim, queries, repeat)
    if args.text:
        bench_ivf_model_keys(*kinds["memlm-tiny memory layer, War and Peace"], [1, 2, 4, 16], 2 * repeat)
    bench_dtypes(capacity, heads, dim, queries, repeat)
    bench_add_scaling(scaling, heads, dim)
    bench_ivf(ivf_capacity, dim, queries, [16, 32, 64, 128], repeat)


if __name__ == "__main__":
    main()
