"""The ingestion service: HTTP vs in process, concurrent uploads, query latency while ingesting.

    python benchmarks/bench_service.py [--book ../shared/data/war_and_peace.txt] [--tokens 200000]

1. The first ``--tokens`` tokens of the book ingested by ``memlm ingest`` (in process) and through
   ``memlm serve`` with ``memlm.serve.client`` (streamed in 64 KB chunks), ``--repeat`` runs of each,
   alternating: tokens/s (median, and the spread of the runs) and their ratio.
2. The same text cut into ``--parts`` documents, uploaded by 1, 4 and 8 clients at once: total tokens/s.
3. Query latency (``max_new_tokens`` 8 over one stored part) with the service idle and while two clients
   upload: p50 / p95 of ``--queries`` queries each.
4. Query latency over the whole stored document: cold (``--cache-bytes 0``: every query reads and decodes the
   document's memory from the store) and cached (the service's LRU cache of decoded memory).

Every run uses the embedded model (memlm-tiny, float16 memory, exact torch index) and a fresh store.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_index import table

from memlm.cli import load_store_model
from memlm.serve.client import Client, LocalServer
from memlm.store import MemoryStore

from machine import describe

SECTIONS = ["ingest", "concurrent", "latency", "document"]
PROMPT = " And what did Prince Andrew say? He said"


def first_tokens(book: Path, tokens: int, tokenizer) -> str:
    """The book's text up to (not including) its token number ``tokens``."""
    text = book.read_text(encoding="utf-8")
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text if tokens >= len(offsets) else text[: offsets[tokens][0]]


def split(text: str, parts: int) -> list[str]:
    """``parts`` pieces of about equal length, cut before a space."""
    cuts, start = [], 0
    for i in range(1, parts):
        cut = text.find(" ", i * len(text) // parts)
        cuts.append(text[start:cut])
        start = cut
    return [*cuts, text[start:]]


def uploads(url: str, paths: dict[str, Path], clients: int) -> float:
    """Upload every document with ``clients`` clients at once (client i takes documents i, i + clients, ...);
    returns the wall time."""
    names = sorted(paths)
    errors = []

    def run(mine):
        try:
            with Client(url) as client:
                for name in mine:
                    client.ingest(name, paths[name], progress=False)
        except Exception as error:  # reported after the threads end
            errors.append(error)

    threads = [threading.Thread(target=run, args=(names[i::clients],)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def latencies(url: str, doc_id: str, n: int) -> list[float]:
    times = []
    with Client(url) as client:
        for _ in range(n):
            start = time.perf_counter()
            client.query(doc_id, PROMPT, max_new_tokens=8)
            times.append(time.perf_counter() - start)
    return times


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--book", type=Path, default=Path(__file__).parents[2] / "shared/data/war_and_peace.txt")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--parts", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=4, help="runs of each ingestion path, alternating (median "
                        "and spread reported)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS,
                        help="what to measure (default: all)")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args()
    print(describe())
    work = Path(tempfile.mkdtemp(prefix="bench_service_"))
    mem_model = load_store_model(None)
    text = first_tokens(args.book, args.tokens, mem_model.tokenizer)
    book = work / "book.txt"
    book.write_text(text, encoding="utf-8")
    tokens = len(mem_model.tokenizer(text, add_special_tokens=False)["input_ids"])
    del mem_model  # this process only sends requests and reads stores from here on
    results = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {}  # update earlier runs
    results.update({"bytes": book.stat().st_size, "tokens": tokens})

    if "ingest" in args.sections:
        # `memlm ingest` in a fresh process, as the server is one (its own timing of the ingestion, model loaded),
        # and the client against `memlm serve`, alternately: on this CPU one run varies by +-10% from the next.
        in_process, http = [], []
        for run in range(args.repeat):
            store = str(work / f"in_process{run}")
            command = [sys.executable, "-m", "memlm.cli", "ingest", str(book), "--store", store, "--doc-id", "book"]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            in_process.append(float(re.search(r"ingested in ([\d.]+) s", output).group(1)))
            with LocalServer(work / f"http{run}") as server, Client(server.url) as client:
                start = time.perf_counter()
                client.ingest("book", book, progress=False)
                http.append(time.perf_counter() - start)
        results["in_process_runs_s"], results["http_runs_s"] = in_process, http
        results["in_process_s"], results["http_s"] = statistics.median(in_process), statistics.median(http)

        def row(name, runs, ratio):
            speeds = [tokens / seconds for seconds in runs]
            return [name, f"{tokens:,}", f"{statistics.median(runs):.1f}", f"{statistics.median(speeds):,.0f}",
                    f"{min(speeds):,.0f} – {max(speeds):,.0f}", ratio]

        rows = [row("in process (memlm ingest)", in_process, "1.00"),
                row("HTTP (memlm serve + client)", http, f"{results['in_process_s'] / results['http_s']:.2f}")]
        table(f"Ingesting the first {tokens:,} tokens of {args.book.name} ({results['bytes']:,} bytes), {args.repeat} "
              "alternating runs of each",
              ["path", "tokens", "median s", "median tokens/s", "runs' range", "vs in process"], rows)

    if "document" in args.sections:
        store = work / "document"
        subprocess.run([sys.executable, "-m", "memlm.cli", "ingest", str(book), "--store", str(store), "--doc-id",
                        "book"], capture_output=True, check=True)
        rows = []
        for label, cache in (("cold (no cache: store read + decode)", "0"), ("cached", str(256 << 20))):
            with LocalServer(store, "--cache-bytes", cache) as server:
                times = latencies(server.url, "book", args.queries + 1)[1:]  # the first fills the cache
            results[f"document_query_{'cold' if cache == '0' else 'cached'}_s"] = times
            rows.append([label, str(len(times)), f"{statistics.median(times) * 1000:,.0f}",
                         f"{p95(times) * 1000:,.0f}"])
        table(f"Query latency over the whole stored document ({tokens:,} tokens): {PROMPT!r}, 8 new tokens",
              ["memory", "queries", "p50 ms", "p95 ms"], rows)

    parts = {f"part{i}": work / f"part{i}.txt" for i in range(args.parts)}
    for path, part in zip(parts.values(), split(text, args.parts), strict=True):
        path.write_text(part, encoding="utf-8")
    if "concurrent" in args.sections:
        rows = []
        for clients in args.concurrency:
            with LocalServer(work / f"concurrent{clients}") as server:
                seconds = uploads(server.url, parts, clients)
            with MemoryStore(work / f"concurrent{clients}") as store:
                stored = sum(d.tokens for d in store.documents())
                assert store.check() == [] and all(d.status == "complete" for d in store.documents())
            results[f"concurrent_{clients}_s"] = seconds
            rows.append([str(clients), f"{stored:,}", f"{seconds:.1f}", f"{stored / seconds:,.0f}"])
        table(f"{args.parts} documents of ~{tokens // args.parts:,} tokens uploaded by N clients at once",
              ["clients", "tokens", "seconds", "tokens/s"], rows)

    if "latency" in args.sections:
        with LocalServer(work / "latency") as server:
            with Client(server.url) as client:
                client.ingest("probe", parts["part0"], progress=False)
            idle = latencies(server.url, "probe", args.queries)
            others = {name: path for name, path in parts.items() if name != "probe"}
            writer = threading.Thread(target=uploads, args=(server.url, others, 2))
            writer.start()
            busy = latencies(server.url, "probe", args.queries)
            writer.join()
        results["query_idle_s"], results["query_busy_s"] = idle, busy
        rows = [[label, str(len(times)), f"{statistics.median(times) * 1000:,.0f}", f"{p95(times) * 1000:,.0f}"]
                for label, times in (("idle", idle), ("while 2 clients upload", busy))]
        table(f"Query latency: {PROMPT!r}, 8 new tokens, over one document of ~{tokens // args.parts:,} tokens",
              ["service", "queries", "p50 ms", "p95 ms"], rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
