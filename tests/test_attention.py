"""The registered attention functions route: outside a session they are the model's own implementation, inside
they honour every argument transformers passes (sliding window, softcap, sinks, dropout) or refuse it."""

from __future__ import annotations

import pytest
import torch
import transformers

from memlm import MemoryConfig, attach
from memlm.runtime.model import layer_devices

from conftest import VOCAB_SIZE, document, session_logits

SMALL = {"vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}


def build(config_class, model_class, attn_implementation="sdpa", **overrides):
    torch.manual_seed(0)
    model = model_class(config_class(**{**SMALL, **overrides}))
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def full_memory(**overrides) -> MemoryConfig:
    """Every earlier token retrieved at its true distance in one softmax: exactly full attention."""
    return MemoryConfig(**{"segment_length": 16, "xl_length": 0, "memory_layers": (0, 1), "fusion": "joint",
                           "memory_positions": "original", "top_k": 160, "memory_capacity": 160, **overrides})


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_outside_a_session_an_attached_model_is_bit_for_bit_the_model(implementation):
    model = build(transformers.LlamaConfig, transformers.LlamaForCausalLM, implementation)
    ids = document(40, seed=1)
    with torch.no_grad():
        before = model(ids).logits
        mem_model = attach(model, MemoryConfig(segment_length=16, xl_length=16, memory_layers=(0,)))
        assert model.config._attn_implementation.startswith("memlm")
        after = model(ids).logits
        assert torch.equal(after, before)
        mem_model.detach()
        assert model.config._attn_implementation == implementation and torch.equal(model(ids).logits, before)


def test_a_sliding_window_is_honoured_in_every_layer():
    """Mistral with a window of 12 streamed with an XL cache of 64: the model's own forward, memory layer or not."""
    model = build(transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=12)
    ids = document(150, seed=2)
    expected = model(ids).logits
    assert not torch.allclose(expected, build(transformers.MistralConfig, transformers.MistralForCausalLM,
                                              sliding_window=None)(ids).logits, atol=1e-3)  # the window matters
    for memory_layers in ((), (0, 1)):  # a memory layer's local block slides the window too (gate closed)
        config = MemoryConfig(segment_length=16, xl_length=64, memory_layers=memory_layers, gate_init=-40.0,
                              top_k=4, memory_capacity=64)
        mem_model = attach(model, config)
        torch.testing.assert_close(session_logits(mem_model, ids), expected, atol=1e-4, rtol=0)
        mem_model.detach()


def sharpen(model, factor: float = 8.0):
    """Scale query and key projections so that attention logits are large (a random tiny model's are ~0)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(factor)
    return model


def test_softcapped_scores_are_capped_in_local_and_memory_blocks():
    options = {"head_dim": 16, "final_logit_softcapping": None, "sliding_window": 4096}
    model = sharpen(build(transformers.Gemma2Config, transformers.Gemma2ForCausalLM, "eager",
                          attn_logit_softcapping=2.0, **options))
    uncapped = sharpen(build(transformers.Gemma2Config, transformers.Gemma2ForCausalLM, "eager",
                             attn_logit_softcapping=None, **options))
    ids = document(100, seed=3)
    expected = model(ids).logits
    assert not torch.allclose(expected, uncapped(ids).logits, atol=1e-2)  # the cap matters
    mem_model = attach(model, full_memory())
    torch.testing.assert_close(session_logits(mem_model, ids), expected, atol=1e-4, rtol=0)


def test_learned_sinks_join_the_softmax_of_local_and_memory_keys():
    model = build(transformers.GptOssConfig, transformers.GptOssForCausalLM, "eager", head_dim=16,
                  num_local_experts=2, num_experts_per_tok=1, sliding_window=4096)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                module.sinks.copy_(torch.linspace(-1.0, 2.0, module.sinks.numel()))
    ids = document(100, seed=4)
    expected = model(ids).logits
    mem_model = attach(model, full_memory())
    torch.testing.assert_close(session_logits(mem_model, ids), expected, atol=1e-4, rtol=0)


def test_dropout_reaches_memory_and_plain_layers_in_training_only():
    model = build(transformers.LlamaConfig, transformers.LlamaForCausalLM, attention_dropout=0.5)
    ids = document(48, seed=5)
    mem_model = attach(model, MemoryConfig(segment_length=16, xl_length=16, memory_layers=(1,), top_k=4,
                                           memory_capacity=64))
    torch.testing.assert_close(session_logits(mem_model, ids), session_logits(mem_model, ids), atol=0, rtol=0)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(session_logits(mem_model, ids), session_logits(mem_model, ids))
    model.eval()


def test_unknown_attention_arguments_and_implementations_are_refused():
    model = build(transformers.LlamaConfig, transformers.LlamaForCausalLM)
    mem_model = attach(model, MemoryConfig(segment_length=16, xl_length=16, memory_layers=(0,)))
    with mem_model.session() as session, pytest.raises(ValueError, match=r"does not know: \['novel_argument'\]"):
        session.mem_model.model(document(4), position_ids=session.state.begin(4), memlm_state=session.state,
                                novel_argument=1)
    mem_model.detach()
    flex = build(transformers.LlamaConfig, transformers.LlamaForCausalLM)
    flex.config._attn_implementation = "flex_attention"  # as from_pretrained(attn_implementation=...) sets it
    with pytest.raises(ValueError, match=r"attention implementation is one of .*got 'flex_attention'"):
        attach(flex, MemoryConfig(memory_layers=(0,)))
    assert not hasattr(flex, "memlm_memory")


def test_each_layer_is_placed_on_the_device_of_its_attention():
    model = build(transformers.LlamaConfig, transformers.LlamaForCausalLM)
    model.model.layers[1].to("meta")  # as if dispatched over two devices (device_map="auto")
    assert layer_devices(model, 2) == {0: torch.device("cpu"), 1: torch.device("meta")}
