"""memlm summarize: chapter splitting and the three methods end to end on tiny random models."""

from __future__ import annotations

import pytest

from memlm.cli import main
from memlm.summarize import Summarizer, split_chapters

from conftest import make_text

BOOK = (
    "THE TINY BOOK\nby nobody\n\n"
    + "".join(f"CHAPTER {numeral}\n\n{make_text(60, seed=i)}\n\n" for i, numeral in enumerate(["I", "II", "III"]))
)


def test_split_chapters_finds_the_headings():
    chapters = split_chapters(BOOK)
    assert [title for title, _ in chapters] == ["Front matter", "CHAPTER I", "CHAPTER II", "CHAPTER III"]
    assert chapters[2][1].strip() == make_text(60, seed=1)
    assert split_chapters("no headings here") == [("Book", "no headings here")]
    war_and_peace_style = "BOOK ONE: 1805\n\nCHAPTER I\n\nWell, Prince.\n\nCHAPTER II\n\nAnna Pavlovna.\n"
    assert [t for t, _ in split_chapters(war_and_peace_style)] == ["CHAPTER I", "CHAPTER II"]
    assert [t for t, _ in split_chapters("Chapter 1\nA.\nChapter 2\nB.\n")] == ["Chapter 1", "Chapter 2"]


@pytest.fixture
def book(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(BOOK, encoding="utf-8")
    return path


def saved(model, tokenizer, directory):
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize(("name", "method"), [
    ("tiny_bart", "unlimiformer"), ("tiny_bart", "hierarchical"), ("tiny_llama", "memory"),
    ("tiny_llama", "hierarchical"),
])
def test_methods_run_end_to_end_and_write_the_output(name, method, book, tokenizer, tmp_path, request, capsys):
    model_dir = saved(request.getfixturevalue(name), tokenizer, tmp_path / name)
    out = tmp_path / "summary.md"
    reference = tmp_path / "reference.txt"
    reference.write_text(make_text(5, seed=9), encoding="utf-8")
    assert main(["summarize", str(book), "--model", model_dir, "--method", method, "--chapters", "--output", str(out),
                 "--max-new-tokens", "6", "--reference", str(reference)]) == 0
    markdown = out.read_text(encoding="utf-8")
    for heading in ("## Front matter", "## CHAPTER I", "## CHAPTER III", "## Book", f"Method: {method}."):
        assert heading in markdown
    printed = capsys.readouterr().out
    assert "wrote 5 summaries" in printed and "ROUGE1=" in printed and "ROUGEL=" in printed


def test_a_method_that_does_not_fit_the_model_says_what_to_use(tiny_bart, tiny_llama, tokenizer):
    with pytest.raises(ValueError, match=r"needs an encoder-decoder model .* use --method memory or hierarchical"):
        Summarizer(tiny_llama, tokenizer, "unlimiformer")
    with pytest.raises(ValueError, match=r"needs a decoder-only model;.* use --method unlimiformer or hierarchical"):
        Summarizer(tiny_bart, tokenizer, "memory")
    with pytest.raises(ValueError, match="method must be one of"):
        Summarizer(tiny_bart, tokenizer, "extractive")
    with pytest.raises(FileNotFoundError, match="memlm fetches nothing"):
        main(["summarize", __file__, "--model", "facebook/bart-large-cnn"])
