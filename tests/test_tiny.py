"""memlm-tiny, the embedded default model, and ``memlm demo``: offline, and its memory finds a pass key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from memlm import cli
from memlm.eval.passkey import passkey_trials
from memlm.tiny import DEFAULT_DIR, MEMORY, PASSKEY_DIGITS, load_default

from conftest import make_text

MAX_BYTES = 10 * 2**20


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any attempt to reach the Hugging Face Hub fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_the_default_model_ships_inside_the_package():
    import memlm

    assert DEFAULT_DIR.parent.resolve() == Path(memlm.__file__).parent.resolve()
    files = {p.name: p.stat().st_size for p in DEFAULT_DIR.iterdir()}
    wanted = {"config.json", "model.safetensors", "tokenizer.json", "memlm_config.json", "memlm.safetensors"}
    assert wanted <= set(files)
    assert sum(files.values()) <= MAX_BYTES


def test_load_default_returns_the_memory_model_and_its_tokenizer():
    mem_model, tokenizer = load_default()
    assert mem_model.config.to_dict() == {**mem_model.config.to_dict(), **MEMORY}
    assert mem_model.model.training is False
    assert mem_model.memory_layers == tuple(MEMORY["memory_layers"])
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(" 424 71432", add_special_tokens=False)["input_ids"])
    assert tokens == ["Ġ", "424", "Ġ", "714", "32"]  # numbers in groups of up to three digits, one token each
    xl_only, _ = load_default(memory_layers=())
    assert xl_only.memory_layers == () and xl_only.config.xl_length == MEMORY["xl_length"]
    with pytest.raises(FileNotFoundError, match="no memlm-tiny model"):
        load_default(directory=DEFAULT_DIR / "missing")


def test_memory_finds_a_key_far_outside_the_local_context():
    mem_model, tokenizer = load_default()
    local = MEMORY["xl_length"] + MEMORY["segment_length"]
    results = passkey_trials(mem_model, tokenizer, length=4096, seeds=list(range(8)), depth=0.1,
                             digits=PASSKEY_DIGITS)
    assert all(4096 - r.key_position > 10 * local for r in results)
    assert sum(r.right for r in results) >= 7, [(r.key, r.answer) for r in results]
    without, _ = load_default(memory_layers=())
    missed = passkey_trials(without, tokenizer, length=4096, seeds=list(range(8)), depth=0.1,
                            digits=PASSKEY_DIGITS)
    assert sum(r.right for r in missed) == 0, [(r.key, r.answer) for r in missed]


def test_demo_takes_a_haystack_file_and_distractors(capsys, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(make_text(300, seed=2))
    assert cli.main(["demo", "--length", "2048", "--haystack", str(book), "--distractors", "3"]) == 0
    out = capsys.readouterr().out
    assert f"tokens of {book}, 3 other numbers in it" in out and "-> " in out


def test_demo_streams_a_haystack_and_answers(capsys):
    assert cli.main(["demo", "--length", "4096", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "-> right" in out and re.search(r"haystack: 4,0\d\d tokens of filler", out) and "tokens/s" in out
    assert cli.main(["demo", "--length", "4096", "--seed", "3", "--depth", "0.1", "--no-memory"]) == 0
    assert "memory off" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--length must be at least 64"):
        cli.main(["demo", "--length", "10"])
    with pytest.raises(SystemExit, match="--distractors must be >= 0"):
        cli.main(["demo", "--distractors", "-1"])
    with pytest.raises(SystemExit, match="expected a UTF-8 text file"):
        cli.main(["demo", "--haystack", "/nonexistent/book.txt"])
    with pytest.raises(SystemExit, match="--depth must be in"):
        cli.main(["demo", "--depth", "2"])


def test_passkey_trials_batch_keys_of_different_token_counts():
    mem_model, tokenizer = load_default()
    seeds = list(range(12))
    results = passkey_trials(mem_model, tokenizer, length=512, seeds=seeds, digits=5)
    lengths = {len(tokenizer(f" {r.key}", add_special_tokens=False)["input_ids"]) for r in results}
    assert len(lengths) > 1, "the seeds should give keys of different token counts"  # e.g. 10050 -> 100, 5, 0
    assert [r.key for r in results] == [r.key for r in passkey_trials(mem_model, tokenizer, length=512, seeds=seeds,
                                                                      digits=5)]  # deterministic per seed
    assert all(len(r.key) == 5 and r.tokens == 512 for r in results)
    with pytest.raises(ValueError, match="at least one seed"):
        passkey_trials(mem_model, tokenizer, length=512, seeds=[])
