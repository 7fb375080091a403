"""The ``memlm`` command: ``demo``, ``info``, ``train``, ``summarize``, ``serve``, ``ingest``, ``ask``, ``docs``."""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import json
import os
import platform
import sys
import time
from pathlib import Path

from memlm.version import __version__


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
    model_help = "a model directory (Hugging Face model + tokenizer + memlm files); default: memlm-tiny"
    serve = commands.add_parser(
        "serve", help="run the HTTP service: stream documents into a store, ask over them (memlm.service)",
        description="Serve a MemoryStore over HTTP (FastAPI + uvicorn). The bearer token comes from MEMLM_API_TOKEN "
        "or --token-file; without one the service listens only on a loopback address.",
    )
    serve.add_argument("--store", required=True, help="the store's directory (created if missing)")
    serve.add_argument("--model", help=model_help)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--token-file", help="a file holding the bearer token clients must send")
    serve.add_argument("--max-document-bytes", type=int, default=1 << 30, help="largest document (default 1 GiB)")
    serve.add_argument("--max-prompt-chars", type=int, default=16384, help="longest prompt (default 16384)")
    serve.add_argument("--max-new-tokens", type=int, default=1024, help="most tokens per answer (default 1024)")
    ingest = commands.add_parser(
        "ingest", help="ingest a text file into a store, in this process (resumes a partial ingestion)")
    ingest.add_argument("file", help="a UTF-8 text file")
    ingest.add_argument("--store", required=True, help="the store's directory (created if missing)")
    ingest.add_argument("--doc-id", required=True, help="the document's id: [A-Za-z0-9._-]{1,128}")
    ingest.add_argument("--model", help=model_help)
    ingest.add_argument("--replace", action="store_true", help="replace a stored document of this id")
    ask = commands.add_parser("ask", help="ask a question over stored documents, in this process")
    ask.add_argument("question", help="the prompt; the answer continues it")
    ask.add_argument("--store", required=True, help="the store's directory")
    ask.add_argument("--doc", action="append", required=True, help="a document id (repeat for several)")
    ask.add_argument("--model", help=model_help)
    ask.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    ask.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    docs = commands.add_parser("docs", help="list a store's documents")
    docs.add_argument("--store", required=True, help="the store's directory")
    docs.add_argument("--check", action="store_true", help="verify every document's segments and hashes")
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
    from memlm.eval.passkey import passkey_trials
    from memlm.tiny import PASSKEY_DIGITS, load_default

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


def load_store_model(path: str | None):
    """The model a store works with: ``path`` or memlm-tiny, keeping memory in float16 unless its config says."""
    from memlm.tiny import DEFAULT_DIR, load_default

    directory = Path(path) if path else DEFAULT_DIR
    config = directory / "memlm_config.json"
    if not config.is_file():
        raise SystemExit(f"memlm: {directory} is not a memlm model directory (no memlm_config.json)")
    dtype = json.loads(config.read_text()).get("memory_dtype")
    mem_model, _ = load_default(directory, **({} if dtype else {"memory_dtype": "float16"}))
    return mem_model


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from memlm.serve.app import Limits, create_app
    from memlm.store import MemoryStore

    token = os.environ.get("MEMLM_API_TOKEN") or None
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise SystemExit(f"memlm serve: {args.token_file} is empty; put the token in it")
    if token is None and not _is_loopback(args.host):
        raise SystemExit(f"memlm serve: refusing to listen on {args.host} without a token; set MEMLM_API_TOKEN or "
                         "--token-file, or listen on 127.0.0.1")
    limits = Limits(args.max_document_bytes, args.max_prompt_chars, args.max_new_tokens)
    store = MemoryStore(args.store)
    try:
        app = create_app(store, load_store_model(args.model), token=token, limits=limits)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        store.close()
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ingest(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from memlm.store import MemoryStore
    from memlm.store.documents import ingest_file

    path = Path(args.file)
    if not path.is_file():
        raise SystemExit(f"memlm ingest: {path} is not a file")
    mem_model = load_store_model(args.model)
    with MemoryStore(args.store) as store, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                                 desc=f"memlm ingest {args.doc_id}") as bar:
        before = store.document(args.doc_id).tokens if args.doc_id in store and not args.replace else 0
        start = time.perf_counter()
        document = ingest_file(store, mem_model, args.doc_id, path, replace=args.replace, progress=bar.update)
        seconds = time.perf_counter() - start
    new = document.tokens - before
    print(f"{document.id}: {document.status}, {document.bytes:,} bytes, {document.tokens:,} tokens, "
          f"{document.segments:,} segments; {new:,} tokens ingested in {seconds:.1f} s "
          f"({new / max(seconds, 1e-9):,.0f} tokens/s)")
    return 0


def ask(args: argparse.Namespace) -> int:
    from memlm.store import MemoryStore
    from memlm.store.documents import ask as answer

    with MemoryStore(args.store, create=False) as store:
        result = answer(load_store_model(args.model), store, args.doc, args.question,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    print(result.text)
    for found in result.retrieved:
        print(f"  retrieved {found['document']} token {found['token_offset']:,} (score {found['score']:.2f})")
    return 0


def docs(args: argparse.Namespace) -> int:
    from memlm.store import MemoryStore

    with MemoryStore(args.store, create=False) as store:
        documents = store.documents()
        print(f"{'document':<32} {'status':<10} {'bytes':>14} {'tokens':>12} {'segments':>9}")
        for d in documents:
            print(f"{d.id:<32} {d.status:<10} {d.bytes:>14,} {d.tokens:>12,} {d.segments:>9,}")
        if args.check:
            problems = store.check()
            print("\n".join(problems) if problems else f"check: {len(documents)} documents, no problems")
            return 1 if problems else 0
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    if args.command == "train":
        from memlm.train.recipe import run

        metrics = run(args.config, args.output, steps=args.steps, resume=args.resume)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        return 0
    if args.command == "summarize":
        return summarize(args)
    if args.command == "demo":
        return demo(args)
    handlers = {"serve": serve, "ingest": ingest, "ask": ask, "docs": docs}
    if args.command in handlers:
        from memlm.store import StoreError

        try:
            return handlers[args.command](args)
        except (StoreError, ValueError, FileNotFoundError) as error:
            raise SystemExit(f"memlm {args.command}: {error}") from None
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
