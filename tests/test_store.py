"""MemoryStore and DocumentWriter: what is stored, exact resume, sessions over stored documents, integrity."""

import hashlib

import pytest
import torch
from safetensors import safe_open

from memlm import MemoryConfig, attach
from memlm.cli import main
from memlm.store import DocumentConflict, DocumentNotFound, FingerprintMismatch, MemoryStore
from memlm.store.documents import DocumentTooLarge, DocumentWriter, InvalidText, ask, ingest_file
from memlm.store.store import fingerprint

from conftest import build_tiny_llama, make_text, stored

TEXT = make_text(300, seed=3).replace("river", "river ✓ naïve 日本") + "\n\nThe end."
DATA = TEXT.encode()


def memory_model(tokenizer, **overrides):
    config = dict(segment_length=32, xl_length=32, memory_layers=(0, 1), top_k=8, memory_dtype="float16")
    return attach(build_tiny_llama(), MemoryConfig(**{**config, **overrides}), tokenizer=tokenizer)


def write(store, mem_model, doc_id, data, chunk=97, offset=0, finish=True, **kwargs):
    writer = DocumentWriter(store, mem_model, doc_id, offset=offset, **kwargs)
    try:
        for start in range(0, len(data), chunk):
            writer.write(data[start : start + chunk])
        return writer.finish() if finish else store.document(doc_id)
    finally:
        writer.close()


@pytest.fixture
def store(tmp_path):
    with MemoryStore(tmp_path / "store") as store:
        yield store


def test_ingestion_stores_the_tokenizers_tokens_and_the_sessions_memory(store, tokenizer):
    mem_model = memory_model(tokenizer)
    document = write(store, mem_model, "doc", DATA, chunk=7)  # 7-byte chunks split multi-byte characters
    expected = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert store.tokens("doc").tolist() == expected
    assert document.status == "complete" and document.bytes == len(DATA) and document.tokens == len(expected)
    assert document.sha256 == hashlib.sha256(DATA).hexdigest()
    assert b"".join(s.text for s in store.segments("doc")) == DATA
    assert document.segments == len(expected) // 32 + 1 and store.check() == []  # full segments + the last
    # The stored memory is exactly what a session that reads the whole text puts into its index.
    with mem_model.session() as session:
        session.feed(TEXT)
        for layer in (0, 1):
            keys, values, first = session.state.knn.indexes[layer].entries()
            stored_keys = torch.cat([s.memory[layer][0] for s in store.segments("doc") if s.memory], dim=1)
            stored_values = torch.cat([s.memory[layer][1] for s in store.segments("doc") if s.memory], dim=1)
            assert first == 0 and torch.equal(stored_keys, keys) and torch.equal(stored_values, values)
            assert stored_keys.dtype == torch.float16 and document.entries == keys.shape[1]


@pytest.mark.slow
@pytest.mark.parametrize(("crash_at", "rmt_tokens", "retrieval"), [
    (1, 0, "tokens"), (40, 2, "tokens"), (2500, 0, "tokens"), (9000, 2, "tokens"), (len(DATA) - 5, 0, "tokens"),
    (2500, 0, "blocks"),  # block retrieval selects per forward: the writer's forwards are whole segments either way
])
def test_resumed_ingestion_stores_what_an_uninterrupted_one_does(tmp_path, tokenizer, crash_at, rmt_tokens, retrieval):
    blocks = dict(block_size=16, top_blocks=2, fusion="joint") if retrieval == "blocks" else {}
    mem_model = memory_model(tokenizer, rmt_tokens=rmt_tokens, retrieval=retrieval, **blocks)
    with MemoryStore(tmp_path / "a") as whole, MemoryStore(tmp_path / "b") as resumed:
        write(whole, mem_model, "doc", DATA, chunk=300)
        # A crash: the writer is dropped; what was not committed (buffered text, the open piece) is lost.
        committed = write(resumed, mem_model, "doc", DATA[:crash_at], chunk=61, finish=False)
        assert committed.status == "ingesting" and committed.bytes <= crash_at
        with pytest.raises(DocumentConflict, match=f"committed up to byte {committed.bytes}; resume with offset"):
            DocumentWriter(resumed, mem_model, "doc", offset=committed.bytes + 1)
        write(resumed, mem_model, "doc", DATA[committed.bytes :], chunk=1000, offset=committed.bytes)
        assert stored(resumed, "doc") == stored(whole, "doc")
        assert resumed.check() == []


def test_resume_refuses_text_that_does_not_continue_the_document(store, tokenizer):
    mem_model = memory_model(tokenizer)
    committed = write(store, mem_model, "doc", TEXT[:6000].encode(), finish=False)
    assert committed.skip > 0  # the last segment ended inside a piece
    other = b"Completely different words here " * 50
    with pytest.raises(DocumentConflict, match="does not continue document 'doc'"):
        write(store, mem_model, "doc", other, offset=committed.bytes)
    assert store.document("doc").bytes == committed.bytes  # nothing stored is lost


def test_session_over_a_stored_document_continues_it_exactly(store, tokenizer):
    mem_model = memory_model(tokenizer, rmt_tokens=2)
    write(store, mem_model, "doc", DATA)
    prompt = " Where is the lantern?"
    with mem_model.session() as session:
        session.feed(TEXT)
        expected = session.generate(prompt, max_new_tokens=12)
        expected_logits = session.feed(" and then", return_logits=True).logits
    with mem_model.session(store=store, documents=["doc"]) as session:
        assert session.generate(prompt, max_new_tokens=12) == expected
        # the same tokens, forwarded in other groups (the held tail went with the prompt): sums round differently
        torch.testing.assert_close(session.feed(" and then", return_logits=True).logits, expected_logits,
                                   atol=1e-5, rtol=0)


def test_session_over_several_documents_and_ask(store, tokenizer):
    mem_model = memory_model(tokenizer)
    texts = {"a": make_text(60, seed=1), "b": make_text(80, seed=2)}
    for doc_id, text in texts.items():
        write(store, mem_model, doc_id, text.encode())
    tokens = {doc_id: store.document(doc_id).tokens for doc_id in texts}
    with mem_model.session(store=store, documents=["a", "b"]) as session:
        assert int(session.state.knn.indexes[0].size[0]) == tokens["a"] + tokens["b"]  # every token, tails included
        assert [(s.document, s.first_entry, s.entries) for s in session.sources] == [
            ("a", 0, tokens["a"]), ("b", tokens["a"], tokens["b"])]
        assert session.state.local.cache == {} and session.tokens_seen == tokens["a"] + tokens["b"]
    answer = ask(mem_model, store, ["a", "b"], " The garden", max_new_tokens=5)
    assert answer.tokens == 5 and isinstance(answer.text, str) and answer.retrieved
    for found in answer.retrieved:
        assert found["document"] in texts and 0 <= found["token_offset"] < tokens[found["document"]]
    scores = [found["score"] for found in answer.retrieved]
    assert scores == sorted(scores, reverse=True)


def test_save_document_and_continue_in_a_new_session(store, tokenizer):
    mem_model = memory_model(tokenizer, memory_capacity=256)  # the document overflows memory: FIFO applies
    ids = torch.randint(0, 300, (1, 700), generator=torch.Generator().manual_seed(0))
    with mem_model.session() as session:
        session.feed(ids)
        document = session.save_document(store, "saved")
        expected = session.generate(ids[:, :5], max_new_tokens=8)
    # 60 tokens are local (XL 32 + open segment 28); of the 640 in memory the oldest 384 were evicted
    assert document.status == "complete" and document.tokens == 700 and document.memory_start == 640 - 256
    assert torch.equal(store.tokens("saved"), ids[0])
    with mem_model.session(store=store, documents=["saved"]) as session:
        assert torch.equal(session.generate(ids[:, :5], max_new_tokens=8), expected)
        with pytest.raises(ValueError, match="opened over stored documents"):
            session.save_document(store, "again")
    with mem_model.session() as session, pytest.raises(DocumentConflict, match="already exists"):
        session.feed(ids[:, :40])
        session.save_document(store, "saved")


def test_complete_documents_are_compared_or_replaced(store, tokenizer):
    mem_model = memory_model(tokenizer)
    first = write(store, mem_model, "doc", DATA)
    again = write(store, mem_model, "doc", DATA, chunk=1000)  # the same content: a no-op
    assert again.updated == first.updated and store.document("doc").segments == first.segments
    for different in (DATA[:-1] + b"!", DATA + b" more"):
        with pytest.raises(DocumentConflict, match="stored complete with other content"):
            write(store, mem_model, "doc", different)
    # Replacements that fail or stop half-way leave the stored document as it was.
    with pytest.raises(InvalidText, match="of document 'doc'"):
        write(store, mem_model, "doc", b"New words \xff", replace=True)
    with pytest.raises(DocumentTooLarge, match="document 'doc' exceeds"):
        write(store, mem_model, "doc", DATA, replace=True, max_bytes=5000)
    write(store, mem_model, "doc", DATA[:6000], replace=True, finish=False)  # a crash mid-replacement
    assert [d.id for d in store.documents()] == ["doc"] and store.document("doc").sha256 == first.sha256
    assert store.tokens("doc").numel() == first.tokens and store.check() == []
    replaced = write(store, mem_model, "doc", b"A short new text.", replace=True)
    assert replaced.id == "doc" and replaced.key == "doc~1" and replaced.bytes == 17
    assert store.tokens("doc").tolist() == tokenizer("A short new text.")["input_ids"]
    with store._env.begin() as txn:  # the old version's records are gone, and the unfinished replacement's
        assert txn.stat(store._db["segments"])["entries"] == replaced.segments
    assert write(store, mem_model, "doc", b"Third.", replace=True).key == "doc~2"
    assert [d.id for d in store.documents(replacements=True)] == ["doc"] and store.check() == []


@pytest.mark.parametrize(("data", "chunk", "offset"), [
    (b"abc \xff rest", 100, 4),  # an invalid start byte
    ("héllo".encode()[:2] + b"x more", 1, 1),  # a lead byte followed by a non-continuation, split across chunks
    (b"words then a cut " + "日".encode()[:2], 5, 17),  # the text ends inside a character
])
def test_invalid_utf8_names_its_byte_offset_and_keeps_what_was_committed(store, tokenizer, data, chunk, offset):
    mem_model = memory_model(tokenizer)
    prefix = TEXT[:1500].encode()
    committed = write(store, mem_model, "doc", prefix, finish=False)
    with pytest.raises(InvalidText, match=f"invalid UTF-8 at byte {len(prefix) + offset} of document 'doc'") as e:
        write(store, mem_model, "doc", prefix[committed.bytes :] + data, chunk=chunk, offset=committed.bytes)
    assert e.value.offset == len(prefix) + offset
    document = store.document("doc")
    assert document.status == "failed" and "invalid UTF-8" in document.error and document.bytes >= committed.bytes
    fixed = (prefix + data)[: len(prefix) + offset] + b" and fine."  # the text with the bad bytes corrected
    resumed = write(store, mem_model, "doc", fixed[document.bytes :], offset=document.bytes)
    assert resumed.status == "complete" and resumed.error is None and b"".join(
        s.text for s in store.segments("doc")) == fixed


def test_writer_errors_are_clear_and_keep_the_store(store, tokenizer):
    mem_model = memory_model(tokenizer)
    with pytest.raises(ValueError, match=r"document id must match \[A-Za-z0-9._-\]\{1,128\}, got 'a/b'"):
        DocumentWriter(store, mem_model, "a/b")
    with pytest.raises(DocumentConflict, match="does not exist: an upload starts at offset 0, got 10"):
        DocumentWriter(store, mem_model, "new", offset=10)
    with pytest.raises(DocumentTooLarge, match="exceeds the maximum of 1,000 bytes"):
        write(store, mem_model, "big", DATA, max_bytes=1000)
    assert "big" not in store  # a rejected document leaves nothing behind
    with pytest.raises(DocumentNotFound, match="no document 'nope'"):
        store.document("nope")
    write(store, mem_model, "partial", TEXT[:500].encode(), finish=False)
    with pytest.raises(DocumentConflict, match="'partial' is ingesting, not complete"):
        ask(mem_model, store, ["partial"], "question")
    with pytest.raises(ValueError, match="documents lists a document twice"):
        mem_model.session(store=store, documents=["partial", "partial"])


def test_fingerprint_of_another_model_config_or_tokenizer_is_refused(store, tokenizer):
    write(store, memory_model(tokenizer), "doc", TEXT[:300].encode())
    for other in (memory_model(tokenizer, top_k=4), memory_model(tokenizer, memory_dtype="bfloat16")):
        with pytest.raises(FingerprintMismatch, match="holds memories made with another memlm"):
            DocumentWriter(store, other, "doc2")
    model = build_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.01)  # another checkpoint of the same architecture
    with pytest.raises(FingerprintMismatch, match="another model"):
        attach(model, memory_model(tokenizer).config, tokenizer=tokenizer).session(store=store, documents=["doc"])


def records(store, doc_id):
    """A document's stored segments as comparable values: ids, text, memory keys and values."""
    return [(s.ids.tolist(), s.text, {layer: (k.tolist(), v.tolist()) for layer, (k, v) in s.memory.items()})
            for s in store.segments(doc_id)]


def test_two_writers_of_one_document_never_interleave(tmp_path, store, tokenizer):
    mem_model = memory_model(tokenizer)
    first = DocumentWriter(store, mem_model, "doc")
    second = DocumentWriter(store, mem_model, "doc")  # the same empty document: it too would start at byte 0
    try:
        first.write(DATA)
        with pytest.raises(DocumentConflict, match=r"changed under this writer .* nothing was written"):
            second.write(DATA)
            second.finish()
        first.finish()
    finally:
        first.close()
        second.close()
    with MemoryStore(tmp_path / "alone") as alone:
        write(alone, mem_model, "doc", DATA, chunk=len(DATA))  # the same bytes in the same writes
        assert store.check() == [] and records(store, "doc") == records(alone, "doc")
    late = DocumentWriter(store, mem_model, "gone")
    try:
        store.delete("gone")
        with pytest.raises(DocumentConflict, match="found no such document"):
            late.write(DATA)  # a writer whose document was deleted under it stores nothing
            late.finish()
    finally:
        late.close()
    assert "gone" not in store


def test_segments_come_from_one_snapshot(store, tokenizer):
    write(store, memory_model(tokenizer), "doc", DATA)
    expected = records(store, "doc")
    segments = store.segments("doc")
    first = next(segments)
    store.delete("doc")  # a delete while a reader iterates (LMDB: the reader keeps its snapshot)
    rest = list(segments)
    assert [first.ids.tolist()] + [s.ids.tolist() for s in rest] == [r[0] for r in expected]
    with pytest.raises(DocumentNotFound):
        next(store.segments("doc"))


def test_reads_inside_a_snapshot_see_one_state_of_the_store(store, tokenizer):
    import threading

    mem_model = memory_model(tokenizer)
    write(store, mem_model, "doc", TEXT[:600].encode())
    with store.snapshot():
        before = store.document("doc")
        deleter = threading.Thread(target=store.delete, args=("doc",))  # another thread commits meanwhile
        deleter.start()
        deleter.join(30)
        assert store.document("doc") == before and store.tokens("doc").numel() == before.tokens
        with store.snapshot():  # nested: the same snapshot
            assert "doc" in store
    assert "doc" not in store


def test_a_stored_corpus_may_change_index_capacity_and_the_single_layers_top_k(store, tokenizer, monkeypatch):
    import memlm.store.store as store_module

    single = dict(memory_layers=(1,), top_k=8)
    write(store, memory_model(tokenizer, **single), "doc", DATA)
    prompt = " the river"
    exact = ask(memory_model(tokenizer, **single), store, ["doc"], prompt, max_new_tokens=4)
    calls = []
    monkeypatch.setattr(store_module, "fingerprint", lambda *a, **k: calls.append(1) or fingerprint(*a, **k))
    ivf = memory_model(tokenizer, memory_layers=(1,), top_k=4, memory_capacity=1 << 16, index="faiss",
                       index_kwargs={"kind": "ivf", "nlist": 4, "nprobe": 4})
    for _ in range(3):  # the fingerprint is computed once for a model, not per request
        answer = ask(ivf, store, ["doc"], prompt, max_new_tokens=4)
    assert len(calls) == 1 and isinstance(answer.text, str) and exact.text
    flat = memory_model(tokenizer, memory_layers=(1,), top_k=8, index="faiss")
    assert ask(flat, store, ["doc"], prompt, max_new_tokens=4).text == exact.text  # faiss flat is exact search
    with pytest.raises(FingerprintMismatch, match="only index, index_kwargs, memory_capacity and, with one memory "
                                                  "layer, top_k may differ"):
        ask(memory_model(tokenizer, memory_layers=(1,), xl_length=16), store, ["doc"], prompt)


def test_a_store_of_an_earlier_fingerprint_is_upgraded_when_its_settings_match(store, tokenizer):
    import json

    mem_model = memory_model(tokenizer)
    write(store, mem_model, "doc", TEXT[:600].encode())
    legacy = {k: v for k, v in fingerprint(mem_model, legacy=True).items() if k != "version"}
    with store._env.begin(write=True) as txn:  # as memlm 0.1 wrote it: every config field hashed, no version
        txn.put(b"fingerprint", json.dumps(legacy).encode(), db=store._db["meta"])
    store._bound = None
    store.bind(mem_model)
    assert json.loads(store._get("meta", b"fingerprint")) == fingerprint(mem_model)
    assert ask(mem_model, store, ["doc"], " the", max_new_tokens=1).tokens == 1


@pytest.mark.slow
def test_a_cached_document_is_asked_over_without_reading_its_segments(tmp_path, tokenizer, monkeypatch):
    mem_model, prompt = memory_model(tokenizer), " the river"
    other = make_text(200, seed=9)
    with MemoryStore(tmp_path / "plain") as plain:
        write(plain, mem_model, "doc", DATA)
        expected = ask(mem_model, plain, ["doc"], prompt, max_new_tokens=6).text
        write(plain, mem_model, "doc", other.encode(), replace=True)
        expected_other = ask(mem_model, plain, ["doc"], prompt, max_new_tokens=6).text
    with MemoryStore(tmp_path / "cached", cache_bytes=1 << 26) as store:
        write(store, mem_model, "doc", DATA)
        reads = []
        segments = store.segments
        monkeypatch.setattr(store, "segments", lambda doc_id: reads.append(doc_id) or segments(doc_id))
        assert ask(mem_model, store, ["doc"], prompt, max_new_tokens=6).text == expected and reads == ["doc"]
        assert ask(mem_model, store, ["doc"], prompt, max_new_tokens=6).text == expected and reads == ["doc"]
        write(store, mem_model, "doc", other.encode(), replace=True)  # another version: the cached one is stale
        reads.clear()
        assert ask(mem_model, store, ["doc"], prompt, max_new_tokens=6).text == expected_other and reads == ["doc"]
        size = store._cache.held
        assert 0 < size <= 1 << 26
    with MemoryStore(tmp_path / "cached", cache_bytes=size) as store:  # room for one of the two documents
        write(store, mem_model, "second", other.encode())  # as large as "doc"
        reads = []
        segments = store.segments
        monkeypatch.setattr(store, "segments", lambda doc_id: reads.append(doc_id) or segments(doc_id))
        for doc_id in ("doc", "doc", "second", "doc"):
            ask(mem_model, store, [doc_id], prompt, max_new_tokens=1)
        assert reads == ["doc", "second", "doc"]  # "second" evicted "doc", least recently used
        assert store._cache.held <= size
    with pytest.raises(ValueError, match="cache_bytes must be an integer >= 0"):
        MemoryStore(tmp_path / "x", cache_bytes=-1)


def test_reads_go_on_while_the_map_grows(tmp_path, tokenizer):
    import threading

    mem_model, errors, reads = memory_model(tokenizer), [], [0]
    with MemoryStore(tmp_path / "small", map_size=64 * 1024) as small:
        done = threading.Event()

        def read():  # a read every millisecond: a loop without pause would starve the writer of the GIL
            while not done.wait(0.001):
                try:
                    small.documents()
                    reads[0] += 1
                except Exception as error:  # any failure is the finding
                    errors.append(error)

        reader = threading.Thread(target=read)
        reader.start()
        try:
            write(small, mem_model, "doc", DATA)
        finally:
            done.set()
            reader.join(30)
        assert errors == [] and reads[0] > 0 and small._env.info()["map_size"] > 64 * 1024
        assert small.check() == []


def test_the_map_grows_when_full(tmp_path, tokenizer):
    mem_model = memory_model(tokenizer)
    with MemoryStore(tmp_path / "small", map_size=64 * 1024) as store:
        document = write(store, mem_model, "doc", DATA)
        assert store._env.info()["map_size"] > 64 * 1024
        assert store.check() == [] and store.tokens("doc").numel() == document.tokens


def test_check_finds_planted_corruption(store, tokenizer):
    write(store, memory_model(tokenizer), "doc", TEXT[:3000].encode())
    key = b"doc\0" + (2).to_bytes(8, "big")
    with store._env.begin(write=True) as txn:
        record = bytearray(txn.get(key, db=store._db["segments"]))
        record[-3] ^= 0xFF  # one bit pattern in the memory values
        txn.put(key, bytes(record), db=store._db["segments"])
        txn.delete(b"doc\0" + (4).to_bytes(8, "big"), db=store._db["segments"])
        txn.put(b"ghost\0" + (0).to_bytes(8, "big"), b"x", db=store._db["segments"])
    problems = store.check()
    assert "doc: segment 2 does not match its checksum (corrupted)" in problems
    assert "doc: segment 4 is missing" in problems
    assert "ghost: segment records of a document that does not exist" in problems


def test_records_are_safetensors_in_the_memory_dtype(store, tokenizer, tmp_path):
    write(store, memory_model(tokenizer), "doc", TEXT[:2000].encode())
    with store._env.begin() as txn:
        record = txn.get(b"doc\0" + (3).to_bytes(8, "big"), db=store._db["segments"])
    path = tmp_path / "segment.safetensors"
    path.write_bytes(record)
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"ids", "text", "keys.0", "values.0", "keys.1", "values.1"}
        assert f.get_tensor("keys.1").dtype == torch.float16 and f.get_tensor("keys.1").shape == (4, 32, 16)
    assert (store.path.stat().st_mode & 0o777) == 0o700


def test_store_refuses_use_after_fork_and_delete_removes_everything(store, tokenizer):
    write(store, memory_model(tokenizer), "doc", TEXT[:2000].encode())
    assert store.delete("doc").id == "doc" and store.documents() == [] and store.check() == []
    with store._env.begin() as txn:
        assert txn.stat(store._db["segments"])["entries"] == 0 and txn.stat(store._db["states"])["entries"] == 0
    store._pid = -1  # what a forked child sees
    with pytest.raises(RuntimeError, match="must not cross fork"):
        store.documents()


def test_cli_ingest_docs_and_ask(tmp_path, capsys):
    """memlm ingest / docs / ask without a server, on the embedded model."""
    text = tmp_path / "book.txt"
    text.write_text(make_text(200, seed=5) + " The pass key is 417. Remember it. 417 is the pass key. "
                    + make_text(100, seed=6))
    store = str(tmp_path / "store")
    assert main(["ingest", str(text), "--store", store, "--doc-id", "book"]) == 0
    assert "book: complete" in capsys.readouterr().out
    assert main(["docs", "--store", store, "--check"]) == 0
    out = capsys.readouterr().out
    assert "book" in out and "complete" in out and "check: 1 documents, no problems" in out
    assert main(["ask", "--store", store, "--doc", "book", " What is the pass key? The pass key is",
                 "--max-new-tokens", "2"]) == 0
    assert "417" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="memlm ask: no document 'nope'"):
        main(["ask", "--store", store, "--doc", "nope", "question"])
    with pytest.raises(SystemExit, match="is not a memlm store"):
        main(["docs", "--store", str(tmp_path / "nothing")])


@pytest.mark.slow
def test_ingest_file_resumes_a_partial_document(tmp_path, tokenizer):
    mem_model = memory_model(tokenizer)
    path = tmp_path / "doc.txt"
    path.write_bytes(DATA)
    with MemoryStore(tmp_path / "a") as whole, MemoryStore(tmp_path / "b") as resumed:
        ingest_file(whole, mem_model, "doc", path)
        write(resumed, mem_model, "doc", TEXT[:4000].encode(), finish=False)
        ingest_file(resumed, mem_model, "doc", path, chunk_size=512)
        assert stored(resumed, "doc") == stored(whole, "doc")


def test_memory_loads_the_same_in_one_add_or_many(store, tokenizer):
    from memlm.store.sessions import load_segments as _load_segments

    mem_model = memory_model(tokenizer, memory_capacity=1000)  # FIFO evicts during the load
    write(store, mem_model, "doc", DATA)
    loaded = []
    for chunk_bytes in (1, 1 << 30):  # an add after every segment, or one add per layer
        with mem_model.session() as session:
            assert _load_segments(session.state, store, "doc", chunk_bytes=chunk_bytes) == store.document("doc").entries
            index = session.state.knn.indexes[1]
            loaded.append((index.entries(), index.total_added.tolist(), index._keys.data[:, :, :1000].clone()))
    (entries_a, total_a, slots_a), (entries_b, total_b, slots_b) = loaded
    assert total_a == total_b and entries_a[2] == entries_b[2] > 0
    assert torch.equal(entries_a[0], entries_b[0]) and torch.equal(entries_a[1], entries_b[1])
    assert torch.equal(slots_a, slots_b)  # the same entries in the same slots


@pytest.mark.slow
def test_stored_sinks_resume_and_continue_exactly(tmp_path, tokenizer):
    """Attention sinks are part of a stored document's state: a resumed ingestion stores what an uninterrupted one
    does, and a session over the stored document continues it as the live session would."""
    mem_model = memory_model(tokenizer, sink_tokens=5)
    with MemoryStore(tmp_path / "a") as whole, MemoryStore(tmp_path / "b") as resumed:
        write(whole, mem_model, "doc", DATA, chunk=300)
        committed = write(resumed, mem_model, "doc", DATA[:2500], chunk=61, finish=False)
        write(resumed, mem_model, "doc", DATA[committed.bytes :], chunk=1000, offset=committed.bytes)
        assert stored(resumed, "doc") == stored(whole, "doc")
        assert whole.state("doc")[1]["sink_length"] == 5
        with mem_model.session() as session:
            session.feed(TEXT)
            expected = session.feed(" and then", return_logits=True).logits
        with mem_model.session(store=whole, documents=["doc"]) as session:
            assert session.state.local.sink_length == 5
            logits = session.feed(" and then", return_logits=True).logits
        # the live session still held the text's last words back (the stored one was finished): its last logits
        torch.testing.assert_close(logits, expected[:, -logits.shape[1] :], atol=1e-5, rtol=0)
