"""RoPE context extension (positions/scaling.py): frequencies against transformers' rope functions and the
papers' formulas (float64), streaming composes exactly, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from memlm import MemoryConfig, attach, extend_context
from memlm.cli import main

from conftest import document

TRAINED = 256


def llama(layers: int = 2, seed: int = 0) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TRAINED)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def default_frequencies(base: float = 10000.0, dim: int = 16) -> torch.Tensor:
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def transformers_frequencies(model, rope_parameters: dict, **kwargs):
    """What transformers' own rope function computes for a fresh config with these parameters."""
    config = copy.deepcopy(model.config)
    config.rope_parameters = dict(rope_parameters)
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, **kwargs)


@pytest.mark.parametrize(("method", "kwargs"), [
    ("linear", {"factor": 4}),
    ("yarn", {"factor": 8, "beta_fast": 16, "beta_slow": 2}),
    ("llama3", {"factor": 8, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    ("longrope", {"factor": 4, "short_factor": [1.0] * 8, "long_factor": [1.0 + i / 4 for i in range(8)]}),
])
def test_frequencies_equal_transformers_rope_functions(method, kwargs):
    model = llama()
    extend_context(model, method, **kwargs)
    rotary = model.model.rotary_emb
    assert model.config.rope_parameters["rope_type"] == method
    assert model.config.max_position_embeddings == TRAINED * kwargs["factor"]
    expected = {"rope_type": method, "rope_theta": 10000.0, **kwargs}
    if method != "linear":
        expected["original_max_position_embeddings"] = TRAINED
    inv_freq, scaling = transformers_frequencies(model, expected)
    torch.testing.assert_close(rotary.inv_freq, inv_freq, rtol=0, atol=0)
    assert rotary.attention_scaling == pytest.approx(scaling)
    if method == "linear":
        torch.testing.assert_close(rotary.inv_freq.double(), default_frequencies() / 4, rtol=1e-6, atol=0)
    if method == "yarn":  # the paper's attention factor 0.1 ln(s) + 1
        assert rotary.attention_scaling == pytest.approx(0.1 * math.log(8) + 1)


def test_static_ntk_abf_and_dynamic_ntk_follow_their_formulas():
    model = extend_context(llama(), "ntk", factor=4)
    dim = 16
    base = 10000.0 * 4 ** (dim / (dim - 2))
    assert model.config.rope_parameters == {"rope_theta": pytest.approx(base), "rope_type": "default"}
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(), default_frequencies(base), rtol=1e-6, atol=0)
    model = extend_context(llama(), "abf", rope_theta=500000.0)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(), default_frequencies(5e5), rtol=1e-6, atol=0)
    assert model.config.max_position_embeddings == TRAINED  # no factor: the trained length stays
    model = extend_context(llama(), "dynamic", factor=2)
    assert model.config.max_position_embeddings == TRAINED  # dynamic's formula reads it as the trained length
    with torch.no_grad():
        model(document(700))  # the base grows with the length seen
    length = 700
    grown = 10000.0 * (2 * length / TRAINED - 1) ** (dim / (dim - 2))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(), default_frequencies(grown), rtol=1e-5,
                               atol=0)
    inv_freq, _ = transformers_frequencies(model, model.config.rope_parameters, seq_len=length)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, inv_freq, rtol=1e-6, atol=0)


@pytest.mark.parametrize("power", [0.0, 0.5])
def test_giraffe_is_a_registered_rope_function_with_its_definition(power):
    model = extend_context(llama(), "giraffe", factor=4, truncate=64, power=power)
    assert ROPE_INIT_FUNCTIONS["giraffe"] is not None and model.config.rope_parameters["rope_type"] == "giraffe"
    i = torch.arange(8, dtype=torch.float64)
    expected = default_frequencies() / 4 * ((1 - i / 8) ** power if power else 1)
    cutoff = 2 * math.pi / 64
    expected = torch.where(expected < cutoff / 8, 0.0, torch.where(expected < cutoff, cutoff / 16, expected))
    assert (expected == 0).any() and (expected == cutoff / 16).any()  # both cuts bite
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(), expected, rtol=1e-6, atol=0)
    # a saved Giraffe model loads back through transformers' own machinery
    fresh = transformers.LlamaForCausalLM(copy.deepcopy(model.config))
    torch.testing.assert_close(fresh.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


@pytest.mark.parametrize(("method", "kwargs"), [("yarn", {"factor": 4}), ("giraffe", {"factor": 4, "truncate": 64})])
def test_streamed_in_absolute_mode_equals_the_models_full_forward(method, kwargs):
    """Beyond the trained length, with an XL cache covering the document: every key re-rotated with the extended
    frequencies, YaRN's attention factor in the keys once."""
    model = extend_context(llama(), method, **kwargs)
    ids = document(700, seed=3)
    with torch.no_grad():
        expected = model(ids).logits
    mem_model = attach(model, MemoryConfig(segment_length=64, xl_length=1024, memory_layers=(),
                                           position_mode="absolute"))
    with mem_model.session() as session:
        streamed = session.feed(ids, return_logits=True).logits
    torch.testing.assert_close(streamed, expected, atol=2e-4, rtol=0)


def test_dynamic_ntk_streamed_equals_the_full_forward_at_the_final_length():
    """One layer (keys from embeddings only): the last segment's logits are the full forward's, because the stream
    re-rotates every cached key with the final base (transformers' cache keeps the old base, its #25104)."""
    model = extend_context(llama(layers=1), "dynamic", factor=2)
    streamed_model = copy.deepcopy(model)
    ids = document(640, seed=4)
    with torch.no_grad():
        expected = model(ids).logits[:, -64:]
    mem_model = attach(streamed_model, MemoryConfig(segment_length=64, xl_length=1024, memory_layers=(),
                                                    position_mode="absolute"))
    with mem_model.session() as session:
        streamed = session.feed(ids, return_logits=True).logits[:, -64:]
    torch.testing.assert_close(streamed, expected, atol=2e-4, rtol=0)


def test_an_extended_model_composes_with_memory():
    model = extend_context(llama(), "yarn", factor=4)
    mem_model = attach(model, MemoryConfig(segment_length=32, xl_length=32, memory_layers=(1,), top_k=8))
    with mem_model.session() as session:
        session.feed(document(300, seed=5))
        assert session.state.knn.indexes[1].size.sum() > 0
        assert torch.equal(session.state.positions.inv_freq, model.model.rotary_emb.inv_freq)


def test_bad_input(tiny_gpt2):
    with pytest.raises(ValueError, match="unknown method 'rope'; methods: linear, abf, ntk, dynamic, yarn"):
        extend_context(llama(), "rope", factor=2)
    with pytest.raises(ValueError, match="factor must be a number > 0, got -1"):
        extend_context(llama(), "linear", factor=-1)
    with pytest.raises(ValueError, match="factor \\(the extension L'/L\\) is required"):
        extend_context(llama(), "yarn")
    with pytest.raises(ValueError, match="no rotary position embedding"):
        extend_context(tiny_gpt2, "linear", factor=2)
    with pytest.raises(ValueError, match="missing parameters \\['high_freq_factor'\\]"):
        extend_context(llama(), "llama3", factor=2, low_freq_factor=1.0)
    with pytest.raises(ValueError, match="missing parameters \\['rope_theta'\\]"):
        extend_context(llama(), "abf")
    with pytest.raises(ValueError, match="unknown parameters \\['beta'\\]; yarn takes factor, beta_fast"):
        extend_context(llama(), "yarn", factor=2, beta=3)
    with pytest.raises(ValueError, match="giraffe: factor must be a number >= 1"):
        extend_context(llama(), "giraffe", factor=0.5)
    with pytest.raises(ValueError, match="longrope: short_factor must be a list of 8 numbers"):
        extend_context(llama(), "longrope", factor=2, short_factor=[1.0], long_factor=[1.0] * 8)
    model = llama()
    mem_model = attach(model, MemoryConfig(segment_length=16, xl_length=16, memory_layers=(1,)))
    with pytest.raises(ValueError, match="before attach"):
        extend_context(model, "linear", factor=2)
    mem_model.detach()
    assert model.config.rope_parameters["rope_type"] == "default"  # nothing was changed by the refusals


def test_a_recipe_extends_then_trains(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model:\n"
        "  llama: {vocab_size: 320, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,\n"
        "          num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64}\n"
        "extend: {method: linear, factor: 4}\n"
        "memory: {segment_length: 16, xl_length: 16, memory_layers: []}\n"
        "task: {name: associative_recall, pairs: 4, keys: 8, values: 8}\n"
        "train: {steps: 2, batch_size: 2, document_tokens: 32, trainable: all, progress: false}\n"
    )
    assert main(["train", "--config", str(recipe), "--output", str(tmp_path / "run")]) == 0
    saved = transformers.AutoConfig.from_pretrained(tmp_path / "run" / "model")
    assert saved.rope_parameters["rope_type"] == "linear" and saved.max_position_embeddings == 256
    recipe.write_text(recipe.read_text().replace("{method: linear, factor: 4}", "{factor: 4}"))
    with pytest.raises(ValueError, match="extend needs a method"):
        main(["train", "--config", str(recipe), "--output", str(tmp_path / "run2")])
