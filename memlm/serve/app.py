"""The HTTP service: stream documents into a MemoryStore and ask over them (FastAPI; ``memlm serve``).

All model work (ingesting segments, answering, deleting) runs on one worker thread, in arrival order
(``ModelWorker``): an upload queues one job per segment, so concurrent uploads and queries take turns
and none waits for a whole document, and a delete never runs while a query reads. The request handlers
read bodies, and the store in a thread pool (never on the event loop; each read one LMDB snapshot).

Endpoints (``/openapi.json`` has the schema): ``PUT /v1/documents/{id}`` (body: the text, streamed;
``?offset=N`` resumes, ``?replace=true`` starts over), ``GET /v1/documents``, ``GET`` and ``DELETE
/v1/documents/{id}``, ``POST /v1/query`` (JSON; server-sent events with ``"stream": true``),
``GET /healthz``. With a token, every ``/v1`` request needs ``Authorization: Bearer <token>``.
Errors are JSON ``{"detail": ...}`` with the status that says what was wrong: 400 invalid UTF-8,
401 token, 404 unknown document, 409 conflicts with the stored state (another upload of the document,
in this process or another, commits first), 413 too large, 415 content type, 422 invalid request; a
failure of the server itself is a 500 with a generic message, its traceback in the log.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Literal

import torch
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from transformers import GenerationConfig

from memlm.config import check_integer
from memlm.runtime.threads import available_cores
from memlm.store.documents import DocumentTooLarge, DocumentWriter, InvalidText, ask
from memlm.store.records import DOC_ID, DocumentConflict, DocumentNotFound, FingerprintMismatch
from memlm.store.store import MemoryStore, stored_documents
from memlm.version import __version__

logger = logging.getLogger(__name__)

#: model time one upload job may take before other requests get their turn
STEP_SECONDS = 0.05
DocId = Annotated[str, PathParam(pattern=f"^{DOC_ID.pattern}$", description="[A-Za-z0-9._-]{1,128}")]


@dataclass
class Limits:
    """What one request may ask for."""

    max_document_bytes: int = 1 << 30
    max_prompt_chars: int = 16384
    max_new_tokens: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_document_bytes", "max_prompt_chars", "max_new_tokens"):
            check_integer(name, getattr(self, name), 1)


class ErrorBody(BaseModel):
    """Every error's body: ``detail`` says what was wrong (FastAPI's list of field errors for a request that does not
    fit the schema); ``offset``: the byte offset of the first invalid UTF-8 byte (400)."""

    detail: str | list[dict]
    offset: int | None = None


ERRORS = {400: "invalid UTF-8", 401: "missing or wrong bearer token", 404: "no such document",
          409: "conflicts with the stored state (offset, content, status, another upload)", 413: "too large",
          415: "wrong Content-Type", 422: "invalid request", 500: "the server failed (details in its log)"}


def errors(*statuses: int) -> dict:
    """The ``responses`` of a route: these error statuses (and 401 and 500, which every route may answer)."""
    return {status: {"model": ErrorBody, "description": ERRORS[status]}
            for status in sorted({*statuses, 401, 500})}


class Retrieved(BaseModel):
    document: str
    token_offset: int
    score: float


class AnswerBody(BaseModel):
    """The answer of ``POST /v1/query`` (without ``stream``; with it, server-sent events and this as ``done``)."""

    text: str
    tokens: int
    retrieved: list[Retrieved]


ANSWER = {200: {"description": "the answer: JSON, or server-sent events with `stream`", "content": {
    "application/json": {"schema": AnswerBody.model_json_schema()},
    "text/event-stream": {"schema": {  # one server-sent event
        "type": "object", "required": ["data"], "description": "message events (data: {\"text\": piece}), then one "
        "done event (data: the JSON answer) or error event (data: {\"detail\": ...})",
        "properties": {"event": {"enum": ["message", "done", "error"]}, "data": {"type": "string"}}}}}}}


class QueryRequest(BaseModel):
    """The body of ``POST /v1/query``."""

    model_config = ConfigDict(extra="forbid")
    documents: list[Annotated[str, Field(pattern=f"^{DOC_ID.pattern}$")]] = Field(
        min_length=1, description="ids of complete documents to answer over, each once",
        json_schema_extra={"uniqueItems": True})
    prompt: str = Field(min_length=1)
    max_new_tokens: int | None = Field(None, ge=1, description="default: 64, or the server's maximum if lower")
    # 0 (greedy) or a temperature at which sampling stays finite (logits / 1e-300 overflow: found by fuzzing)
    temperature: Annotated[float, Field(ge=0.01, le=10.0)] | Literal[0] = Field(0, description="0: greedy decoding")
    # the sampling and stopping fields of transformers' GenerationConfig, meaning what they mean there
    top_k: int | None = Field(None, ge=0, description="sample among the k most likely tokens (0: all)")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus sampling mass")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="drop tokens below min_p x the top probability")
    typical_p: float | None = Field(None, gt=0.0, le=1.0, description="locally typical sampling mass")
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0, description="> 1 discourages repeats")
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=64, description="n-grams that may not repeat")
    stop_strings: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, min_length=1, max_length=16, description="stop when the answer ends with one of these")
    stream: bool = Field(False, description="answer with server-sent events, one per new piece of text")


class ModelWorker:
    """One thread that runs every piece of model work, in the order it was asked for, on at most ``threads``
    intra-op threads (the sessions it opens take that as their limit, ``runtime/threads.py``)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    async def run(self, fn, *args, **kwargs):
        with self._lock:  # started on first use, so an app whose lifespan runs again (test clients) works again
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memlm-model",
                                                    initializer=torch.set_num_threads, initargs=(self.threads,))
            executor = self._executor
        return await asyncio.get_running_loop().run_in_executor(executor, partial(fn, *args, **kwargs))

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)


def create_app(store: MemoryStore, mem_model, *, token: str | None = None, limits: Limits | None = None,
               threads: int | None = None) -> FastAPI:
    """The service over ``store`` answering with ``mem_model`` (its tokenizer attached). ``threads``: the most
    intra-op threads the model work uses; default: all cores but one, which stays free for the event loop, the
    uploads' reads and the store's commits (on 2 cores a second model thread cost more than it gave)."""
    limits = limits or Limits()
    if threads is None:
        threads = max(1, available_cores() - 1)
    check_integer("threads", threads, 1)
    store.bind(mem_model)  # refuse a store of another model before serving anything
    worker = ModelWorker(threads)
    active: set[str] = set()  # documents an upload is writing now

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    app = FastAPI(title="memlm", version=__version__, lifespan=lifespan,
                  description="Long-term memory for language models: ingest documents, ask over them.")

    def authorize(authorization: Annotated[str | None, Header()] = None) -> None:
        if token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    text_body = {"requestBody": {"required": False,  # an empty body is an empty document
                                 "content": {"text/plain": {"schema": {"type": "string"}}}}}

    # OpenAPI links: what a stored document's id leads to (stateful clients and fuzzers follow them)
    by_id = {"doc_id": "$response.body#/id"}
    links = {name: {"operationId": operation, "parameters": by_id}
             for name, operation in (("status", "get_document"), ("delete", "delete_document"))}
    links["query"] = {"operationId": "query", "requestBody": {"documents": ["$response.body#/id"], "prompt": "Hi"}}

    @v1.put("/documents/{doc_id}", summary="Ingest a document (the body is its UTF-8 text, streamed)",
            operation_id="put_document", responses={200: {"links": links}, **errors(400, 409, 413, 415, 422)},
            openapi_extra=text_body)
    async def put_document(request: Request, doc_id: DocId,
                           offset: int = Query(0, ge=0, le=limits.max_document_bytes),
                           replace: bool = False) -> dict:
        _require_type(request, "text/plain", charset="utf-8", optional=True)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and offset + int(length) > limits.max_document_bytes:
            raise HTTPException(413, f"document would be {offset + int(length):,} bytes; the maximum is "
                                     f"{limits.max_document_bytes:,}")
        if doc_id in active:
            raise HTTPException(409, f"document {doc_id!r} is being ingested by another request")
        active.add(doc_id)
        writer = None
        try:
            writer = await worker.run(DocumentWriter, store, mem_model, doc_id, offset=offset, replace=replace,
                                      max_bytes=limits.max_document_bytes)
            async for chunk in request.stream():
                if chunk:
                    await worker.run(writer.push, chunk)
                    while await worker.run(writer.step, STEP_SECONDS):
                        pass
            return (await worker.run(writer.finish)).to_dict()
        except ClientDisconnect:  # what is committed stays; the client resumes at the committed offset
            return JSONResponse({"detail": "the client disconnected"}, status_code=400)
        finally:
            if writer is not None:
                await worker.run(writer.close)
            active.discard(doc_id)

    @v1.get("/documents", summary="List the stored documents", operation_id="list_documents", responses=errors())
    async def list_documents() -> dict:
        return {"documents": [document.to_dict() for document in await asyncio.to_thread(store.documents)]}

    @v1.get("/documents/{doc_id}", summary="A document's status, tokens and committed byte offset",
            operation_id="get_document", responses=errors(404, 422))
    async def get_document(doc_id: DocId) -> dict:
        return {**(await asyncio.to_thread(store.document, doc_id)).to_dict(), "uploading": doc_id in active}

    @v1.delete("/documents/{doc_id}", summary="Delete a document and its memory", operation_id="delete_document",
               responses=errors(404, 409, 422))
    async def delete_document(doc_id: DocId) -> dict:
        if doc_id in active:
            raise HTTPException(409, f"document {doc_id!r} is being ingested; delete it when the upload ends")
        return (await worker.run(store.delete, doc_id)).to_dict()  # after the queries queued before it

    body_schema = QueryRequest.model_json_schema()  # with this server's limits, which it enforces
    body_schema["properties"]["prompt"]["maxLength"] = limits.max_prompt_chars
    body_schema["properties"]["max_new_tokens"]["anyOf"][0]["maximum"] = limits.max_new_tokens
    schema = {"requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}}}

    @v1.post("/query", summary="Ask over stored documents", operation_id="query", openapi_extra=schema,
             responses={**ANSWER, **errors(404, 409, 413, 415, 422)})
    async def query(request: Request):
        _require_type(request, "application/json")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > 4 * limits.max_prompt_chars + 65536:
            raise HTTPException(413, f"query body of {int(length):,} bytes is too large")
        try:
            body = QueryRequest.model_validate(json.loads(await request.body()))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise HTTPException(422, f"the body is not valid JSON: {error}") from None
        except ValidationError as error:
            raise HTTPException(422, error.errors(include_url=False, include_context=False)) from None
        if len(body.prompt) > limits.max_prompt_chars:
            raise HTTPException(422, f"prompt has {len(body.prompt):,} characters; the maximum is "
                                     f"{limits.max_prompt_chars:,}")
        if body.max_new_tokens is None:
            body.max_new_tokens = min(64, limits.max_new_tokens)
        if body.max_new_tokens > limits.max_new_tokens:
            raise HTTPException(422, f"max_new_tokens {body.max_new_tokens} exceeds the maximum "
                                     f"{limits.max_new_tokens}")
        generation = body.model_dump(exclude={"documents", "prompt", "stream"}, exclude_none=True)
        try:  # the client's mistakes are 422 here; a ValueError from the model work later is the server's (500)
            sampling = {k: v for k, v in generation.items() if k != "temperature"}  # as ``ask`` passes them
            GenerationConfig(do_sample=body.temperature > 0, temperature=body.temperature or 1.0, **sampling).validate()
            await asyncio.to_thread(stored_documents, store, body.documents)  # 404 / 409 now, not after the queue
        except ValueError as error:  # (the store's 404 / 409 are no ValueErrors: their own handlers answer them)
            raise HTTPException(422, str(error)) from None
        if not mem_model.tokenizer(body.prompt, add_special_tokens=False)["input_ids"]:
            raise HTTPException(422, "the prompt has no tokens")
        run = partial(worker.run, ask, mem_model, store, body.documents, body.prompt, **generation)
        if not body.stream:
            return _answer_json(await run())
        return StreamingResponse(_events(run, mem_model.tokenizer), media_type="text/event-stream")

    @app.get("/healthz", summary="Liveness: the service and its store are up", operation_id="healthz")
    async def healthz() -> dict:
        return {"status": "ok", "version": __version__, "documents": len(await asyncio.to_thread(store.documents))}

    app.include_router(v1)
    for error_type, status in ((DocumentNotFound, 404), (DocumentConflict, 409), (FingerprintMismatch, 409),
                               (InvalidText, 400), (DocumentTooLarge, 413)):
        app.add_exception_handler(error_type, partial(_error_response, status))
    app.add_exception_handler(StarletteHTTPException, partial(_http_error, app))
    app.add_exception_handler(Exception, _server_error)
    return app


async def _http_error(app: FastAPI, request: Request, error: StarletteHTTPException):
    """FastAPI's answer, except that a 405 lists in ``Allow`` the methods of every route of the path (Starlette names
    only those of the first route that matched it, and each method here is a route of its own)."""
    if error.status_code != 405:
        return await http_exception_handler(request, error)
    methods = set()
    for route in app.routes:
        if isinstance(route, APIRoute) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return JSONResponse({"detail": error.detail}, status_code=405, headers={"Allow": ", ".join(sorted(methods))})


def _error_response(status: int, request: Request, error: Exception) -> JSONResponse:
    body = {"detail": str(error)}
    if isinstance(error, InvalidText):
        body["offset"] = error.offset
    return JSONResponse(body, status_code=status)


def _server_error(request: Request, error: Exception) -> JSONResponse:
    """Anything else is the server's fault: logged with its traceback, answered without internals."""
    logger.error("%s %s failed", request.method, request.url.path, exc_info=error)
    return JSONResponse({"detail": "internal server error (the server's log has the details)"}, status_code=500)


def _require_type(request: Request, media_type: str, charset: str | None = None, optional: bool = False) -> None:
    """415 unless the request's Content-Type is ``media_type`` (with ``charset`` if it names one)."""
    header = request.headers.get("content-type")
    if header is None and optional:
        return
    kind, *params = (part.strip().lower() for part in (header or "").split(";"))
    charsets = [p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")]
    if kind != media_type or (charset and charsets and charsets[0] != charset):
        expected = f"{media_type}; charset={charset}" if charset else media_type
        raise HTTPException(415, f"expected Content-Type {expected}, got {header!r}")


def _answer_json(answer) -> dict:
    return {"text": answer.text, "tokens": answer.tokens, "retrieved": answer.retrieved}


class _Cancelled(Exception):
    """Raised on the worker thread, inside generation, once the client of a streamed answer has gone."""


async def _events(run, tokenizer):
    """Server-sent events: ``data: {"text": piece}`` as tokens come, then ``event: done`` with the whole answer
    (or ``event: error``). A client that disconnects stops the generation at its next token."""
    loop, queue, gone = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
    ids, sent = [], ""

    def on_token(token) -> None:  # runs on the worker thread
        nonlocal sent
        if gone.is_set():
            raise _Cancelled
        ids.append(int(token[0]))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if len(text) > len(sent) and not text.endswith("\ufffd"):  # a character split across tokens waits
            loop.call_soon_threadsafe(queue.put_nowait, ("data", {"text": text[len(sent):]}))
            sent = text

    async def answer() -> None:
        try:
            queue.put_nowait(("done", _answer_json(await run(streamer=on_token))))
        except _Cancelled:
            pass
        except (DocumentNotFound, DocumentConflict) as error:  # e.g. deleted while it waited in the queue
            queue.put_nowait(("error", {"detail": str(error)}))
        except Exception:  # reported to the client as an event: the status line has gone out
            logger.exception("streamed query failed")
            queue.put_nowait(("error", {"detail": "internal server error (the server's log has the details)"}))

    task = asyncio.create_task(answer())
    try:
        while True:
            kind, payload = await queue.get()
            prefix = "" if kind == "data" else f"event: {kind}\n"
            yield f"{prefix}data: {json.dumps(payload)}\n\n"
            if kind != "data":
                return
    finally:  # the answer ended, or the client went away (the response task is cancelled)
        gone.set()
        await asyncio.shield(task)
