"""Summarize a long book with a local model: the job of ``memlm summarize``, as a short script.

    python examples/summarize_book.py BOOK.txt MODEL_DIR [unlimiformer|memory|hierarchical]

MODEL_DIR is a local Hugging Face model directory with its tokenizer (memlm downloads nothing). An
encoder-decoder model (BART, T5, ...) reads the whole book at once with Unlimiformer retrieval; a
decoder-only model streams it into a memlm session and is then asked for the summary.
"""

import sys
from pathlib import Path

from memlm.summarize import Summarizer, load, split_chapters

book, model_dir = Path(sys.argv[1]), sys.argv[2]
model, tokenizer = load(model_dir)
method = sys.argv[3] if len(sys.argv) > 3 else ("unlimiformer" if model.config.is_encoder_decoder else "memory")
summarizer = Summarizer(model, tokenizer, method, max_new_tokens=128)

text = book.read_text(encoding="utf-8")
chapters = split_chapters(text)
print(f"{book.name}: {summarizer.tokens(text):,} tokens, {len(chapters)} chapters, method {method}")
for summary in summarizer.summarize_book(text, chapters=len(chapters) > 1):
    print(f"\n## {summary.title} ({summary.input_tokens:,} tokens)\n\n{summary.text}")
