"""The store commands: ``memlm serve`` (the HTTP service), ``ingest``, ``ask`` and ``docs``."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import time
from pathlib import Path

from .options import add_threads_option, apply_threads


def add_commands(commands) -> None:
    model_help = "a model directory (Hugging Face model + tokenizer + memlm files); default: memlm-tiny"
    serve = commands.add_parser(
        "serve", help="run the HTTP service: stream documents into a store, ask over them (memlm.serve.app)",
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
    for command in (serve, ingest, ask):
        add_model_options(command)
        add_threads_option(command, "all cores but one, left to the HTTP and store threads" if command is serve
                           else "all cores")
    serve.add_argument("--map-size", type=int, default=1 << 30, help="initial LMDB map size in bytes; it doubles "
                       "when full (default 1 GiB)")
    serve.add_argument("--cache-bytes", type=int, default=256 << 20, help="decoded memory of recently asked documents "
                       "kept in RAM, least recently used out first (default 256 MiB; 0 = none)")
    docs = commands.add_parser("docs", help="list a store's documents")
    docs.add_argument("--store", required=True, help="the store's directory")
    docs.add_argument("--check", action="store_true", help="verify every document's segments and hashes")
    serve.set_defaults(handler=store_errors(serve_command))
    ingest.set_defaults(handler=store_errors(ingest_command))
    ask.set_defaults(handler=store_errors(ask_command))
    docs.set_defaults(handler=store_errors(docs_command))


def store_errors(handler):
    """``handler`` with the store's errors, bad values and missing files turned into a one-line exit message."""

    def run(args: argparse.Namespace) -> int:
        from memlm.store import StoreError

        try:
            return handler(args)
        except (StoreError, ValueError, FileNotFoundError) as error:
            raise SystemExit(f"memlm {args.command}: {error}") from None

    return run


#: ``--index`` choices: the memory index backend and its arguments (search-only: a stored corpus may switch)
INDEXES = {"torch": ("torch", {}), "faiss": ("faiss", {"kind": "flat"}), "ivf": ("faiss", {"kind": "ivf"})}


def add_model_options(parser) -> None:
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the model's dtype (default float32; another dtype makes other memories: another store)")
    parser.add_argument("--index", choices=sorted(INDEXES), help="memory index: torch (exact), faiss (exact), ivf "
                        "(approximate); default: the model's")
    parser.add_argument("--top-k", type=int, help="memory entries each query retrieves; default: the model's")


def load_store_model(path: str | None, device: str = "cpu", dtype: str = "float32", index: str | None = None,
                     top_k: int | None = None):
    """The model a store works with: ``path`` or memlm-tiny on ``device`` in ``dtype``, keeping memory in float16
    unless its config says; ``index`` (a key of ``INDEXES``) and ``top_k`` override how memory is searched."""
    import torch

    from memlm.tiny import DEFAULT_DIR, load_default

    directory = Path(path) if path else DEFAULT_DIR
    config = directory / "memlm_config.json"
    if not config.is_file():
        raise SystemExit(f"memlm: {directory} is not a memlm model directory (no memlm_config.json)")
    overrides = {} if json.loads(config.read_text()).get("memory_dtype") else {"memory_dtype": "float16"}
    if index is not None:
        overrides["index"], overrides["index_kwargs"] = INDEXES[index]
    if top_k is not None:
        overrides["top_k"] = top_k
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise SystemExit(f"memlm: --device {device!r} is not a torch device ({error})") from None
    mem_model, _ = load_default(directory, device=device, **overrides)
    mem_model.model.to(getattr(torch, dtype))
    return mem_model


def model_options(args: argparse.Namespace) -> dict:
    return {"device": args.device, "dtype": args.dtype, "index": args.index, "top_k": args.top_k}


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from memlm.serve.app import Limits, create_app
    from memlm.store import MemoryStore

    token = os.environ.get("MEMLM_API_TOKEN") or None
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise SystemExit(f"memlm serve: {args.token_file} is empty; put the token in it")
    if token is None and not is_loopback(args.host):
        raise SystemExit(f"memlm serve: refusing to listen on {args.host} without a token; set MEMLM_API_TOKEN or "
                         "--token-file, or listen on 127.0.0.1")
    limits = Limits(args.max_document_bytes, args.max_prompt_chars, args.max_new_tokens)
    store = MemoryStore(args.store, map_size=args.map_size, cache_bytes=args.cache_bytes)
    try:
        app = create_app(store, load_store_model(args.model, **model_options(args)), token=token, limits=limits,
                         threads=args.threads)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        store.close()
    return 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ingest_command(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from memlm.store import MemoryStore
    from memlm.store.documents import ingest_file

    path = Path(args.file)
    if not path.is_file():
        raise SystemExit(f"memlm ingest: {path} is not a file")
    apply_threads(args)
    mem_model = load_store_model(args.model, **model_options(args))
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


def ask_command(args: argparse.Namespace) -> int:
    from memlm.store import MemoryStore
    from memlm.store.documents import ask as answer

    apply_threads(args)
    with MemoryStore(args.store, create=False) as store:
        result = answer(load_store_model(args.model, **model_options(args)), store, args.doc, args.question,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    print(result.text)
    for found in result.retrieved:
        print(f"  retrieved {found['document']} token {found['token_offset']:,} (score {found['score']:.2f})")
    return 0


def docs_command(args: argparse.Namespace) -> int:
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
