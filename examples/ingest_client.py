"""Stream a large text file into the memlm service, survive a server restart half-way, then ask a question.

    python examples/ingest_client.py BOOK [--store DIR | --url URL] [--doc-id ID] [--max-bytes N]

Without ``--url`` the script runs the service itself (``memlm serve --store DIR`` on 127.0.0.1), kills it
with SIGKILL once half of the file is committed, and starts it again on the same port: the client notices
the lost connection, asks for the committed offset and resumes there. With ``--url`` it talks to a
service you run; restart that one yourself while the upload runs.

memlm-tiny (the default model) was trained to find pass keys, so the script hides one in the text
(``--key``; 0 hides none) a quarter of the way in and asks for it at the end.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from memlm.serve.client import Client, LocalServer, ServiceError

QUESTION = " What is the pass key? The pass key is"


def prepare(book: Path, max_bytes: int | None, key: int, directory: Path) -> Path:
    """The text to upload: the book (cut at ``max_bytes``) with the pass key sentence a quarter of the way in."""
    text = book.read_text(encoding="utf-8")
    if max_bytes:
        text = text.encode()[:max_bytes].decode(errors="ignore")
    if key:
        at = text.find(" ", len(text) // 4)
        text = f"{text[:at]} The pass key is {key}. Remember it. {key} is the pass key.{text[at:]}"
    path = directory / "upload.txt"
    path.write_text(text, encoding="utf-8")
    return path


def committed(client: Client, doc_id: str) -> int:
    try:
        return client.status(doc_id)["bytes"]
    except ServiceError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("book", type=Path, help="a UTF-8 text file")
    parser.add_argument("--url", help="a running service (default: start one here)")
    parser.add_argument("--store", type=Path, help="the store of the service started here (default: a temp dir)")
    parser.add_argument("--doc-id", default="book")
    parser.add_argument("--max-bytes", type=int, help="upload only the file's first N bytes")
    parser.add_argument("--key", type=int, default=417, help="the pass key to hide (0: none)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="memlm_example_"))
    upload = prepare(args.book, args.max_bytes, args.key, work)
    size = upload.stat().st_size

    server = None if args.url else LocalServer(args.store or work / "store", log=work / "server.log")
    url = args.url or server.url
    client = Client(url)
    print(f"uploading {size:,} bytes to {url} as {args.doc_id!r}")
    result = {}
    uploader = threading.Thread(target=lambda: result.update(
        client.ingest(args.doc_id, upload, progress=False, retries=20, retry_wait=1.0)))
    start = time.perf_counter()
    uploader.start()
    if server is not None:
        with Client(url) as watcher:
            while committed(watcher, args.doc_id) < size // 2 and uploader.is_alive():
                time.sleep(0.2)
            print(f"killing the server (SIGKILL) at {committed(watcher, args.doc_id):,} committed bytes")
        port = int(url.rsplit(":", 1)[1])
        server.kill()
        server = LocalServer(args.store or work / "store", port=port, log=work / "server.log")
        print("server restarted; the client resumes at the committed offset")
    uploader.join()
    seconds = time.perf_counter() - start
    print(f"{result['id']}: {result['status']}, {result['tokens']:,} tokens in {seconds:.0f} s "
          f"({result['tokens'] / seconds:,.0f} tokens/s, restart included)")

    answer = client.query(args.doc_id, QUESTION, max_new_tokens=2)
    print(f"question: {QUESTION.strip()}\nanswer:   {answer['text'].strip()}"
          + (f" ({'right' if answer['text'].strip() == str(args.key) else 'wrong'})" if args.key else ""))
    for found in answer["retrieved"][:3]:
        print(f"  retrieved token {found['token_offset']:,} of {found['document']} (score {found['score']:.1f})")
    client.close()
    if server is not None:
        server.stop()


if __name__ == "__main__":
    main()
