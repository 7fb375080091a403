"""The HTTP service for real: ``memlm serve`` (uvicorn) in a subprocess on 127.0.0.1, httpx and memlm.client.

The server runs the embedded model (memlm-tiny) with float16 memory, as ``memlm serve`` does by default.
"""

import contextlib
import subprocess
import sys
import threading
import time

import httpx
import pytest
import transformers

from memlm.cli import load_store_model, main
from memlm.serve.client import Client, LocalServer, ServiceError
from memlm.store import MemoryStore
from memlm.store.documents import ingest_file
from memlm.tiny import DEFAULT_DIR

from conftest import free_threads, make_text, stored

pytestmark = pytest.mark.slow
BOOK = (make_text(250, seed=11) + " The pass key is 417. Remember it. 417 is the pass key. 日本 ✓ "
        + make_text(250, seed=12))


@pytest.fixture
def serve(tmp_path):
    """Starts ``memlm serve`` (no token unless ``env`` sets one; its log beside the test's files); every server a
    test starts is stopped when the test ends, passed or failed."""
    started = []

    def start(store, *args, env=None) -> LocalServer:
        started.append(LocalServer(store, *args, "--threads", str(free_threads()), log=tmp_path / "server.log",
                                   env={"MEMLM_API_TOKEN": "", **(env or {})}))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def committed_tokens(client, doc_id) -> int:
    try:
        return client.status(doc_id)["tokens"]
    except ServiceError as error:
        assert error.status == 404
        return 0


@pytest.fixture(scope="module")
def tokenizer_tiny():
    return transformers.AutoTokenizer.from_pretrained(DEFAULT_DIR)


def test_ingest_and_query_over_http(tmp_path, serve, tokenizer_tiny):
    path = tmp_path / "book.txt"
    path.write_text(BOOK, encoding="utf-8")
    server = serve(tmp_path / "store")
    try:
        with Client(server.url) as client:
            document = client.ingest("book", path, progress=False, chunk_size=1000)
            expected = tokenizer_tiny(BOOK, add_special_tokens=False)["input_ids"]
            assert document["status"] == "complete" and document["tokens"] == len(expected) > 10 * 64
            assert document["bytes"] == len(BOOK.encode()) and [d["id"] for d in client.list()] == ["book"]
            answer = client.query("book", " What is the pass key? The pass key is", max_new_tokens=2)
            assert answer["text"].strip() == "417" and answer["tokens"] == 2
            assert answer["retrieved"] and all(
                r["document"] == "book" and 0 <= r["token_offset"] < len(expected) for r in answer["retrieved"])
            key = tokenizer_tiny(" 417", add_special_tokens=False)["input_ids"][-1]
            mentions = {i for i, token in enumerate(expected) if token == key}  # "The pass key is 417. ... 417 is"
            assert len(mentions) == 2 and {r["token_offset"] for r in answer["retrieved"][:2]} == mentions
            pieces = list(client.stream_query(["book"], " What is the pass key? The pass key is", max_new_tokens=2))
            assert "".join(pieces) == answer["text"]
            sampled = client.query("book", " What is the pass key? The pass key is", max_new_tokens=6,
                                   temperature=0.7, top_k=5, repetition_penalty=1.1, stop_strings=["7"])
            # transformers stops on the token that completes "7", which may run past it (" 706"): "7" is in the text
            assert "7" in sampled["text"] or sampled["tokens"] == 6
            again = client.ingest("book", path, progress=False)  # the same content: a no-op
            assert again["updated"] == document["updated"]
            assert client.delete("book")["id"] == "book" and client.list() == []
        schema = httpx.get(f"{server.url}/openapi.json").json()
        assert {"/v1/documents/{doc_id}", "/v1/query", "/healthz"} <= set(schema["paths"])
    finally:
        server.stop()
    with MemoryStore(tmp_path / "store") as store:
        assert store.documents() == [] and store.check() == []


def book_and_reference(tmp_path):
    """BOOK as a file, its bytes, and what one uninterrupted in-process ingestion stores for it."""
    path = tmp_path / "book.txt"
    path.write_text(BOOK, encoding="utf-8")
    with MemoryStore(tmp_path / "reference") as reference:
        ingest_file(reference, load_store_model(None), "book", path)
        return path, path.read_bytes(), stored(reference, "book")


def test_kill_9_mid_upload_then_resume_stores_what_an_uninterrupted_upload_does(tmp_path, serve):
    path, data, expected = book_and_reference(tmp_path)
    for point, fraction in enumerate((0.3, 0.8)):  # early and late; each point costs two server starts
        store = tmp_path / f"store{point}"
        server = serve(store)
        release = threading.Event()

        limit = int(fraction * len(data))

        def body(limit=limit, release=release):
            for start in range(0, limit, 2048):
                yield data[start : min(start + 2048, limit)]
            release.wait(60)

        def upload(url=server.url, body=body):
            with contextlib.suppress(httpx.TransportError):  # the server is killed under it
                httpx.put(f"{url}/v1/documents/book", content=body(), timeout=60)

        thread = threading.Thread(target=upload)
        thread.start()
        with Client(server.url) as client:
            deadline = time.monotonic() + 60
            while committed_tokens(client, "book") < 64 * (1 + 3 * point) and time.monotonic() < deadline:
                time.sleep(0.05)
        server.kill()  # while segments are being ingested and committed
        release.set()
        thread.join(60)
        with MemoryStore(store) as crashed:
            committed = crashed.document("book")
            assert committed.status == "ingesting" and committed.tokens > 0 and crashed.check() == []
        server = serve(store)
        try:
            with Client(server.url) as client:
                assert client.ingest("book", path, progress=False)["status"] == "complete"
        finally:
            server.stop()
        with MemoryStore(store) as resumed:
            assert stored(resumed, "book") == expected and resumed.check() == []


def test_every_error_has_its_status_and_says_what_was_wrong(tmp_path, serve):
    limits = ("--max-document-bytes", "5000", "--max-prompt-chars", "100", "--max-new-tokens", "16")
    server = serve(tmp_path / "store", *limits, env={"MEMLM_API_TOKEN": "s3cret"})
    statuses = []
    try:
        http = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer s3cret"}, timeout=60)
        text = {"Content-Type": "text/plain; charset=utf-8"}

        def expect(status, response, says):
            statuses.append(response.status_code)
            assert response.status_code == status, response.text
            detail = response.json()["detail"]
            assert says in (detail if isinstance(detail, str) else str(detail)), detail
            return response.json()

        assert http.put("/v1/documents/small", content=b"A small document.", headers=text).status_code == 200
        expect(401, httpx.get(f"{server.url}/v1/documents"), "Authorization: Bearer")
        expect(401, httpx.get(f"{server.url}/v1/documents", headers={"Authorization": "Bearer wrong"}), "wrong token")
        expect(413, http.put("/v1/documents/big", content=b"x " * 3000, headers=text), "the maximum is 5,000")

        def chunks():  # chunked: no Content-Length, the limit trips while streaming
            for _ in range(10):
                yield b"word " * 200

        expect(413, http.put("/v1/documents/big", content=chunks(), headers=text), "exceeds the maximum of 5,000")
        expect(404, http.get("/v1/documents/big"), "no document 'big'")  # nothing left behind
        body = expect(400, http.put("/v1/documents/bad", content=b"fine text \xc3\x28", headers=text), "at byte 10")
        assert body["offset"] == 10
        expect(415, http.put("/v1/documents/x", content=b"{}", headers={"Content-Type": "application/json"}),
               "expected Content-Type text/plain")
        expect(415, http.post("/v1/query", content=b"hi", headers=text), "expected Content-Type application/json")
        expect(422, http.post("/v1/query", content=b"{nope", headers={"Content-Type": "application/json"}),
               "not valid JSON")
        expect(422, http.post("/v1/query", json={"prompt": "hi"}), "documents")
        expect(422, http.post("/v1/query", json={"documents": ["small"], "prompt": "x" * 101}), "maximum is 100")
        expect(422, http.post("/v1/query", json={"documents": ["small"], "prompt": "hi", "max_new_tokens": 17}),
               "exceeds the maximum 16")
        expect(422, http.post("/v1/query", json={"documents": ["small"], "prompt": "hi", "temperature": -1}),
               "temperature")
        for field, value in (("top_p", 1.5), ("top_k", -1), ("repetition_penalty", 0), ("stop_strings", [""]),
                             ("stop_strings", []), ("top_q", 0.5)):
            expect(422, http.post("/v1/query", json={"documents": ["small"], "prompt": "hi", field: value}), field)
        expect(422, http.post("/v1/query", json={"documents": ["a b"], "prompt": "hi"}), "should match pattern")
        expect(422, http.get("/v1/documents/" + "x" * 129), "pattern")
        expect(422, http.put("/v1/documents/small?offset=-1", content=b"x", headers=text), "offset")
        expect(404, http.post("/v1/query", json={"documents": ["nope"], "prompt": "hi"}), "no document 'nope'")
        expect(404, http.delete("/v1/documents/nope"), "no document 'nope'")
        expect(409, http.put("/v1/documents/small", content=b"Other text.", headers=text), "replace=true")
        expect(409, http.put("/v1/documents/small?offset=5", content=b"x", headers=text), "is complete")
        expect(409, http.put("/v1/documents/fresh?offset=5", content=b"x", headers=text), "does not exist")
        replaced = http.put("/v1/documents/small?replace=true", content=b"Other text.", headers=text)
        assert replaced.status_code == 200 and replaced.json()["bytes"] == 11

        release = threading.Event()

        def slow():
            yield b"The first words of a slow upload "
            release.wait(60)
            yield b"and its end."

        upload = threading.Thread(target=lambda: http.put("/v1/documents/slow", content=slow(), headers=text))
        upload.start()
        deadline = time.monotonic() + 30
        while http.get("/v1/documents/slow").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        expect(409, http.put("/v1/documents/slow", content=b"again", headers=text), "being ingested by another")
        expect(409, http.delete("/v1/documents/slow"), "being ingested")
        expect(409, http.post("/v1/query", json={"documents": ["slow"], "prompt": "hi"}), "not complete")
        expect(409, http.put("/v1/documents/bad?offset=3", content=b"x", headers=text), "resume with offset 0")
        release.set()
        upload.join(60)
        assert http.get("/v1/documents/slow").json()["status"] == "complete"
        assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"  # no token needed
    finally:
        server.stop()
    assert 500 not in statuses
    assert "Traceback" not in server.log.read_text()


def test_concurrent_uploads_and_queries_all_complete(tmp_path, serve, tokenizer_tiny):
    texts = {f"doc{i}": make_text(90, seed=20 + i) for i in range(4)}
    for doc_id, text in texts.items():
        (tmp_path / f"{doc_id}.txt").write_text(text)
    server = serve(tmp_path / "store")
    results, errors = {}, []
    try:
        with Client(server.url) as client:
            client.ingest("base", [BOOK.encode()], progress=False)

        def ingest(doc_id):
            with Client(server.url) as client:
                results[doc_id] = client.ingest(doc_id, tmp_path / f"{doc_id}.txt", progress=False, chunk_size=512)

        def ask(n):
            with Client(server.url) as client:
                for i in range(3):
                    results[f"query{n}.{i}"] = client.query("base", " What is the pass key? The pass key is",
                                                            max_new_tokens=2)

        def guarded(target, *args):
            try:
                target(*args)
            except Exception as error:
                errors.append(error)

        threads = [threading.Thread(target=guarded, args=(ingest, doc_id)) for doc_id in texts]
        threads += [threading.Thread(target=guarded, args=(ask, n)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
    finally:
        server.stop()
    assert errors == []
    assert all(results[f"query{n}.{i}"]["text"].strip() == "417" for n in range(2) for i in range(3))
    with MemoryStore(tmp_path / "store") as store:
        assert store.check() == []
        for doc_id, text in texts.items():
            assert results[doc_id]["status"] == "complete"
            assert store.tokens(doc_id).tolist() == tokenizer_tiny(text, add_special_tokens=False)["input_ids"]


def test_client_reports_errors_and_the_server_refuses_public_addresses_without_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv("MEMLM_API_TOKEN", raising=False)
    with pytest.raises(SystemExit, match=r"refusing to listen on 0\.0\.0\.0 without a token"):
        main(["serve", "--store", str(tmp_path / "store"), "--host", "0.0.0.0"])
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(SystemExit, match="is empty"):
        main(["serve", "--store", str(tmp_path / "store"), "--token-file", str(empty)])
    with Client("http://127.0.0.1:9") as client, pytest.raises(httpx.TransportError):
        client.list()
    assert issubclass(ServiceError, Exception) and ServiceError(404, "gone").status == 404


def test_an_upload_and_memlm_ingest_of_one_document_never_interleave(tmp_path, serve):
    """The server ingests part of a document; `memlm ingest` (another process) resumes and finishes it; the
    server's upload then gets a 409, and the store holds exactly one ingestion."""
    path, data, expected = book_and_reference(tmp_path)
    server = serve(tmp_path / "store")
    release, response = threading.Event(), {}

    def body():
        half = len(data) // 2
        for start in range(0, half, 2048):
            yield data[start : min(start + 2048, half)]
        release.wait(120)
        yield data[half:]  # the rest in one piece: the request ends, so its answer is read whole

    def upload():
        response["put"] = httpx.put(f"{server.url}/v1/documents/book", content=body(), timeout=120)

    thread = threading.Thread(target=upload)
    thread.start()
    with Client(server.url) as client:
        deadline = time.monotonic() + 60
        while committed_tokens(client, "book") < 4 * 64 and time.monotonic() < deadline:
            time.sleep(0.05)
        # and until the server has ingested what it received: it then waits for the rest of the upload
        seen = -1
        while seen != (seen := committed_tokens(client, "book")) and time.monotonic() < deadline:
            time.sleep(1.0)
    cli = subprocess.run([sys.executable, "-m", "memlm.cli", "ingest", str(path), "--store", str(tmp_path / "store"),
                          "--doc-id", "book"], capture_output=True, text=True, timeout=300)
    release.set()
    thread.join(120)
    server.stop()
    assert cli.returncode == 0 and "book: complete" in cli.stdout, cli.stderr[-2000:]
    assert response["put"].status_code == 409, response["put"].text
    assert "changed under this writer" in response["put"].json()["detail"]
    with MemoryStore(tmp_path / "store") as store:
        assert store.check() == [] and stored(store, "book") == expected


def test_healthz_answers_while_the_store_map_grows(tmp_path, serve):
    server = serve(tmp_path / "store", "--map-size", str(64 * 1024))
    statuses, done = [], threading.Event()

    def upload():
        try:
            with Client(server.url) as client:
                client.ingest("book", [BOOK.encode()[i : i + 4096] for i in range(0, len(BOOK.encode()), 4096)],
                              progress=False)
        finally:
            done.set()

    thread = threading.Thread(target=upload)
    thread.start()
    while not done.is_set():
        statuses.append(httpx.get(f"{server.url}/healthz", timeout=30).status_code)
    thread.join(60)
    server.stop()
    assert len(statuses) > 5 and set(statuses) == {200}
    with MemoryStore(tmp_path / "store") as store:
        assert store.document("book").status == "complete" and store._env.info()["map_size"] > 64 * 1024
    assert "Traceback" not in server.log.read_text()


def test_a_delete_during_queries_is_never_a_server_error(tmp_path, serve):
    server = serve(tmp_path / "store")
    statuses = []
    try:
        for round_ in range(2):
            with Client(server.url) as client:
                client.ingest("book", [BOOK.encode()], progress=False)
            http = httpx.Client(base_url=server.url, timeout=120)

            def ask(http=http, stream=round_ == 1):
                for _ in range(3):
                    body = {"documents": ["book"], "prompt": " What is the pass key?", "max_new_tokens": 24,
                            "stream": stream}
                    statuses.append(("query", http.post("/v1/query", json=body).status_code))

            askers = [threading.Thread(target=ask) for _ in range(2)]
            for thread in askers:
                thread.start()
            time.sleep(0.3)
            statuses.append(("delete", http.delete("/v1/documents/book").status_code))
            for thread in askers:
                thread.join(120)
    finally:
        server.stop()
    assert {status for kind, status in statuses if kind == "query"} <= {200, 404, 409}, statuses
    assert [status for kind, status in statuses if kind == "delete"] == [200, 200]
    assert "Traceback" not in server.log.read_text()


def test_a_client_leaving_a_streamed_answer_frees_the_worker(tmp_path, serve):
    server = serve(tmp_path / "store")
    try:
        with Client(server.url) as client:
            client.ingest("book", [BOOK.encode()], progress=False)
            alone = 0.0
            for _ in range(2):  # a short query on an idle worker (the slower of two)
                start = time.perf_counter()
                client.query("book", " What is the pass key?", max_new_tokens=1)
                alone = max(alone, time.perf_counter() - start)
            start = time.perf_counter()
            long = list(client.stream_query("book", " The", max_new_tokens=400))
            whole = time.perf_counter() - start  # what a stream that is not cancelled costs the worker
            assert len(long) > 100
            body = {"documents": ["book"], "prompt": " The", "max_new_tokens": 1000, "stream": True}
            with httpx.stream("POST", f"{server.url}/v1/query", json=body, timeout=60) as response:
                next(line for line in response.iter_lines() if line.startswith("data:"))  # the first piece, then go
            start = time.perf_counter()
            client.query("book", " What is the pass key?", max_new_tokens=1)
            after = time.perf_counter() - start
    finally:
        server.stop()
    uncancelled = whole * 1000 / 400  # what the left stream would have held the worker for
    assert uncancelled > alone + 2.0, (whole, alone)  # so the test can tell a cancelled stream from one that ran on
    assert after < alone + 1.0, (after, alone)


def test_a_server_fault_is_a_500_with_a_generic_message_and_a_logged_traceback(tmp_path, caplog):
    from fastapi.testclient import TestClient

    from memlm.serve.app import create_app

    with MemoryStore(tmp_path / "store") as store:
        app = create_app(store, load_store_model(None))

        def broken():
            raise RuntimeError("secret internals")

        store.documents = broken
        with TestClient(app, raise_server_exceptions=False) as http, caplog.at_level("ERROR"):
            response = http.get("/v1/documents")
            assert http.get("/v1/documents/missing").status_code == 404  # client errors keep their status
            assert http.post("/v1/query", json={"documents": ["a b"], "prompt": "hi"}).status_code == 422
    assert response.status_code == 500 and "secret" not in response.text
    assert response.json()["detail"].startswith("internal server error")
    assert "secret internals" in caplog.text and "Traceback" in caplog.text
