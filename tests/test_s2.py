"""LongLoRA's shifted sparse attention (memlm/kernels/shifted_sparse_attention.py) against a naive float64 loop."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from memlm import use_attention
from memlm.kernels import shifted_sparse_attention, shifted_sparse_attention_ref


def naive(q, k, v, group_size, visible=None):
    """Per head and query: softmax over keys j <= i of the same group (for the second half of the query heads,
    groups moved so the first is [0, ceil(G/2)), as LongLoRA's code rolls them), real keys only."""
    batch, q_heads, n, d = q.shape
    kv_heads = k.shape[1]
    out = torch.zeros(batch, q_heads, n, d, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            kv = h // (q_heads // kv_heads)
            offset = group_size // 2 if h >= q_heads // 2 else 0
            for i in range(n):
                keys = [j for j in range(i + 1) if (i + offset) // group_size == (j + offset) // group_size
                        and (visible is None or visible[b, j])]
                if not keys:
                    continue
                scores = torch.stack([q[b, h, i].double() @ k[b, kv, j].double() for j in keys]) / math.sqrt(d)
                weights = torch.softmax(scores, dim=0)
                out[b, h, i] = sum(w * v[b, kv, j].double() for w, j in zip(weights, keys, strict=True))
    return out


def inputs(q_heads, kv_heads, n, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, n, 8, generator=generator, dtype=dtype) for h in (q_heads, kv_heads, kv_heads)]


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 4), (4, 2), (8, 2), (4, 1), (6, 3)])  # MQA, odd kv heads
@pytest.mark.parametrize(("n", "group_size"), [(32, 8), (37, 8), (20, 20), (9, 2), (7, 7), (23, 5), (5, 8)])
def test_s2_equals_a_naive_loop(q_heads, kv_heads, n, group_size):
    q, k, v = inputs(q_heads, kv_heads, n, seed=n)
    expected = naive(q, k, v, group_size)
    torch.testing.assert_close(shifted_sparse_attention(q, k, v, group_size), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(shifted_sparse_attention_ref(q, k, v, group_size), expected, rtol=1e-10, atol=1e-10)


def test_padding_masks_keys_out():
    q, k, v = inputs(4, 2, 29)
    visible = torch.ones(2, 29, dtype=torch.bool)
    visible[0, :5] = False  # left padding
    visible[1, 20:] = False  # right padding
    out = shifted_sparse_attention(q, k, v, 8, key_padding_mask=visible)
    expected = naive(q, k, v, 8, visible)
    rows = visible[:, None, :, None]  # queries at padded positions are don't-cares
    torch.testing.assert_close(out * rows, expected * rows, rtol=1e-10, atol=1e-10)


def test_no_output_depends_on_a_later_token():
    """LongLoRA's roll-based shift wraps the end of the sequence to its start; nothing may leak here."""
    q, k, v = (t.requires_grad_() for t in inputs(4, 4, 24))
    for i in (0, 3, 11, 23):
        for t in (q, k, v):
            t.grad = None
        shifted_sparse_attention(q, k, v, 8)[:, :, i].sum().backward()
        for t in (q, k, v):
            assert (t.grad[:, :, i + 1 :] == 0).all()
        assert v.grad[:, :, : i + 1].abs().sum() > 0


def test_shifted_heads_see_across_the_unshifted_boundary():
    q, k, v = inputs(4, 4, 16)
    out = shifted_sparse_attention(q, k, v.clone(), 8)
    v2 = v.clone()
    v2[:, :, 4] += 1.0  # a token of the first unshifted group
    changed = (shifted_sparse_attention(q, k, v2, 8) - out).abs().amax(dim=(0, 3)) > 0  # [heads, n]
    assert not changed[:, :4].any()  # causal: nothing before it
    assert changed[:2, 4:8].all() and not changed[:2, 8:].any()  # unshifted heads: the rest of its group [0, 8)
    assert changed[2:, 4:12].all() and not changed[2:, 12:].any()  # shifted heads: group [4, 12), across 8


def test_bad_input_is_refused():
    q, k, v = inputs(4, 4, 16)
    for size in (0, -2, 1, 2.0, True):
        with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
            shifted_sparse_attention(q, k, v, size)
    with pytest.raises(ValueError, match="is causal"):
        shifted_sparse_attention(q, k, v, 4, causal=False)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[batch, n\]"):
        shifted_sparse_attention(q, k, v, 4, key_padding_mask=torch.ones(2, 15))


# ------------------------------------------------------------------------------------------ use_attention("s2")


def gqa_llama(attn_implementation="sdpa"):
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double()


@pytest.mark.parametrize("previous", ["sdpa", "eager"])
def test_use_attention_s2_trains_with_the_kernel_and_evaluates_with_full_attention(previous):
    model = gqa_llama(previous)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :6] = 0  # left padding
    with torch.no_grad():
        full = model.eval()(ids).logits
        full_padded = model(ids, attention_mask=mask).logits

        def reference(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kwargs):
            return shifted_sparse_attention_ref(q, k, v, 10, scale=scaling).transpose(1, 2), None

        transformers.AttentionInterface.register("test_s2_ref", reference)
        transformers.AttentionMaskInterface.register("test_s2_ref", transformers.masking_utils.sdpa_mask)
        model.set_attn_implementation("test_s2_ref")
        expected = model.train()(ids).logits
        model.set_attn_implementation(previous)

        assert use_attention(model, "s2", group_size_ratio=0.25) is model  # 40 / 4 = 10
        torch.testing.assert_close(model.train()(ids).logits, expected, rtol=1e-9, atol=1e-9)
        use_attention(model, "s2", group_size=10)
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-9, atol=1e-9)
        assert not torch.allclose(expected, full, atol=1e-6)  # grouping changes the training forward
        model.eval()  # inference: full attention, as LongLoRA infers
        torch.testing.assert_close(model(ids).logits, full, rtol=1e-9, atol=1e-9)
        real = mask.bool()
        if previous == "sdpa":  # (transformers' own float64 eager turns a left-padded row into NaN)
            torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], full_padded[real], rtol=1e-9,
                                       atol=1e-9)
        generated = model.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
        use_attention(model, None)
        assert model.config._attn_implementation == previous
        torch.testing.assert_close(model(ids).logits, full, rtol=0, atol=0)
        assert torch.equal(model.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0), generated)


def test_use_attention_s2_backward_and_bad_settings():
    model = gqa_llama()
    use_attention(model, "s2", group_size=8).train()
    ids = torch.randint(0, 300, (2, 30))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    cache = transformers.DynamicCache(config=model.config)
    model(ids, use_cache=True, cache=cache)
    with pytest.raises(ValueError, match="use_cache=False"):
        model(ids[:, :1], use_cache=True, cache=cache)
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        use_attention(model, "s2", group_size=1)
    with pytest.raises(ValueError, match="group_size_ratio must be a number in"):
        use_attention(model, "s2", group_size_ratio=0)


@pytest.mark.parametrize(("options", "group_size"), [({"group_size_ratio": 1.0}, 31), ({"group_size": 64}, 64),
                                                     ({"group_size_ratio": 0.25}, 7)])
def test_use_attention_s2_on_a_multi_query_model_and_odd_lengths(options, group_size):
    """One key/value head (MQA) and a 31-token sequence: the ratio 1 is one group of 31, a group longer than the
    sequence is one group too (the shifted heads: two), 31 / 4 is 7 (the official code's int())."""
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double().train()
    ids = torch.randint(0, 300, (2, 31), generator=torch.Generator().manual_seed(3))

    def reference(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return shifted_sparse_attention_ref(q, k, v, group_size, scale=scaling).transpose(1, 2), None

    transformers.AttentionInterface.register("test_s2_mqa_ref", reference)
    transformers.AttentionMaskInterface.register("test_s2_mqa_ref", transformers.masking_utils.sdpa_mask)
    model.set_attn_implementation("test_s2_mqa_ref")
    expected = model(ids).logits
    use_attention(model, "s2", **options)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-9, atol=1e-9)


def test_a_longlora_recipe_trains_with_s2_and_lora_embed_norm_and_saves_a_plain_model(tmp_path):
    from memlm.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model:\n"
        "  llama: {vocab_size: 320, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,\n"
        "          num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 16}\n"
        "extend: {method: linear, factor: 4}\n"
        "attention: {name: s2, group_size_ratio: 0.25}\n"
        "memory: {segment_length: 64, xl_length: 0, memory_layers: []}\n"
        "task: {name: associative_recall, pairs: 4, keys: 8, values: 8}\n"
        "train: {steps: 2, batch_size: 2, document_tokens: 64, trainable: lora_embed_norm, progress: false}\n"
    )
    assert main(["train", "--config", str(recipe), "--output", str(tmp_path / "run")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    names = [n for n, _ in model.named_parameters()]
    assert names and not any("lora_" in n or "base_layer" in n for n in names)  # LoRA merged into the weights
    assert model.config._attn_implementation in ("sdpa", "eager")


def test_a_session_over_an_s2_model_trains_with_s2_and_evaluates_with_full_attention():
    """memlm train streams documents through sessions: one whole segment per forward runs S2-Attn in training."""
    from memlm import MemoryConfig, attach

    model = gqa_llama()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(3))
    use_attention(model, "s2", group_size=10)
    with torch.no_grad():
        s2 = model.train()(ids).logits
        full = model.eval()(ids).logits
        mem_model = attach(model, MemoryConfig(segment_length=40, xl_length=0, memory_layers=()))
        for training, expected in ((True, s2), (False, full)):
            model.train(training)
            with mem_model.session(batch_size=2) as session:
                torch.testing.assert_close(session.feed(ids, return_logits=True).logits, expected, rtol=1e-9,
                                           atol=1e-9)
        mem_model.detach()
    assert not torch.allclose(s2, full, atol=1e-6)
