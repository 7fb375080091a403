"""``memlm summarize``: a book of any length with a local model (``memlm.summarize``)."""

from __future__ import annotations

import argparse


def add_commands(commands) -> None:
    summarize = commands.add_parser(
        "summarize", help="summarize a book of any length with a local model (memlm.summarize)",
        description="Summarize a text file: unlimiformer (encoder-decoder, retrieval over the whole book), memory "
        "(decoder-only, the book streamed into a memlm session) or hierarchical (summaries of summaries).",
    )
    summarize.add_argument("book", help="a UTF-8 text file")
    summarize.add_argument("--model", required=True, help="a local Hugging Face model directory (with tokenizer)")
    summarize.add_argument("--method", choices=("unlimiformer", "memory", "hierarchical"), default="unlimiformer")
    summarize.add_argument("--chapters", action="store_true", help="a summary per chapter, then one of the book")
    summarize.add_argument("--output", help="write the summaries here (markdown); default: print them")
    summarize.add_argument("--reference", help="a reference summary: print ROUGE-1/2/L of the book summary")
    summarize.add_argument("--max-new-tokens", type=int, default=128, help="tokens per summary (default 128)")
    summarize.add_argument("--top-k", type=int, default=32, help="retrieved states / memories per query (default 32)")
    summarize.set_defaults(handler=summarize_command)


def summarize_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from memlm.summarize.summarizer import Summarizer, load, rouge, to_markdown

    book = Path(args.book)
    if not book.is_file():
        raise FileNotFoundError(f"{book}: expected a UTF-8 text file")
    text = book.read_text(encoding="utf-8")
    model, tokenizer = load(args.model)
    summarizer = Summarizer(model, tokenizer, args.method, max_new_tokens=args.max_new_tokens, top_k=args.top_k)
    summaries = summarizer.summarize_book(text, chapters=args.chapters)
    markdown = to_markdown(summaries, book.name, args.method)
    if args.output:
        Path(args.output).write_text(markdown, encoding="utf-8")
        print(f"wrote {len(summaries)} summaries to {args.output}")
    else:
        print(markdown)
    if args.reference:
        scores = rouge(summaries[-1].text, Path(args.reference).read_text(encoding="utf-8"))
        print(" ".join(f"{name.upper()}={value:.4f}" for name, value in scores.items()))
    return 0
