"""``memlm train``: a YAML recipe (``memlm.train.recipe``), under torchrun for data parallel."""

from __future__ import annotations

import argparse


def add_commands(commands) -> None:
    train = commands.add_parser(
        "train", help="train a memory model from a YAML recipe (memlm.train.recipe); torchrun for data parallel",
        description="Train a memory model as a YAML recipe says (model, memory, task, train, evaluate; see "
        "memlm/train/recipe.py). Multi-process: torchrun --nproc_per_node N -m memlm.cli train ...",
    )
    train.add_argument("--config", required=True, help="the YAML recipe")
    train.add_argument("--output", required=True, help="directory for checkpoints, the trained model and metrics")
    train.add_argument("--steps", type=int, help="override the recipe's train.steps")
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    train.set_defaults(handler=train_command)


def train_command(args: argparse.Namespace) -> int:
    from memlm.train.recipe import run

    metrics = run(args.config, args.output, steps=args.steps, resume=args.resume)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return 0
