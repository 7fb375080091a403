"""The ``memlm`` command: ``info``, ``train``. More subcommands arrive with their features (demo, serve,
summarize)."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memlm",
        description="Long-term memory for Hugging Face language models: stream documents of any length "
        "through a model with Transformer-XL caches, kNN memory and RMT tokens.",
    )
    parser.add_argument("--version", action="version", version=f"memlm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("info", help="print the versions and index backends this installation has")
    train = commands.add_parser(
        "train", help="train a memory model from a YAML recipe (memlm.recipe); run under torchrun for data parallel",
        description="Train a memory model as a YAML recipe says (model, memory, task, train, evaluate; see "
        "memlm/recipe.py). Multi-process: torchrun --nproc_per_node N -m memlm.cli train ...",
    )
    train.add_argument("--config", required=True, help="the YAML recipe")
    train.add_argument("--output", required=True, help="directory for checkpoints, the trained model and metrics")
    train.add_argument("--steps", type=int, help="override the recipe's train.steps")
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    return parser


def info() -> str:
    """One line per component that memlm can use, with its version or 'not installed'."""
    lines = [f"memlm {__version__}", f"python {platform.python_version()}"]
    for module in ("torch", "transformers", "faiss", "triton", "lmdb", "safetensors"):
        if importlib.util.find_spec(module) is None:
            lines.append(f"{module} not installed")
            continue
        lines.append(f"{module} {getattr(__import__(module), '__version__', '?')}")
    import torch

    cuda = f"available: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "not available"
    lines.append(f"cuda {cuda}")
    backends = ["torch"] + (["faiss (flat, ivf)"] if importlib.util.find_spec("faiss") else [])
    lines.append(f"index backends: {', '.join(backends)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    if args.command == "train":
        from .recipe import run

        metrics = run(args.config, args.output, steps=args.steps, resume=args.resume)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
