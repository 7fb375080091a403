"""The test fixtures themselves: models build offline, run, and match the tokenizer's vocabulary."""

import pytest
import torch

from conftest import VOCAB_SIZE, make_text


def test_tokenizer_round_trips_text(tokenizer):
    text = make_text(3, seed=7)
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == VOCAB_SIZE
    assert max(ids) < VOCAB_SIZE
    assert len(ids) < len(text) / 2  # BPE really merged something


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2", "tiny_gpt2"])
def test_decoder_fixtures_are_seeded_and_run(name, request, tokenizer):
    model = request.getfixturevalue(name)
    again = request.getfixturevalue(name)  # fixtures are function-scoped: a fresh, identical model
    ids = torch.tensor([tokenizer("Memory river stone.")["input_ids"]])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], VOCAB_SIZE)
    assert torch.equal(logits, again(ids).logits)
    assert next(model.parameters()).dtype == torch.float32


def test_qwen2_fixture_uses_grouped_query_attention(tiny_qwen2):
    assert tiny_qwen2.config.num_key_value_heads < tiny_qwen2.config.num_attention_heads


@pytest.mark.parametrize("name", ["tiny_bart", "tiny_t5"])
def test_encoder_decoder_fixtures_run(name, request, tokenizer):
    model = request.getfixturevalue(name)
    ids = torch.tensor([tokenizer("Silver orchard bridge.")["input_ids"]])
    out = model(input_ids=ids, decoder_input_ids=ids[:, :3])
    assert out.logits.shape == (1, 3, VOCAB_SIZE)
