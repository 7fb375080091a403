"""``memlm demo`` (the passkey in a haystack, through memlm-tiny) and ``memlm info``."""

from __future__ import annotations

import argparse
import importlib.util
import platform

from memlm.version import __version__


def add_commands(commands) -> None:
    demo = commands.add_parser(
        "demo", help="hide a pass key in a long haystack and ask the embedded model (memlm-tiny) for it",
        description="Generate a haystack of filler sentences with a pass key hidden in it, stream it through "
        "memlm-tiny (shipped inside the package) and ask for the key.",
    )
    demo.add_argument("--length", type=int, default=32768, help="haystack tokens (default 32768)")
    demo.add_argument("--seed", type=int, default=0, help="chooses the key and where it hides (default 0)")
    demo.add_argument("--depth", type=float, help="where the key hides, 0..1 (default: chosen by the seed)")
    demo.add_argument("--haystack", help="a UTF-8 text file whose sentences make the haystack (default: the "
                      "built-in filler)")
    demo.add_argument("--distractors", type=int, default=0,
                      help="other numbers hidden in the haystack as 'The door code is N.' (default 0)")
    demo.add_argument("--no-memory", action="store_true",
                      help="switch the kNN memory off: the model keeps only its local context (XL cache + segment)")
    demo.set_defaults(handler=demo_command)
    info_parser = commands.add_parser("info", help="print the versions and index backends this installation has")
    info_parser.set_defaults(handler=info_command)


def info_command(args: argparse.Namespace) -> int:
    print(info())
    return 0


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


def demo_command(args: argparse.Namespace) -> int:
    import time

    import torch

    from memlm.eval.tasks import Haystack, make_sample
    from memlm.tiny import PASSKEY_DIGITS, load_default

    if args.length < 64:
        raise SystemExit(f"memlm demo: --length must be at least 64 tokens, got {args.length}")
    if args.depth is not None and not 0 <= args.depth <= 1:
        raise SystemExit(f"memlm demo: --depth must be in [0, 1], got {args.depth}")
    if args.distractors < 0:
        raise SystemExit(f"memlm demo: --distractors must be >= 0, got {args.distractors}")
    try:
        haystack = Haystack.from_file(args.haystack) if args.haystack else Haystack()
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SystemExit(f"memlm demo: --haystack {args.haystack}: expected a UTF-8 text file of sentences "
                         f"({error})") from error
    mem_model, tokenizer = load_default(**({"memory_layers": ()} if args.no_memory else {}))
    config = mem_model.config
    memory = f"kNN memory at layer {config.memory_layers[0]}" if config.memory_layers else "kNN memory off"
    parameters = sum(p.numel() for p in mem_model.model.parameters())
    print(f"memlm-tiny ({parameters / 1e6:.1f}M parameters): local context {config.xl_length + config.segment_length} "
          f"tokens (XL cache {config.xl_length} + segment {config.segment_length}), {memory}")
    sample = make_sample("passkey", tokenizer, haystack, args.length, args.depth, args.seed, digits=PASSKEY_DIGITS,
                         distractors=args.distractors)
    key = sample.references[0]
    before = len(tokenizer(sample.context[: sample.needles[0]], add_special_tokens=False)["input_ids"])
    key_tokens = len(tokenizer(" " + key, add_special_tokens=False)["input_ids"])
    start = time.perf_counter()
    with torch.no_grad(), mem_model.session() as session:
        session.feed(sample.context, progress=True)
        # as many tokens as the key has: right when they are the key (memlm eval scores longer answers)
        output = session.generate(" " + sample.question, max_new_tokens=key_tokens, eos_token_id=[])
        tokens = session.stream_length
    seconds = time.perf_counter() - start
    others = f", {len(sample.distractors)} other numbers in it" if sample.distractors else ""
    print(f"haystack: {tokens:,} tokens of {haystack.name}{others}; pass key {key} at token {before:,} "
          f"({tokens - before:,} tokens before the question's end)")
    print(f"question: {sample.question}")
    print(f"answer:   {output.strip()!r} -> {'right' if output.strip() == key else 'wrong'}")
    print(f"streamed {tokens:,} tokens at {tokens / seconds:,.0f} tokens/s")
    return 0
