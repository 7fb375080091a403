"""Distinct-key search against scoring every slot: memlm-tiny streaming a book with float16 memory (the store's).

    python benchmarks/bench_distinct.py [--book ../shared/data/war_and_peace.txt] [--tokens 4096,16384,65536]

One session per cell, in one process, the two searches alternating; tokens/s and whether the last logits agree.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_index import table

import memlm

from machine import describe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--book", default="../shared/data/war_and_peace.txt")
    parser.add_argument("--tokens", default="4096,16384,65536")
    args = parser.parse_args()
    print(describe())
    lengths = [int(n) for n in args.tokens.split(",")]
    mem_model, tokenizer = memlm.load_default(memory_dtype="float16")
    text = Path(args.book).read_text(encoding="utf-8")[: 8 * max(lengths)]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : max(lengths)]
    rows = []
    for n in lengths:
        speeds, logits = {}, {}
        for search in ("exact", "distinct"):
            mem_model.config.index_kwargs = {"search": search}
            with torch.no_grad(), mem_model.session() as session:
                start = time.perf_counter()
                logits[search] = session.feed(ids[:, :n], return_logits=True).logits[0, -1]
                speeds[search] = n / (time.perf_counter() - start)
        same = torch.allclose(logits["exact"], logits["distinct"], atol=1e-4)
        rows.append([f"{n:,}", f"{speeds['exact']:,.0f}", f"{speeds['distinct']:,.0f}",
                     f"{speeds['distinct'] / speeds['exact']:.2f}", "yes" if same else "no"])
    table("memlm-tiny, float16 memory, War and Peace", ["tokens", "every slot scored, tok/s", "distinct keys, tok/s",
                                                         "ratio", "same logits"], rows)


if __name__ == "__main__":
    main()
