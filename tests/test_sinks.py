"""Attention sinks in the streaming runtime (StreamingLLM; LM-Infinite's global branch): MemoryConfig(sink_tokens=n).

The reference is transformers' own model fed one segment per forward with a ``DynamicCache`` cut, after each
segment, to exactly the document's first ``n`` tokens and its last ``xl_length`` tokens (``cut_cache_logits``).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from memlm import CrossBatch, MemoryConfig, SinkCache, attach, extend_context, use_attention
from memlm.positions.policy import PositionPolicy

from conftest import VOCAB_SIZE, cut_cache_logits, document, session_logits, turn


def gqa_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("sinks", [1, 4, 13])
def test_sinks_in_absolute_mode_equal_transformers_with_the_first_and_last_tokens_cached(sinks):
    model = gqa_llama()
    segment, xl = 8, 8
    ids = document(61, seed=3)  # not a multiple of the segment
    expected = cut_cache_logits(model, ids, segment, xl, sinks)
    without = cut_cache_logits(model, ids, segment, xl, 0)
    assert not torch.allclose(expected[:, -8:], without[:, -8:], atol=1e-3)  # the sinks change what is seen
    mem_model = attach(model, MemoryConfig(segment_length=segment, xl_length=xl, memory_layers=(), sink_tokens=sinks,
                                           position_mode="absolute"))
    torch.testing.assert_close(session_logits(mem_model, ids), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(session_logits(mem_model, ids, chunks=[3, 20, 1, 37]), expected, atol=1e-4, rtol=0)


def test_rebase_puts_the_sinks_at_zero_and_the_window_right_after_them():
    policy = PositionPolicy("rebase", "first", rotary=None)
    assert policy.local_positions(local_start=40, first=0, n=7, device="cpu", sinks=3).tolist() == list(range(7))
    assert policy.frame(40, sinks=3) == 3  # memory entries stand between the sinks and the XL cache
    absolute = PositionPolicy("absolute", "first", rotary=None)
    assert absolute.local_positions(40, 0, 7, "cpu", sinks=3).tolist() == [0, 1, 2, 40, 41, 42, 43]
    assert absolute.frame(40, sinks=3) == 40


def test_with_memory_no_token_is_both_a_sink_or_local_and_in_memory():
    model = gqa_llama()
    mem_model = attach(model, MemoryConfig(segment_length=8, xl_length=8, memory_layers=(1,), sink_tokens=5,
                                           top_k=4, memory_capacity=1024))
    with torch.no_grad(), mem_model.session() as session:
        for n in (3, 17, 9, 30):
            session.feed(document(n, seed=n))
            local = session.state.local
            if local.local_start > 5:
                keys, _, first = session.state.knn.entries(1)
                # memory holds exactly the tokens between the sinks and the XL cache, each once, in order
                assert local.sink_length == 5 and first == 5 and first + keys.shape[1] == local.local_start
            assert local.length == local.sink_length + local.cache_length + local.open_length


def test_persistence_keeps_the_sinks():
    model = gqa_llama()
    mem_model = attach(model, MemoryConfig(segment_length=8, xl_length=8, memory_layers=(), sink_tokens=4,
                                           position_mode="rebase"))
    ids = document(70, seed=5)
    expected = session_logits(mem_model, ids)
    with torch.no_grad(), mem_model.session() as session:
        session.feed(ids[:, :40])
        tensors, counters = session.state.state_dict()
    assert counters["sink_length"] == 4
    with torch.no_grad(), mem_model.session() as session:
        session.state.load_state_dict(tensors, counters)
        rest = session.feed(ids[:, 40:], return_logits=True).logits
    torch.testing.assert_close(rest, expected[:, 40:], atol=1e-5, rtol=0)


def test_bad_sink_settings_are_refused():
    with pytest.raises(ValueError, match="sink_tokens must be an integer >= 0"):
        MemoryConfig(sink_tokens=-1)
    with pytest.raises(ValueError, match="sink_tokens with rmt_tokens"):
        MemoryConfig(sink_tokens=4, rmt_tokens=2)


# ------------------------------------------------------------------------------------------ SinkCache


def naive_sink_decoding(model, prompt: torch.Tensor, steps: int, sinks: int, window: int) -> list[torch.Tensor]:
    """Greedy decoding that, after every forward, cuts a DynamicCache to the first ``sinks`` and last ``window``
    entries and moves them by hand to positions 0 .. kept-1; the next token stands at position kept."""
    inv_freq = model.model.rotary_emb.inv_freq
    cache = transformers.DynamicCache(config=model.config)
    where = []  # the position each cached entry is rotated to
    tokens, positions, scores = prompt, torch.arange(prompt.shape[1])[None], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(tokens, cache=cache, use_cache=True, position_ids=positions).logits[:, -1]
            scores.append(logits)
            where += positions[0].tolist()
            keep = sorted(set(range(min(sinks, len(where)))) | set(range(max(0, len(where) - window), len(where))))
            delta = torch.tensor([j - where[i] for j, i in enumerate(keep)])
            for layer in cache.layers:
                layer.keys = turn(layer.keys[:, :, keep], delta, inv_freq)
                layer.values = layer.values[:, :, keep]
            where = list(range(len(keep)))
            tokens, positions = logits.argmax(-1, keepdim=True), torch.tensor([[len(keep)]])
    return scores


@pytest.mark.parametrize(("sinks", "window"), [(4, 8), (0, 6), (3, 40)])
def test_sink_cache_generation_equals_a_naive_recompute_of_the_same_tokens_at_the_same_positions(sinks, window):
    model = gqa_llama()
    prompt = document(21, seed=8)
    expected = naive_sink_decoding(model, prompt, 30, sinks, window)
    cache = SinkCache(model, sink_tokens=sinks, window=window)
    with torch.no_grad():
        out = model.generate(prompt, cache=cache, max_new_tokens=30, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    for step, (got, want) in enumerate(zip(out.logits, expected, strict=True)):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0, msg=f"step {step}")
    assert all(layer.keys.shape[2] == min(sinks + window, 50) for layer in cache.layers)  # bounded
    assert cache.get_seq_length() == 50
    if window < 40:  # the window slid: plain generation differs
        plain = model.generate(prompt, max_new_tokens=30, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        assert not torch.allclose(plain.logits[-1], out.logits[-1], atol=1e-3)


def test_sink_cache_unrotates_keys_with_the_frequencies_they_were_rotated_with():
    """Dynamic NTK changes the frequencies as the sequence grows past the trained length (32), and the extension
    comes after the cache was made: the kept keys must still be k_proj's output (unrotated; transformers rotates
    with float32 angles, hence 1e-6)."""
    config = transformers.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double().eval()
    cache = SinkCache(model, sink_tokens=4, window=64)
    extend_context(model, "dynamic", factor=2)
    ids = document(40, seed=1)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        layer = model.model.layers[0]
        keys = layer.self_attn.k_proj(layer.input_layernorm(model.model.embed_tokens(ids)))
    torch.testing.assert_close(cache.layers[0].keys, keys.view(1, 40, 2, 16).transpose(1, 2), rtol=0, atol=1e-6)


def test_sink_cache_refuses_bad_settings(tiny_gpt2):
    model = gqa_llama()
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        SinkCache(model, sink_tokens=4, window=0)
    with pytest.raises(ValueError, match="sink_tokens must be an integer >= 0"):
        SinkCache(model, sink_tokens=-1)
    with pytest.raises(ValueError, match="needs a rotary model"):
        SinkCache(tiny_gpt2)


# ------------------------------------------------------------------------------------------ distance cap


@pytest.mark.parametrize(("sinks", "window", "cap"), [(3, 6, 10), (1, 4, 4), (5, 8, 30)])
def test_streamed_sinks_with_a_distance_cap_equal_the_capped_lambda_attention(sinks, window, cap):
    """One token per segment and an XL cache of window - 1: every query sees the sinks and the last ``window``
    tokens, Λ-attention's pattern; at absolute positions with the cap, both must score every pair alike."""
    model = gqa_llama().double()
    ids = document(41, seed=2)
    with torch.no_grad():
        use_attention(model, "lambda", global_tokens=sinks, local_window=window, distance_cap=cap)
        expected = model(ids).logits
        use_attention(model, None)
    streamed = {}
    for name, distance_cap in (("capped", cap), ("uncapped", None)):
        config = MemoryConfig(segment_length=1, xl_length=window - 1, memory_layers=(), sink_tokens=sinks,
                              position_mode="absolute", distance_cap=distance_cap)
        mem_model = attach(model, config)
        streamed[name] = session_logits(mem_model, ids)
        mem_model.detach()
    torch.testing.assert_close(streamed["capped"], expected, atol=1e-9, rtol=0)
    if cap < 40:  # pairs farther than the cap exist: capping changes the scores
        assert not torch.allclose(streamed["uncapped"][:, -5:], expected[:, -5:], atol=1e-6)


def test_the_cap_moves_far_memory_entries_to_the_cap():
    model = gqa_llama()
    config = MemoryConfig(segment_length=4, xl_length=4, memory_layers=(1,), sink_tokens=2, distance_cap=6,
                          position_mode="absolute")
    mem_model = attach(model, config)
    with torch.no_grad(), mem_model.session() as session:
        session.feed(document(30, seed=1))
        state = session.state
        frame = state.positions.frame(state.local.local_start, state.local.sink_length)
        keys = torch.randn(1, 4, 2, 3, 16)  # [batch, q_heads, queries, top_k, d], at the frame
        queries = torch.tensor([frame + 3, frame + 20])
        moved = state.capped_memory(keys, queries)
    torch.testing.assert_close(moved[:, :, 0], keys[:, :, 0])  # within the cap: stays at the frame
    torch.testing.assert_close(moved[:, :, 1], state.positions.rotate(keys[:, :, 1], 20 - 6))  # 6 before its query


def test_bad_cap_settings_are_refused(tiny_gpt2):
    with pytest.raises(ValueError, match="distance_cap must be None or an integer >= 1"):
        MemoryConfig(distance_cap=0)
    with pytest.raises(ValueError, match="memory_positions='first'"):
        MemoryConfig(distance_cap=64, memory_positions="original")
    with pytest.raises(ValueError, match="needs a rotary model"):
        attach(tiny_gpt2, MemoryConfig(segment_length=8, xl_length=0, memory_layers=(), distance_cap=16))
    mem_model = attach(gqa_llama(), MemoryConfig(segment_length=8, memory_layers=(1,), fusion="joint", distance_cap=16))
    with pytest.raises(ValueError, match="no CrossBatch training"):
        mem_model.session(batch_size=2, crossbatch=CrossBatch(1, 1))
