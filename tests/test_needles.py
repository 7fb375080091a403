"""Training documents made of the evaluation's needle tasks (memlm.train.needles)."""

from __future__ import annotations

import random

import pytest

from memlm.eval.tasks import Haystack
from memlm.train.data import IGNORE_INDEX, make_batch
from memlm.train.needles import NeedleDocuments, NeedleTask, answer_text

from conftest import make_text

MIXTURE = (
    NeedleTask("passkey", 2, (("digits", [3, 5]), ("distractors", [0, 3]))),
    NeedleTask("niah_multikey", 1, (("keys", [2, 8]),)),
    NeedleTask("babilong_qa1", 1),
)


@pytest.fixture(scope="module")
def documents(tokenizer):
    return NeedleDocuments(tokenizer, Haystack(make_text(800, seed=4)), MIXTURE)


@pytest.mark.parametrize("tokens", [256, 700, 2048])
def test_documents_are_exact_length_and_score_only_the_answer(documents, tokenizer, tokens):
    seen = set()
    for seed in range(30):
        ids, labels = documents.document(random.Random(seed), tokens)
        assert len(ids) == len(labels) == tokens
        scored = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        assert scored == list(range(scored[0], tokens))  # one answer, at the end
        assert [labels[i] for i in scored] == ids[scored[0]:]  # labels are the ids they score (data.py)
        answer = tokenizer.decode(ids[scored[0]:])
        before = tokenizer.decode(ids[: scored[0]])
        assert answer.endswith(".") and answer.startswith(" ")
        if "pass key" in before[-60:]:
            seen.add("passkey")
            key = answer.strip(" .")
            assert f"The pass key is {key}. Remember it." in before and len(key) in (3, 5)
        elif "special magic" in before[-200:]:
            seen.add("niah")
            value = answer.strip(" .")
            assert before.count("One of the special magic numbers") in (2, 8)  # the asked needle and distractors
            assert f"is: {value}." in before
        else:
            seen.add("babilong")
            assert "Answer:" in before[-60:] and " went to the" + answer[:-1] in before
    assert seen == {"passkey", "niah", "babilong"}


def test_documents_depend_only_on_their_seed(documents):
    first = make_batch(documents, seed=3, step=2, batch_size=4, tokens=512)
    again = make_batch(documents, seed=3, step=2, batch_size=4, tokens=512)
    other = make_batch(documents, seed=3, step=3, batch_size=4, tokens=512)
    assert first.ids.equal(again.ids) and first.labels.equal(again.labels)
    assert not first.ids.equal(other.ids)


def test_answer_text_lists_the_references():
    assert answer_text(["42"]) == "42."
    assert answer_text(["a", "b"]) == "a and b."
    assert answer_text(["a", "b", "c"]) == "a, b and c."


def test_bad_mixtures_are_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        NeedleTask("nope")
    with pytest.raises(ValueError, match="must be a number > 0"):
        NeedleTask("passkey", 0)
    with pytest.raises(ValueError, match="at least one NeedleTask"):
        NeedleDocuments(tokenizer, Haystack(), [])
    crowded = NeedleDocuments(tokenizer, Haystack(), [NeedleTask("niah_multikey", 1, (("keys", 40),))])
    with pytest.raises(ValueError, match="no task of the mixture fits a document of 128 tokens"):
        crowded.document(random.Random(0), 128)
