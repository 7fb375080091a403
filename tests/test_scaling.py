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
from memlm.positions.scaling import giraffe_frequencies

from conftest import document

TRAINED = 256


def llama(layers: int = 2, seed: int = 0) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TRAINED)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def default_frequencies(base: float = 10000.0, dim: int = 16) -> torch.Tensor:
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def paper_frequencies(method: str, kwargs: dict, trained: int = TRAINED, dim: int = 16,
                      base: float = 10000.0) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim / 2] float64, attention factor) as the papers and their reference code define them."""
    theta, s = default_frequencies(base, dim), kwargs["factor"]
    wavelength = 2 * math.pi / theta
    if method == "linear":  # Position Interpolation: positions x 1/s
        return theta / s, 1.0
    if method == "llama3":  # Meta's apply_scaling: keep short wavelengths, interpolate long ones, blend between
        low, high = kwargs["low_freq_factor"], kwargs["high_freq_factor"]
        smooth = (trained / wavelength - low) / (high - low)
        blended = (1 - smooth) * theta / s + smooth * theta
        return torch.where(wavelength < trained / high, theta,
                           torch.where(wavelength > trained / low, theta / s, blended)), 1.0
    if method == "yarn":
        # NTK-by-parts: r = L / wavelength; dimensions with r > beta keep theta, r < alpha take theta / s, and the
        # reference code ramps linearly in the dimension index between the floored / ceiled dimensions where
        # r = beta and r = alpha. Attention factor sqrt(1/t) = 0.1 ln s + 1.
        alpha, beta = kwargs.get("beta_slow", 1), kwargs.get("beta_fast", 32)
        r = trained / wavelength

        def dimension(rotations: float) -> float:
            return dim * math.log(trained / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = max(math.floor(dimension(beta)), 0), min(math.ceil(dimension(alpha)), dim - 1)
        interpolated = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        assert bool((interpolated[r > beta] == 0).all()) and bool((interpolated[r < alpha] == 1).all())
        return interpolated * theta / s + (1 - interpolated) * theta, 0.1 * math.log(s) + 1
    if method == "longrope":  # per-frequency rescale factors; attention factor sqrt(1 + ln s / ln L)
        factors = torch.tensor(kwargs["long_factor"], dtype=torch.float64)
        return theta / factors, math.sqrt(1 + math.log(s) / math.log(trained))
    raise AssertionError(method)


@pytest.mark.parametrize(("method", "kwargs"), [
    ("linear", {"factor": 4}),
    ("yarn", {"factor": 8, "beta_fast": 16, "beta_slow": 2}),
    ("yarn", {"factor": 4}),
    ("llama3", {"factor": 8, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    ("longrope", {"factor": 4, "short_factor": [1.0] * 8, "long_factor": [1.0 + i / 4 for i in range(8)]}),
])
def test_frequencies_follow_the_papers_formulas(method, kwargs):
    model = extend_context(llama(), method, **kwargs)
    rotary = model.model.rotary_emb
    assert model.config.rope_parameters["rope_type"] == method
    assert model.config.max_position_embeddings == TRAINED * kwargs["factor"]
    if method == "longrope":  # the short factors (here 1: the default rope) within the trained length, ...
        torch.testing.assert_close(rotary.inv_freq.double(), default_frequencies(), rtol=1e-6, atol=0)
        with torch.no_grad():
            model(document(TRAINED + 8))  # ... the long ones beyond it
    inv_freq, factor = paper_frequencies(method, kwargs)
    torch.testing.assert_close(rotary.inv_freq.double(), inv_freq, rtol=1e-6, atol=0)
    assert rotary.attention_scaling == pytest.approx(factor, rel=1e-9)


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


@pytest.mark.parametrize("power", [0.0, 0.5])
def test_giraffe_is_a_registered_rope_function_with_its_definition(power):
    model = extend_context(llama(), "giraffe", factor=4, truncate=64, power=power)
    assert ROPE_INIT_FUNCTIONS["giraffe"] is giraffe_frequencies
    assert model.config.rope_parameters["rope_type"] == "giraffe"
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


def llama31_style() -> transformers.LlamaForCausalLM:
    """A model that ships scaled, as Llama 3.1 does: llama3 rope, factor 8 over 64 trained tokens, window 512."""
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    return transformers.LlamaForCausalLM(config).eval()


def test_extending_an_extended_model_composes():
    llama3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
    model = llama31_style()
    with pytest.raises(ValueError, match=r"already scales with 'llama3' \(factor 8.0 over 64 trained tokens\); "
                                         r"'yarn' would replace that rule"):
        extend_context(model, "yarn", factor=2)
    assert model.config.rope_parameters["rope_type"] == "llama3" and model.config.max_position_embeddings == 512
    extend_context(model, "llama3", factor=2)  # the model's own rule, twice as far: factor 16 over 64
    assert model.config.rope_parameters["factor"] == 16 and model.config.max_position_embeddings == 1024
    assert model.config.rope_parameters["original_max_position_embeddings"] == 64
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(),
                               paper_frequencies("llama3", {"factor": 16, **llama3}, trained=64)[0], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"trained on 64 tokens .* original_max_position_embeddings=1024 contradicts"):
        extend_context(model, "llama3", factor=2, original_max_position_embeddings=1024)

    for method, kwargs in (("linear", {}), ("yarn", {"beta_fast": 16, "beta_slow": 2}), ("llama3", llama3)):
        twice = extend_context(extend_context(llama(), method, factor=2, **kwargs), method, factor=3)
        assert twice.config.max_position_embeddings == TRAINED * 6
        assert twice.config.original_max_position_embeddings == TRAINED  # recorded: the second call starts there
        once = extend_context(llama(), method, factor=6, **kwargs)
        assert twice.config.rope_parameters == once.config.rope_parameters
        torch.testing.assert_close(twice.model.rotary_emb.inv_freq, once.model.rotary_emb.inv_freq, rtol=0, atol=0)
        assert twice.model.rotary_emb.attention_scaling == once.model.rotary_emb.attention_scaling
    twice = extend_context(extend_context(llama(), "ntk", factor=2), "ntk", factor=2)  # two new bases: NTK x4
    assert twice.config.max_position_embeddings == TRAINED * 4
    torch.testing.assert_close(twice.model.rotary_emb.inv_freq.double(),
                               default_frequencies(10000.0 * 4 ** (16 / 14)), rtol=1e-6, atol=0)
    abf = extend_context(extend_context(llama(), "yarn", factor=4), "abf", rope_theta=5e5)  # new base, yarn kept
    assert abf.config.rope_parameters["rope_type"] == "yarn" and abf.config.max_position_embeddings == TRAINED * 4
    torch.testing.assert_close(abf.model.rotary_emb.inv_freq.double(),
                               paper_frequencies("yarn", {"factor": 4}, base=5e5)[0], rtol=1e-6, atol=0)


def test_every_rotary_module_is_rebuilt_in_place():
    """Whatever holds the model's rotary module (a SinkCache, use_attention's cap, a session) sees the new
    frequencies; models with a rotary module per layer get all of them rebuilt."""
    model = llama()
    rotary = model.model.rotary_emb
    extend_context(model, "longrope", factor=4, short_factor=[1.0] * 8, long_factor=[2.0] * 8)
    with torch.no_grad():
        model(document(TRAINED + 8))  # longrope caches its long frequencies on the module
    model.model.layers[0].own_rotary = copy.deepcopy(rotary)  # as older models carry one per attention layer
    extend_context(model, "abf", rope_theta=5e5)
    assert model.model.rotary_emb is rotary and rotary.rope_type == "longrope"
    for module in (rotary, model.model.layers[0].own_rotary):
        torch.testing.assert_close(module.inv_freq.double(), default_frequencies(5e5), rtol=1e-6, atol=0)
        assert not hasattr(module, "long_inv_freq")  # the old base's long frequencies are gone
    with torch.no_grad():
        model(document(TRAINED + 8))
    torch.testing.assert_close(rotary.inv_freq.double(), default_frequencies(5e5) / 2, rtol=1e-6, atol=0)


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
