"""memlm.data: generated documents are deterministic per seed and say where their answers are."""

from __future__ import annotations

import random

import pytest
import torch

from memlm.train.data import (
    IGNORE_INDEX,
    AssociativeRecall,
    Mixture,
    Passkey,
    RandomRepeats,
    TextDocuments,
    make_batch,
)

from conftest import VOCAB_SIZE, make_text


def test_associative_recall_asks_the_stored_pairs():
    task = AssociativeRecall(vocab_size=VOCAB_SIZE, pairs=4, keys=16, values=16)
    ids, labels = task.document(random.Random(3), 40)
    assert len(ids) == len(labels) == 40
    stored = dict(zip(ids[0:8:2], ids[1:8:2], strict=True))
    asked = ids[-8:]
    assert sorted(asked[0::2]) == sorted(stored)
    for key, value in zip(asked[0::2], asked[1::2], strict=True):
        assert stored[key] == value
    assert labels[-8:][1::2] == asked[1::2] and set(labels[:-8] + labels[-8:][0::2]) == {IGNORE_INDEX}
    filler = ids[8:-8]
    assert min(filler) >= task.first_id + 32 and max(filler) < VOCAB_SIZE
    with pytest.raises(ValueError, match="needs >= 16 tokens"):
        task.document(random.Random(0), 10)
    with pytest.raises(ValueError, match="do not fit a vocabulary"):
        AssociativeRecall(vocab_size=40, keys=32, values=32)


def test_random_repeats_score_the_copy_after_the_gap():
    task = RandomRepeats(vocab_size=VOCAB_SIZE, span=16, gap=24, first_id=5)
    ids, labels = task.document(random.Random(1), 70)
    assert len(ids) == len(labels) == 70
    assert ids[40:56] == ids[:16] and min(ids) >= 5 and max(ids) < VOCAB_SIZE
    scored = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
    assert scored == list(range(41, 56))  # the copy from its second token: its first follows random ids
    assert [labels[t] for t in scored] == ids[41:56]
    assert ids[16:40] != ids[:24] and ids[56:] != ids[16:30]  # the gap and the tail are fresh draws
    assert task.document(random.Random(1), 70) == (ids, labels)
    with pytest.raises(ValueError, match="at least 56 tokens"):
        task.document(random.Random(0), 50)
    with pytest.raises(ValueError, match="span must be an integer >= 2"):
        RandomRepeats(vocab_size=VOCAB_SIZE, span=1)
    with pytest.raises(ValueError, match="first_id must be in"):
        RandomRepeats(vocab_size=8, first_id=7)


def test_a_mixture_draws_each_document_from_one_task_by_weight():
    repeats = RandomRepeats(vocab_size=VOCAB_SIZE, span=4)
    recall = AssociativeRecall(vocab_size=VOCAB_SIZE, pairs=2, keys=16, values=16)
    mixture = Mixture([repeats, recall], [3, 1])
    documents = [mixture.document(random.Random(seed), 16) for seed in range(400)]
    from_repeats = sum(ids[4:8] == ids[:4] for ids, _ in documents)
    assert 250 < from_repeats < 350  # about three in four
    assert mixture.document(random.Random(7), 16) == documents[7]
    with pytest.raises(ValueError, match="one weight per task"):
        Mixture([repeats], [1, 2])
    with pytest.raises(ValueError, match="weights must be numbers > 0"):
        Mixture([repeats, recall], [1, 0])


def test_batches_depend_only_on_seed_step_and_row():
    task = AssociativeRecall(vocab_size=VOCAB_SIZE, pairs=4, keys=16, values=16)
    whole = make_batch(task, seed=7, step=2, batch_size=4, tokens=32)
    again = make_batch(task, seed=7, step=2, batch_size=4, tokens=32)
    assert torch.equal(whole.ids, again.ids) and torch.equal(whole.labels, again.labels)
    halves = [make_batch(task, seed=7, step=2, batch_size=2, tokens=32, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat([h.ids for h in halves]), whole.ids)
    assert not torch.equal(make_batch(task, seed=8, step=2, batch_size=4, tokens=32).ids, whole.ids)


def test_passkey_places_the_key_where_it_says(tokenizer):
    task = Passkey(tokenizer)
    for seed, depth in ((0, 0.0), (1, 0.5), (2, 0.9)):
        sample = Passkey(tokenizer, depth=depth).sample(random.Random(seed), 300)
        ids, key = sample["ids"], sample["key"]
        assert len(ids) == len(sample["labels"]) == 300
        assert tokenizer.decode(ids[sample["key_start"] :]).startswith(f" {key}")
        assert abs(sample["key_start"] / 300 - depth * 0.8) < 0.15  # depth is a fraction of the haystack
        assert tokenizer.decode(ids[-len(sample["answer"]) :]) == f" {key}"
        assert tokenizer.decode([t for t in sample["labels"] if t != IGNORE_INDEX]) == f" {key}"
    assert task.sample(random.Random(5), 200) == task.sample(random.Random(5), 200)
    assert task.sample(random.Random(5), 200)["key"] != task.sample(random.Random(6), 200)["key"]
    with pytest.raises(ValueError, match="needs at least"):
        task.sample(random.Random(0), 10)


def test_text_documents_are_chunks_of_the_file(tmp_path, tokenizer):
    path = tmp_path / "book.txt"
    path.write_text(make_text(50), encoding="utf-8")
    docs = TextDocuments(path, tokenizer)
    ids, labels = docs.document(random.Random(0), 64)
    assert ids == labels and len(ids) == 64
    whole = docs.ids
    assert any(whole[i : i + 64] == ids for i in range(len(whole) - 63))
    with pytest.raises(FileNotFoundError, match="expected a UTF-8 text file"):
        TextDocuments(tmp_path / "missing.txt", tokenizer)
    with pytest.raises(ValueError, match="fewer than one document"):
        docs.document(random.Random(0), len(whole) + 1)
