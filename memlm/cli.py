"""The ``memlm`` command: ``demo``, ``info``, ``train``, ``summarize``."""

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
    demo = commands.add_parser(
        "demo", help="hide a pass key in a long haystack and ask the embedded model (memlm-tiny) for it",
        description="Generate a haystack of filler sentences with a pass key hidden in it, stream it through "
        "memlm-tiny (shipped inside the package) and ask for the key.",
    )
    demo.add_argument("--length", type=int, default=32768, help="haystack tokens (default 32768)")
    demo.add_argument("--seed", type=int, default=0, help="chooses the key and where it hides (default 0)")
    demo.add_argument("--depth", type=float, help="where the key hides, 0..1 (default: chosen by the seed)")
    demo.add_argument("--no-memory", action="store_true",
                      help="switch the kNN memory off: the model keeps only its local context (XL cache + segment)")
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


def demo(args: argparse.Namespace) -> int:
    from .passkey import passkey_trials
    from .tiny import PASSKEY_DIGITS, load_default

    if args.length < 64:
        raise SystemExit(f"memlm demo: --length must be at least 64 tokens, got {args.length}")
    if args.depth is not None and not 0 <= args.depth <= 1:
        raise SystemExit(f"memlm demo: --depth must be in [0, 1], got {args.depth}")
    mem_model, tokenizer = load_default(**({"memory_layers": ()} if args.no_memory else {}))
    config = mem_model.config
    memory = f"kNN memory at layer {config.memory_layers[0]}" if config.memory_layers else "kNN memory off"
    parameters = sum(p.numel() for p in mem_model.model.parameters())
    print(f"memlm-tiny ({parameters / 1e6:.1f}M parameters): local context {config.xl_length + config.segment_length} "
          f"tokens (XL cache {config.xl_length} + segment {config.segment_length}), {memory}")
    (result,) = passkey_trials(mem_model, tokenizer, length=args.length, seeds=[args.seed], depth=args.depth,
                               digits=PASSKEY_DIGITS, progress=True)
    print(f"haystack: {result.tokens:,} tokens; pass key {result.key} at token {result.key_position:,} "
          f"({result.tokens - result.key_position:,} tokens before the question's end)")
    print("question: What is the pass key? The pass key is")
    print(f"answer:   {result.answer!r} -> {'right' if result.right else 'wrong'}")
    print(f"streamed {result.tokens:,} tokens at {result.tokens_per_second:,.0f} tokens/s")
    return 0


def summarize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .summarize import Summarizer, load, rouge, to_markdown

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
    if args.command == "summarize":
        return summarize(args)
    if args.command == "demo":
        return demo(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
