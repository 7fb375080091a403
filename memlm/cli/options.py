"""``--threads``, shared by the commands that run a model (``runtime/threads.py`` says how sessions use it)."""

from __future__ import annotations

import argparse


def add_threads_option(parser: argparse.ArgumentParser, default: str = "all cores") -> None:
    parser.add_argument("--threads", type=threads_count, metavar="N",
                        help=f"the most intra-op threads the model uses (default: {default}); a forward takes fewer "
                        "where its work would not pay for them or other processes hold the cores")


def threads_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def apply_threads(args: argparse.Namespace) -> None:
    """This process's model work runs on at most ``--threads`` intra-op threads (sessions opened after take it)."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
