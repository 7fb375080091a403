"""Summarizing books: three methods behind ``memlm summarize`` and ``examples/summarize_book.py``.

* ``unlimiformer``: an encoder-decoder model reads the whole text at once; each cross-attention head
  retrieves its top-k encoder states (``unlimiformer.py``).
* ``memory``: a decoder-only model streams the text through a memlm session (XL cache + kNN memory),
  then the instruction ``SUMMARY_PROMPT`` asks for the summary.
* ``hierarchical``: the usual baseline for either model type: summarize chunks that fit the model,
  then summarize the concatenated summaries, until one summary remains.

``split_chapters`` finds chapter headings ("CHAPTER IV", "Chapter 12", "BOOK TWO: 1805", ...); with
``chapters=True`` every chapter is summarized, and then the book from the chapter summaries.
Everything loads from a local model directory; nothing is fetched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from memlm.config import MemoryConfig, check_integer
from memlm.runtime.model import attach

from .unlimiformer import Unlimiformer, UnlimiformerConfig

METHODS = ("unlimiformer", "memory", "hierarchical")
SUMMARY_PROMPT = "\n\nSummary of the text above:\n"
CHAPTER_HEADING = re.compile(r"^[ \t]*((?:CHAPTER|Chapter|BOOK|Book|PART|Part)[ \t]+[^\n]{1,60})[ \t]*$", re.MULTILINE)
CHAPTER_NUMBER = re.compile(r"^(?:CHAPTER|Chapter|BOOK|Book|PART|Part)[ \t]+([IVXLCDM]+|\d+|[A-Z][a-z]+|[A-Z]+)\b")


@dataclass
class Summary:
    title: str
    text: str
    input_tokens: int


def load(model_path: str | Path):
    """(model, tokenizer) from a local directory; encoder-decoder or decoder-only as its config says."""
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: expected a local Hugging Face model directory (config.json, weights, "
                                "tokenizer); memlm fetches nothing")
    config = transformers.AutoConfig.from_pretrained(path)
    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    return auto.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


def split_chapters(text: str) -> list[tuple[str, str]]:
    """(heading, body) per chapter; text before the first heading becomes ("Front matter", ...) when non-empty.
    Without headings: one ("Book", text)."""
    headings = [m for m in CHAPTER_HEADING.finditer(text) if CHAPTER_NUMBER.match(m.group(1))]
    if not headings:
        return [("Book", text)]
    chapters = []
    if text[: headings[0].start()].strip():
        chapters.append(("Front matter", text[: headings[0].start()]))
    for i, match in enumerate(headings):
        end = headings[i + 1].start() if i + 1 < len(headings) else len(text)
        chapters.append((match.group(1).strip(), text[match.end() : end]))
    return [(title, body) for title, body in chapters if body.strip()]


class Summarizer:
    """Summarizes texts of any length with ``model`` by ``method``; see the module docstring."""

    def __init__(self, model, tokenizer, method: str = "unlimiformer", max_new_tokens: int = 128,
                 top_k: int = 32, memory: MemoryConfig | None = None, progress: bool = True) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        if method == "unlimiformer" and not encoder_decoder:
            raise ValueError(f"method 'unlimiformer' needs an encoder-decoder model (BART, T5, ...); "
                             f"{type(model).__name__} is decoder-only: use --method memory or hierarchical")
        if method == "memory" and encoder_decoder:
            raise ValueError(f"method 'memory' needs a decoder-only model; {type(model).__name__} is an "
                             "encoder-decoder: use --method unlimiformer or hierarchical")
        check_integer("max_new_tokens", max_new_tokens, 1)
        self.model, self.tokenizer, self.method = model, tokenizer, method
        self.max_new_tokens, self.top_k, self.progress = max_new_tokens, top_k, progress
        self.encoder_decoder = encoder_decoder
        self.memory = memory or MemoryConfig(segment_length=512, xl_length=512, memory_layers=(-1,), top_k=top_k)
        positions = getattr(model.config, "max_position_embeddings", None) or 1024
        # hierarchical chunks: what the model reads at once, leaving room for the prompt and the summary
        self.chunk_tokens = positions if encoder_decoder else max(64, positions - max_new_tokens - 32)

    def tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def summarize(self, text: str, title: str = "Book") -> Summary:
        if not text.strip():
            raise ValueError(f"{title}: nothing to summarize (empty text)")
        run = {"unlimiformer": self._unlimiformer, "memory": self._memory, "hierarchical": self._hierarchical}
        return Summary(title, run[self.method](text).strip(), self.tokens(text))

    def summarize_book(self, text: str, chapters: bool = False) -> list[Summary]:
        """One summary of the book, or (``chapters``) one per chapter followed by the book's, from theirs."""
        if not chapters:
            return [self.summarize(text)]
        parts = [self.summarize(body, title) for title, body in split_chapters(text)]
        joined = "\n\n".join(f"{s.title}: {s.text}" for s in parts)
        book = self.summarize(joined, "Book") if len(parts) > 1 else parts[0]
        return [*parts, Summary("Book", book.text, self.tokens(text))]

    # ------------------------------------------------------------------------------------- methods

    def _unlimiformer(self, text: str) -> str:
        unlimiformer = Unlimiformer(self.model, UnlimiformerConfig(top_k=self.top_k), tokenizer=self.tokenizer)
        return unlimiformer.generate(text, max_new_tokens=self.max_new_tokens, progress=self.progress)

    def _memory(self, text: str) -> str:
        mem_model = attach(self.model, self.memory, tokenizer=self.tokenizer)
        try:
            with torch.no_grad(), mem_model.session() as session:
                session.feed(text, progress=self.progress)
                return session.generate(SUMMARY_PROMPT, max_new_tokens=self.max_new_tokens)
        finally:
            mem_model.detach()

    def _hierarchical(self, text: str) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        while True:
            chunks = [ids[i : i + self.chunk_tokens] for i in range(0, len(ids), self.chunk_tokens)]
            summaries = [self._summarize_chunk(c) for c in tqdm(chunks, desc="memlm summarize chunks",
                                                                  disable=not self.progress or len(chunks) == 1)]
            if len(chunks) == 1:
                return summaries[0]
            joined = self.tokenizer("\n".join(summaries), add_special_tokens=False)["input_ids"]
            if len(joined) >= len(ids):  # summaries no shorter than their input: stop rather than loop
                return self.tokenizer.decode(joined[: self.chunk_tokens], skip_special_tokens=True)
            ids = joined

    @torch.no_grad()
    def _summarize_chunk(self, ids: list[int]) -> str:
        device = next(self.model.parameters()).device
        if self.encoder_decoder:
            out = self.model.generate(input_ids=torch.tensor([ids], device=device),
                                      max_new_tokens=self.max_new_tokens, do_sample=False)
            return self.tokenizer.decode(out[0], skip_special_tokens=True)
        prompt = ids + self.tokenizer(SUMMARY_PROMPT, add_special_tokens=False)["input_ids"]
        out = self.model.generate(input_ids=torch.tensor([prompt], device=device), max_new_tokens=self.max_new_tokens,
                                  do_sample=False, pad_token_id=self.tokenizer.pad_token_id or 0)
        return self.tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)


def rouge(summary: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 of ``summary`` against ``reference`` (rouge-score, with stemming)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as error:
        raise ImportError("--reference needs rouge-score: pip install 'memlm[summarize]'") from error
    scores = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(reference, summary)
    return {name: score.fmeasure for name, score in scores.items()}


def to_markdown(summaries: list[Summary], source: str, method: str) -> str:
    lines = [f"# Summary of {source}", "", f"Method: {method}.", ""]
    for s in summaries:
        lines += [f"## {s.title}", "", f"*{s.input_tokens:,} tokens in.*", "", s.text or "(empty)", ""]
    return "\n".join(lines)
