"""The service's crash path on a busy machine: upload a book to ``memlm serve``, SIGKILL it mid-ingestion, start
it again and resume to the end, with a CPU-bound process running beside it all the while.

    python benchmarks/bench_resume.py [--book ../shared/data/war_and_peace.txt] [--bytes 430000] [--kill-at 90000]

Prints the seconds to the kill (``--kill-at`` tokens committed) and to the resumed document's completion.
The default store model is memlm-tiny with float16 memory (its index: distinct keys, ``memlm/index/distinct.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from memlm.serve.client import Client, LocalServer, ServiceError

from machine import describe


def committed(client: Client, doc_id: str) -> int:
    try:
        return client.status(doc_id)["tokens"]
    except ServiceError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--book", default="../shared/data/war_and_peace.txt")
    parser.add_argument("--bytes", type=int, default=430_000, help="the book's first bytes uploaded")
    parser.add_argument("--kill-at", type=int, default=90_000, help="committed tokens at which the server is killed")
    args = parser.parse_args()
    print(describe())
    data = Path(args.book).read_bytes()[: args.bytes]
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with tempfile.TemporaryDirectory() as folder:
            book, store = Path(folder) / "book.txt", Path(folder) / "store"
            book.write_bytes(data)
            start = time.monotonic()
            server = LocalServer(store)

            def upload() -> None:
                with contextlib.suppress(httpx.TransportError):  # killed under it
                    chunks = (data[i : i + 65536] for i in range(0, len(data), 65536))
                    httpx.put(f"{server.url}/v1/documents/book", content=chunks, timeout=600)

            thread = threading.Thread(target=upload)
            thread.start()
            with Client(server.url) as client:
                while committed(client, "book") < args.kill_at:
                    time.sleep(0.2)
            server.kill()
            thread.join(60)
            killed = time.monotonic() - start
            with LocalServer(store) as server, Client(server.url) as client:
                result = client.ingest("book", book, progress=False)
            print(f"{args.bytes:,} bytes, {result['tokens']:,} tokens: killed at {args.kill_at:,} committed tokens "
                  f"after {killed:.0f} s; resumed, {result['status']} after {time.monotonic() - start:.0f} s "
                  "(a busy process beside it)")
    finally:
        busy.kill()
        busy.wait()


if __name__ == "__main__":
    main()
