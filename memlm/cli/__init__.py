"""The ``memlm`` command, one module per command group: ``demo`` and ``info`` (``demo.py``), ``train``,
``summarize``, the store commands ``serve``, ``ingest``, ``ask``, ``docs`` (``store.py``), and ``eval``."""

from __future__ import annotations

import argparse
import sys

from memlm.version import __version__

from . import demo, store, summarize, train
from . import eval as eval_
from .store import load_store_model

__all__ = ["build_parser", "load_store_model", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memlm",
        description="Long-term memory for Hugging Face language models: stream documents of any length "
        "through a model with Transformer-XL caches, kNN memory and RMT tokens.",
    )
    parser.add_argument("--version", action="version", version=f"memlm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in (demo, train, summarize, store, eval_):
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
