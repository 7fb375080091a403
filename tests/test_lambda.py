"""LM-Infinite's Λ attention (memlm/kernels/lambda_attention.py) against a naive float64 masked softmax."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers

from memlm import MemoryConfig, attach, extend_context, use_attention
from memlm.kernels import lambda_attention, lambda_attention_ref
from memlm.runtime.implementations import attention_settings as model_settings

from conftest import turn


def naive(q, k, v, global_tokens, local_window):
    """Loops over queries: softmax over the keys j <= i with j < global_tokens or i - j < local_window."""
    _, hq, n, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros_like(q, dtype=torch.float64)
    for i in range(n):
        keys = [j for j in range(i + 1) if j < global_tokens or i - j < local_window]
        kk = k[:, :, keys].double().repeat_interleave(group, dim=1)
        vv = v[:, :, keys].double().repeat_interleave(group, dim=1)
        weights = torch.softmax(q[:, :, i : i + 1].double() @ kk.transpose(-1, -2) / math.sqrt(d), dim=-1)
        out[:, :, i] = (weights @ vv)[:, :, 0]
    return out


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 4), (4, 2)])
@pytest.mark.parametrize(("n", "global_tokens", "local_window"), [
    (37, 4, 8),     # n not a multiple of the window
    (40, 0, 8),     # no global branch: a sliding window
    (33, 5, 64),    # window >= n: causal attention
    (50, 50, 3),    # every key global: causal attention
    (29, 3, 1),     # each query: the global tokens and itself
])
def test_lambda_attention_equals_a_naive_masked_softmax(q_heads, kv_heads, n, global_tokens, local_window):
    generator = torch.Generator().manual_seed(n + global_tokens)
    q = torch.randn(2, q_heads, n, 8, generator=generator, dtype=torch.float64)
    k = torch.randn(2, kv_heads, n, 8, generator=generator, dtype=torch.float64)
    v = torch.randn(2, kv_heads, n, 8, generator=generator, dtype=torch.float64)
    expected = naive(q, k, v, global_tokens, local_window)
    torch.testing.assert_close(lambda_attention(q, k, v, global_tokens=global_tokens, local_window=local_window),
                               expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lambda_attention_ref(q, k, v, global_tokens=global_tokens, local_window=local_window),
                               expected, rtol=1e-12, atol=1e-12)
    for last in (1, 7):  # decoding with a cache: the last queries over all the keys
        torch.testing.assert_close(lambda_attention(q[:, :, -last:], k, v, global_tokens=global_tokens,
                                                    local_window=local_window), expected[:, :, -last:],
                                   rtol=1e-12, atol=1e-12)
    if local_window >= n or global_tokens >= n:
        causal = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(q_heads // kv_heads, 1), v.repeat_interleave(q_heads // kv_heads, 1),
            is_causal=True)
        torch.testing.assert_close(expected, causal, rtol=1e-12, atol=1e-12)


def test_float32_and_gradients_equal_autograd_through_the_dense_reference():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=generator, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(lambda_attention(q.float(), k.float(), v.float(), global_tokens=4, local_window=16),
                               naive(q, k, v, 4, 16).float(), rtol=1e-5, atol=1e-5)
    weights = torch.randn(1, 2, 70, 16, generator=generator, dtype=torch.float64)
    gradients = []
    for attention in (lambda *t: lambda_attention(*t, global_tokens=4, local_window=16), lambda *t: naive(*t, 4, 16)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (attention(*leaves) * weights).sum().backward()
        gradients.append([t.grad for t in leaves])
    for ours, dense in zip(*gradients, strict=True):
        torch.testing.assert_close(ours, dense, rtol=1e-10, atol=1e-10)


def test_bad_input():
    q = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match="local_window must be an integer >= 1, got 0"):
        lambda_attention(q, q, q, global_tokens=2, local_window=0)
    with pytest.raises(ValueError, match="global_tokens must be an integer >= 0, got -1"):
        lambda_attention(q, q, q, global_tokens=-1, local_window=4)
    with pytest.raises(ValueError, match="self-attention"):
        lambda_attention(q, torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4), global_tokens=2, local_window=4)


# ------------------------------------------------------------------- the distance cap and use_attention


def naive_capped(q0, k0, v, positions, inv_freq, global_tokens, local_window, cap, scale):
    """Λ attention of unrotated q0 [b, hq, n, d], k0, v [b, hkv, n, d]: visible pairs farther than ``cap`` are
    scored with the query at position ``cap`` and the key at 0, the others at their own positions."""
    group = q0.shape[1] // k0.shape[1]
    k0, v = (t.double().repeat_interleave(group, dim=1) for t in (k0, v))
    n = q0.shape[2]
    exact = turn(q0, positions, inv_freq) @ turn(k0, positions, inv_freq).transpose(-1, -2)
    at_cap = turn(q0, torch.full((n,), cap), inv_freq) @ k0.transpose(-1, -2)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    scores = torch.where(i - j >= cap, at_cap, exact) * scale
    visible = (j <= i) & ((j < global_tokens) | (i - j < local_window))
    return torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1) @ v


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 4), (4, 2)])
def test_capped_global_pairs_score_as_if_at_the_cap(q_heads, kv_heads):
    generator = torch.Generator().manual_seed(1)
    n, d, global_tokens, window, cap = 45, 8, 4, 6, 10
    q0 = torch.randn(2, q_heads, n, d, generator=generator, dtype=torch.float64)
    k0 = torch.randn(2, kv_heads, n, d, generator=generator, dtype=torch.float64)
    v = torch.randn(2, kv_heads, n, d, generator=generator, dtype=torch.float64)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    positions = torch.arange(n)
    out = lambda_attention(turn(q0, positions, inv_freq), turn(k0, positions, inv_freq), v, global_tokens=global_tokens,
                           local_window=window, distance_cap=cap, capped_q=turn(q0, torch.full((n,), cap), inv_freq),
                           capped_k=k0[:, :, :global_tokens])
    expected = naive_capped(q0, k0, v, positions, inv_freq, global_tokens, window, cap, d**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    uncapped = lambda_attention(turn(q0, positions, inv_freq), turn(k0, positions, inv_freq), v,
                                global_tokens=global_tokens, local_window=window)
    assert (out - uncapped).abs().max() > 1e-3  # the cap changes what far queries read
    with pytest.raises(ValueError, match="distance_cap must be an integer >= local_window"):
        lambda_attention(q0, k0, v, global_tokens=4, local_window=6, distance_cap=5, capped_q=q0,
                         capped_k=k0[:, :, :4])
    with pytest.raises(ValueError, match="needs capped_q shaped like q"):
        lambda_attention(q0, k0, v, global_tokens=4, local_window=6, distance_cap=10)


def gqa_llama():
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double().eval()


def test_use_attention_lambda_runs_the_capped_pattern_in_a_model_and_restores_it():
    model = gqa_llama()
    ids = torch.randint(0, 300, (2, 53), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids).logits
        inv_freq = model.model.rotary_emb.inv_freq

        def reference(module, q, k, v, mask, scaling=None, dropout=0.0, position_ids=None, **kwargs):
            positions = position_ids[0]
            q0, k0 = turn(q, -positions, inv_freq), turn(k, -positions, inv_freq)  # back to position 0
            return naive_capped(q0, k0, v, positions, inv_freq, 3, 8, 12, scaling).transpose(1, 2), None

        transformers.AttentionInterface.register("test_naive_lambda", reference)
        transformers.AttentionMaskInterface.register("test_naive_lambda",
                                                     transformers.masking_utils.sdpa_mask)
        model.set_attn_implementation("test_naive_lambda")
        expected = model(ids).logits
        model.set_attn_implementation("sdpa")

        assert use_attention(model, "lambda", global_tokens=3, local_window=8, distance_cap=12) is model
        assert model.config._attn_implementation == "memlm_lambda"
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-9, atol=1e-9)
        use_attention(model, "lambda", global_tokens=0, local_window=64)  # window >= n: causal attention
        torch.testing.assert_close(model(ids).logits, plain, rtol=1e-9, atol=1e-9)
        use_attention(model, None)
        assert model.config._attn_implementation == "sdpa"
        torch.testing.assert_close(model(ids).logits, plain, rtol=0, atol=0)
        use_attention(model, None)  # nothing to restore: unchanged


def test_the_distance_cap_rotates_with_the_frequencies_of_each_forward():
    """The model is extended after use_attention chose the cap, with dynamic NTK: at 64 tokens over a trained 32 its
    base is theta (2 x 64 / 32 - 1) ** (d / (d - 2)). The reference: a model with that base from the start."""
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double().eval()
    reference = copy.deepcopy(model)
    settings = {"global_tokens": 3, "local_window": 8, "distance_cap": 12}
    use_attention(model, "lambda", **settings)
    extend_context(model, "dynamic", factor=2)
    extend_context(reference, "abf", rope_theta=10000.0 * (2 * 64 / 32 - 1) ** (16 / 14))
    use_attention(reference, "lambda", **settings)
    ids = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_the_papers_setting_is_the_default_and_decoding_with_a_cache_equals_the_whole_sequence():
    model = gqa_llama()  # pretrained on 256 tokens
    use_attention(model, "lambda")
    settings = model_settings(model)
    assert (settings.global_tokens, settings.local_window, settings.distance_cap) == (10, 256, 256)
    use_attention(model, "lambda", local_window=300)
    assert model_settings(model).distance_cap == 300  # the cap is never inside the window
    use_attention(model, "lambda", global_tokens=3, local_window=8, distance_cap=12)
    ids = torch.randint(0, 300, (2, 41), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
        cache = transformers.DynamicCache(config=model.config)
        prefill = model(ids[:, :17], past_key_values=cache, use_cache=True).logits  # then one query at a time
        steps = [model(ids[:, i: i + 1], past_key_values=cache, use_cache=True).logits for i in range(17, 41)]
        generated = model.generate(ids[:, :30], max_new_tokens=4, do_sample=False)
        recomputed = ids[:, :30]
        for _ in range(4):  # greedy decoding by whole-sequence forwards
            recomputed = torch.cat((recomputed, model(recomputed).logits[:, -1:].argmax(-1)), dim=1)
    torch.testing.assert_close(torch.cat((prefill, *steps), dim=1), expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(generated, recomputed)


def test_use_attention_lambda_trains(tiny_llama):
    use_attention(tiny_llama, "lambda", global_tokens=2, local_window=5, distance_cap=9)
    tiny_llama.train()
    ids = torch.randint(0, 100, (2, 30))
    tiny_llama(ids, labels=ids).loss.backward()
    grads = [p.grad for p in tiny_llama.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_use_attention_refuses_what_it_cannot_do(tiny_llama, tiny_gpt2):
    with pytest.raises(ValueError, match=r"unknown attention implementation 'nope'"):
        use_attention(tiny_llama, "nope")
    with pytest.raises(ValueError, match=r"options: .*unexpected keyword argument 'window'"):
        use_attention(tiny_llama, "lambda", window=3)
    with pytest.raises(ValueError, match="must be >= local_window"):
        use_attention(tiny_llama, "lambda", local_window=16, distance_cap=8)
    with pytest.raises(ValueError, match="local_window must be an integer >= 1"):
        use_attention(tiny_llama, "lambda", local_window=0)
    with pytest.raises(ValueError, match="takes no options"):
        use_attention(tiny_llama, None, local_window=3)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        use_attention(object(), "lambda")
    with pytest.raises(ValueError, match="needs a rotary model"):
        use_attention(tiny_gpt2, "lambda", distance_cap=4096)
    use_attention(tiny_llama, "lambda", global_tokens=2, local_window=4)
    ids = torch.randint(0, 100, (2, 12))
    with pytest.raises(ValueError, match="unpadded batches"):
        tiny_llama(ids, attention_mask=torch.ones(2, 12, dtype=torch.long).index_fill_(1, torch.tensor([0]), 0))
    use_attention(tiny_llama, None)
    mem_model = attach(tiny_llama, MemoryConfig(segment_length=8, xl_length=8, memory_layers=(1,)))
    with pytest.raises(ValueError, match="detach it from memlm first"):
        use_attention(mem_model.model, "lambda")
    mem_model.detach()
