"""A Python client of the memlm service (``memlm serve``), over httpx; and ``LocalServer``, which runs one.

``Client.ingest`` streams a file in chunks and, when the connection or the server fails, asks the
server for the committed offset and resumes there (a path can be re-read from any offset; an
iterable of chunks cannot, so it is sent once).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
from tqdm.auto import tqdm


class ServiceError(Exception):
    """The service answered with an error status; ``status`` and ``detail`` say which and why."""

    def __init__(self, status: int, detail) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class Client:
    """A client of one memlm service.

    Args:
        url: the service's base URL.
        token: the bearer token (default: ``MEMLM_API_TOKEN`` from the environment, if set).
        timeout: seconds to wait for a response (answers queue behind other model work).
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 600.0) -> None:
        token = token if token is not None else os.environ.get("MEMLM_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ----------------------------------------------------------------------------- documents

    def ingest(self, doc_id: str, source: str | os.PathLike | Iterable[bytes], *, resume: bool = True,
               replace: bool = False, progress: bool = True, chunk_size: int = 1 << 16, retries: int = 5,
               retry_wait: float = 2.0) -> dict:
        """Upload a document: a path (read in ``chunk_size`` pieces) or an iterable of byte chunks.

        ``resume``: a partly ingested document continues at its committed offset, and a failed upload
        (connection lost, server restarted) is retried up to ``retries`` times from the new committed
        offset, ``retry_wait`` seconds apart. Returns the document's status.
        """
        is_path = isinstance(source, (str, os.PathLike))
        size = Path(source).stat().st_size if is_path else None
        bar = tqdm(total=size, unit="B", unit_scale=True, disable=not progress, desc=f"memlm ingest {doc_id}")
        attempt = 0
        try:
            while True:
                offset = self._resume_offset(doc_id) if resume and not replace else 0
                bar.n = offset
                bar.refresh()
                chunks = _read_file(source, offset, chunk_size) if is_path else source
                params = {"offset": offset, **({"replace": "true"} if replace else {})}
                headers = {"Content-Type": "text/plain; charset=utf-8"}
                try:
                    return self._send("PUT", f"/v1/documents/{doc_id}", params=params, headers=headers,
                                      content=_counted(chunks, bar))
                except (httpx.TransportError, ServiceError) as error:
                    retryable = isinstance(error, httpx.TransportError) or error.status >= 500
                    attempt += 1
                    if not (resume and is_path and retryable) or attempt > retries:
                        raise
                    self._wait_until_up(retry_wait, retries)  # a replacement starts over; a new upload resumes
        finally:
            bar.close()

    def status(self, doc_id: str) -> dict:
        return self._send("GET", f"/v1/documents/{doc_id}")

    def list(self) -> list[dict]:
        return self._send("GET", "/v1/documents")["documents"]

    def delete(self, doc_id: str) -> dict:
        return self._send("DELETE", f"/v1/documents/{doc_id}")

    def health(self) -> dict:
        return self._send("GET", "/healthz")

    # ----------------------------------------------------------------------------- questions

    def query(self, documents: list[str] | str, prompt: str, max_new_tokens: int = 64,
              temperature: float = 0.0, **generation) -> dict:
        """``{"text", "tokens", "retrieved": [{"document", "token_offset", "score"}, ...]}``; ``generation``: the
        query's other fields (``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``stop_strings``, ...)."""
        body = _query(documents, prompt, max_new_tokens, temperature, False, generation)
        return self._send("POST", "/v1/query", json=body)

    def stream_query(self, documents: list[str] | str, prompt: str, max_new_tokens: int = 64,
                     temperature: float = 0.0, **generation) -> Iterator[str]:
        """The answer's text pieces as the server generates them."""
        body = _query(documents, prompt, max_new_tokens, temperature, True, generation)
        with self._http.stream("POST", "/v1/query", json=body) as response:
            if response.status_code >= 400:
                response.read()
                raise ServiceError(response.status_code, _detail(response))
            event = "message"
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line.partition(":")[2].strip()
                elif line.startswith("data:"):
                    payload = json.loads(line.partition(":")[2])
                    if event == "error":
                        raise ServiceError(500, payload["detail"])
                    if event == "done":
                        return
                    yield payload["text"]

    # ------------------------------------------------------------------------------ internals

    def _send(self, method: str, path: str, **kwargs) -> dict:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise ServiceError(response.status_code, _detail(response))
        return response.json()

    def _resume_offset(self, doc_id: str) -> int:
        try:
            status = self.status(doc_id)
        except ServiceError as error:
            if error.status == 404:
                return 0
            raise
        return 0 if status["status"] == "complete" else status["bytes"]

    def _wait_until_up(self, wait: float, tries: int) -> None:
        for _ in range(tries * 5):
            time.sleep(wait)
            try:
                self.health()
                return
            except httpx.TransportError:
                continue


def _read_file(path, offset: int, chunk_size: int) -> Iterator[bytes]:
    with open(path, "rb") as file:
        file.seek(offset)
        while data := file.read(chunk_size):
            yield data


def _counted(chunks: Iterable[bytes], bar) -> Iterator[bytes]:
    for chunk in chunks:
        yield chunk
        bar.update(len(chunk))


def _query(documents, prompt, max_new_tokens, temperature, stream, generation) -> dict:
    documents = [documents] if isinstance(documents, str) else list(documents)
    return {"documents": documents, "prompt": prompt, "max_new_tokens": max_new_tokens,
            "temperature": temperature, "stream": stream, **generation}


def _detail(response: httpx.Response):
    try:
        return response.json().get("detail", response.text)
    except ValueError:
        return response.text


class LocalServer:
    """``memlm serve --store STORE ARGS...`` in a subprocess on 127.0.0.1 (tests, benchmarks, notebooks).

    Starts at once and waits until ``/healthz`` answers; ``stop()`` (or leaving the ``with`` block) ends it,
    ``kill()`` sends SIGKILL. Its output goes to ``log`` (a path; default: discarded).
    """

    def __init__(self, store: str | os.PathLike, *args: str, port: int | None = None, log=None,
                 env: dict | None = None, timeout: float = 120.0) -> None:
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = Path(log) if log else None
        command = [sys.executable, "-m", "memlm.cli", "serve", "--store", str(store), "--port", str(port), *args]
        output = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
        try:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                            env={**os.environ, **(env or {})})
        finally:
            if self.log:
                output.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"memlm serve exited with {self.process.returncode}{self._tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"memlm serve did not answer within {timeout:.0f} s{self._tail()}")

    def kill(self) -> None:
        """SIGKILL: the process dies at once, as in a crash."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _tail(self) -> str:
        return f":\n{self.log.read_text()[-4000:]}" if self.log and self.log.is_file() else ""
