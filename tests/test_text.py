"""Text streamed in pieces gives exactly the tokenizer's tokens of the whole text (runtime/text.py).

Four tokenizer families users meet, each trained here on text this file writes: GPT-2 byte-level BPE,
the Llama-3 pre-tokenizer regex (newline runs merge, digits in threes) with a BOS, SentencePiece-style
``Metaspace`` with a BOS, and Llama-2's converted SentencePiece (``Prepend`` + ``Replace`` normalizer,
no pre-tokenizer, byte fallback). Cut points are random, inside multi-byte characters and runs of
whitespace, newlines and digits.
"""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from memlm import MemoryConfig, attach
from memlm.runtime.text import TextStream, special_prefix
from memlm.store import MemoryStore
from memlm.store.documents import DocumentWriter

from conftest import make_text

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
VOCAB = 500


def hard_text(n_sentences: int = 120, seed: int = 0) -> str:
    """English-like sentences with the hard cases between them: newline runs, space runs, long numbers,
    multi-byte letters, CJK without spaces, emoji with modifiers, combining accents, contractions."""
    rng = random.Random(seed)
    extras = ["\n\n", "\n \n", "   ", "\t", " 1234567 ", " 2024-12-02 ", " café naïve ", " 日本語の文章，中文。",
              " 👍🏽 ", " e\u0301t\u00e9 ", " don't we'll ", " ...!? ", "\r\n", " 3.14159 ", "  \n  "]
    parts = []
    for sentence in make_text(n_sentences, seed=seed).split(". "):
        parts.append(sentence + ".")
        parts.append(rng.choice(extras) if rng.random() < 0.5 else " ")
    return "".join(parts)


def train(kind: str) -> transformers.PreTrainedTokenizerFast:
    model = models.BPE(byte_fallback=kind == "llama2", unk_token="<unk>" if kind == "llama2" else None)
    tokenizer = Tokenizer(model)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if kind == "gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
    elif kind == "llama3":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tokenizer.decoder = decoders.ByteLevel()
    else:  # SentencePiece: pieces start at a "▁" (Llama-2's converted form is set up after training)
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        tokenizer.decoder = decoders.Metaspace()
        alphabet = []
    specials = ["<s>", "<eos>", "<pad>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] * (kind == "llama2")
    trainer = trainers.BpeTrainer(vocab_size=VOCAB if kind != "llama2" else VOCAB + 256, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(hard_text(300, seed=1).split("."), trainer=trainer)
    if kind == "llama2":  # as transformers converts a SentencePiece model: a normalizer, no pre-tokenizer
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.pre_tokenizer = None
        tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                               decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    if kind != "gpt2":
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="<eos>",
                                                pad_token="<pad>")


KINDS = ("gpt2", "llama3", "metaspace", "llama2")
TOKENIZERS = {}


def tokenizer_of(kind: str):
    if kind not in TOKENIZERS:
        TOKENIZERS[kind] = train(kind)
    return TOKENIZERS[kind]


def streamed(tokenizer, pieces: list[str], **kwargs) -> list[int]:
    stream, ids = TextStream(tokenizer, **kwargs), []
    for piece in pieces:
        ids += [i for p in stream.push(piece) for i in p.ids]
    return ids + [i for p in stream.flush() for i in p.ids]


def cut(text: str, points: list[int]) -> list[str]:
    points = sorted({min(p, len(text)) for p in points})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


def test_the_hard_cases_differ_from_tokenizing_pieces_alone():
    """What a naive stream gets wrong, so the tests below can fail: tokenizing pieces on their own."""
    text = hard_text(40, seed=2)
    for kind in KINDS:
        tokenizer = tokenizer_of(kind)
        pieces = cut(text, list(range(97, len(text), 97)))
        naive = [i for piece in pieces for i in tokenizer(piece, add_special_tokens=False)["input_ids"]]
        assert naive != tokenizer(text, add_special_tokens=False)["input_ids"], kind


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), points=st.lists(st.integers(0, 3000), max_size=40),
       piece_length=st.sampled_from([1, 16, 200, 4096]))
def test_streamed_tokens_equal_the_whole_texts(kind, seed, points, piece_length):
    tokenizer = tokenizer_of(kind)
    text = hard_text(50, seed=seed)[:3000]
    expected = tokenizer(text)["input_ids"]  # BOS included where the tokenizer adds one
    assert streamed(tokenizer, cut(text, points), piece_length=piece_length) == expected
    # cuts inside every run of whitespace, digits and multi-byte characters, one character at a time
    assert streamed(tokenizer, list(text[:400]), piece_length=piece_length) == tokenizer(text[:400])["input_ids"]


@pytest.mark.parametrize("kind", KINDS)
def test_memory_is_bounded_by_the_window_and_text_without_safe_cuts_still_flows(kind, caplog):
    tokenizer = tokenizer_of(kind)
    stream = TextStream(tokenizer, piece_length=64, max_held=512)
    text = hard_text(200, seed=3)
    held = []
    for start in range(0, len(text), 50):
        stream.push(text[start : start + 50])
        held.append(len(stream.held))
    assert max(held) < 64 + 50 + 200  # a window, a chunk and the last word, never the document
    # no space and no punctuation: cut anyway at max_held, with a warning
    stream = TextStream(tokenizer, piece_length=64, max_held=512)
    emitted = [p for _ in range(40) for p in stream.push("abcdefghij" * 5)]
    assert emitted and len(stream.held) <= 512 + 50 and "without a safe cut" in caplog.text


def test_special_prefix_is_the_tokenizers_own_rule():
    assert special_prefix(tokenizer_of("gpt2")) == []
    assert special_prefix(tokenizer_of("llama3")) == [tokenizer_of("llama3").bos_token_id]


def test_text_after_a_flush_is_a_text_of_its_own():
    tokenizer = tokenizer_of("llama3")
    stream = TextStream(tokenizer)
    ids = [i for p in stream.push("hello wor", eager=True) + stream.flush() + stream.push("ld again", eager=True)
           + stream.flush() for i in p.ids]
    assert ids == tokenizer("hello wor")["input_ids"] + tokenizer("ld again", add_special_tokens=False)["input_ids"]


def test_bad_input():
    with pytest.raises(TypeError, match="expected text"):
        TextStream(tokenizer_of("gpt2")).push(b"bytes")
    with pytest.raises(ValueError, match="piece_length <= max_held"):
        TextStream(tokenizer_of("gpt2"), piece_length=10, max_held=5)


# ------------------------------------------------------------------ sessions and the store


def memory_model(tokenizer):
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    return attach(model, MemoryConfig(segment_length=32, xl_length=32, memory_layers=(1,), top_k=4),
                  tokenizer=tokenizer)


def fed_ids(session) -> list[int]:
    return session.history.stream()[0][0].tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_feed_feed_stream_and_a_resumed_document_writer_all_give_the_whole_texts_tokens(kind, tmp_path):
    tokenizer = tokenizer_of(kind)
    mem_model = memory_model(tokenizer)
    text = hard_text(300, seed=7)
    data = text.encode()
    expected = tokenizer(text)["input_ids"]
    rng = random.Random(kind)
    pieces = cut(text, [rng.randrange(len(text)) for _ in range(30)])
    with mem_model.session() as session:
        for piece in pieces:
            session.feed(piece)
        session.flush()
        assert fed_ids(session) == expected
    byte_points = sorted(rng.randrange(len(data)) for _ in range(30))  # inside multi-byte characters too
    chunks = [data[a:b] for a, b in zip([0, *byte_points], [*byte_points, len(data)], strict=True)]
    with mem_model.session() as session:
        session.feed_stream(chunks[:10], final=False)  # more of the same text follows
        assert session.feed_stream(chunks[10:]).tokens > 0
        assert fed_ids(session) == expected
    # DocumentWriter, interrupted (a crash: no finish, no close) and resumed from what was committed
    store = MemoryStore(tmp_path / "store")
    writer = DocumentWriter(store, mem_model, "doc")
    for start in range(0, len(data) * 2 // 3, 101):
        writer.write(data[start : min(start + 101, len(data) * 2 // 3)])
    committed = store.document("doc")
    assert 0 < committed.bytes < len(data) * 2 // 3 and committed.status == "ingesting"
    resumed = DocumentWriter(store, mem_model, "doc", offset=committed.bytes)
    for start in range(committed.bytes, len(data), 89):
        resumed.write(data[start : start + 89])
    resumed.finish()
    assert torch.cat([s.ids for s in store.segments("doc")]).tolist() == expected
