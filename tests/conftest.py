"""Shared fixtures: tiny random Hugging Face models built from configs, and a tokenizer trained here.

Nothing is downloaded: every model is initialised from a seeded config, and the tokenizer is a
byte-level BPE trained on text this file writes.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from memlm.runtime.threads import available_cores

VOCAB_SIZE = 320
#: pytest-xdist's worker processes (1 without it)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
WORDS = (
    "memory river stone light window garden letter silence morning candle winter harbour journey mirror shadow "
    "voice lantern meadow thunder feather silver orchard bridge"
).split()


def pytest_configure(config):
    """Without a GPU, Triton kernels run under Triton's interpreter on CPU tensors; it must be chosen before
    triton is first imported. Under pytest-xdist (``make test``) the workers share the cores: each takes its part
    of torch's threads, as OpenMP threads that outnumber the cores spin-wait for each other (``threads.py``)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if WORKERS > 1:
        torch.set_num_threads(max(1, available_cores() // WORKERS))


def pytest_collection_modifyitems(items):
    """Slow tests first: pytest-xdist's workers then finish together instead of one waiting on a late long test."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def free_threads() -> int:
    """Threads a subprocess the tests start (a ``memlm serve``) may use: the cores the suite's workers leave free."""
    return max(1, available_cores() - WORKERS * torch.get_num_threads())


def make_text(n_sentences: int = 400, seed: int = 0) -> str:
    """Plain English-like text: random sentences over a small vocabulary."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]))
    return " ".join(sentences)


@pytest.fixture(scope="session")
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with VOCAB_SIZE entries, trained on ``make_text``."""
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(make_text().split(". "), trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")


def document(length: int, seed: int = 0, low: int = 0, high: int = VOCAB_SIZE) -> torch.Tensor:
    """Random token ids [1, length] in [low, high), reproducible by seed."""
    return torch.randint(low, high, (1, length), generator=torch.Generator().manual_seed(seed))


def turn(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., n, d] by ``positions`` [n] by hand, as an independent RoPE reference: channel pairs
    (c, c + d/2) as complex numbers times e^(i * position * inv_freq), in float64; returned in x's dtype."""
    half = x.shape[-1] // 2
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def cut_cache_logits(model, ids: torch.Tensor, segment: int, xl: int, sinks: int = 0) -> torch.Tensor:
    """The model's own forward, one segment at a time, its DynamicCache cut after each to the document's first
    ``sinks`` and last ``xl`` tokens: the reference for evicting XL caches and attention sinks."""
    cache = transformers.DynamicCache(config=model.config)
    logits = []
    with torch.no_grad():
        for start in range(0, ids.shape[1], segment):
            chunk = ids[:, start : start + segment]
            positions = torch.arange(start, start + chunk.shape[1]).unsqueeze(0)
            logits.append(model(chunk, cache=cache, use_cache=True, position_ids=positions).logits)
            seen = start + chunk.shape[1]
            kept = sorted(set(range(min(sinks, seen))) | set(range(max(0, seen - xl), seen)))
            for layer in cache.layers:  # the cache holds every token seen since the last cut, in order
                held = sorted(set(range(min(sinks, start))) | set(range(max(0, start - xl), seen)))
                where = torch.tensor([held.index(p) for p in kept])
                layer.keys, layer.values = layer.keys[:, :, where], layer.values[:, :, where]
    return torch.cat(logits, dim=1)


def session_logits(mem_model, ids: torch.Tensor, chunks: list[int] | None = None) -> torch.Tensor:
    """Logits of ids [batch, tokens] fed through a fresh session, at once or in feeds of ``chunks`` tokens."""
    with mem_model.session(batch_size=ids.shape[0]) as session:
        if chunks is None:
            return session.feed(ids, return_logits=True).logits
        parts, start = [], 0
        for n in chunks:
            parts.append(session.feed(ids[:, start : start + n], return_logits=True).logits)
            start += n
        return torch.cat(parts, dim=1)


def _seeded(build):
    torch.manual_seed(0)
    return build().eval()


def build_tiny_llama() -> transformers.LlamaForCausalLM:
    """The ``tiny_llama`` fixture's model (for code that runs outside fixtures, e.g. spawned processes)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
    )
    return _seeded(lambda: transformers.LlamaForCausalLM(config))


@pytest.fixture
def tiny_llama() -> transformers.LlamaForCausalLM:
    return build_tiny_llama()


@pytest.fixture
def tiny_qwen2() -> transformers.Qwen2ForCausalLM:
    """Grouped-query attention: 4 query heads share 2 key/value heads."""
    config = transformers.Qwen2Config(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )
    return _seeded(lambda: transformers.Qwen2ForCausalLM(config))


@pytest.fixture
def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    """Absolute position embeddings (n_positions=256)."""
    config = transformers.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    return _seeded(lambda: transformers.GPT2LMHeadModel(config))


@pytest.fixture
def tiny_bart() -> transformers.BartForConditionalGeneration:
    config = transformers.BartConfig(
        vocab_size=VOCAB_SIZE, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=256,
    )
    return _seeded(lambda: transformers.BartForConditionalGeneration(config))


@pytest.fixture
def tiny_t5() -> transformers.T5ForConditionalGeneration:
    config = transformers.T5Config(
        vocab_size=VOCAB_SIZE, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0,
    )
    return _seeded(lambda: transformers.T5ForConditionalGeneration(config))


def stored(store, doc_id):
    """Everything stored for a document except its times: metadata, segments (ids, memory), the whole text, the
    stream state. (How the text is split between records depends on where uploads were cut, not the tokens.)"""
    document = store.document(doc_id).to_dict()
    del document["created"], document["updated"]
    segments = [(s.ids.tolist(), {layer: (k.tolist(), v.tolist()) for layer, (k, v) in s.memory.items()})
                for s in store.segments(doc_id)]
    text = b"".join(s.text for s in store.segments(doc_id))
    tensors, counters = store.state(doc_id)
    return document, segments, text, {name: t.tolist() for name, t in tensors.items()}, counters
