"""The streaming runtime: equivalence with full recomputation, gates, FIFO memory, generation, detach."""

from __future__ import annotations

import pytest
import torch
import transformers

from memlm import MemoryConfig, attach
from memlm.index import TorchIndex

from conftest import document, session_logits

DECODERS = ["tiny_llama", "tiny_qwen2", "tiny_gpt2"]
ATOL = 1e-4


def streamed_logits(model, config: MemoryConfig, ids: torch.Tensor, chunks: list[int] | None = None) -> torch.Tensor:
    """Logits of ids streamed through ``model`` with ``config`` attached for this call only."""
    mem_model = attach(model, config)
    try:
        return session_logits(mem_model, ids, chunks)
    finally:
        mem_model.detach()


def absolute_if_gpt2(name: str) -> str:
    return "absolute" if name == "tiny_gpt2" else "rebase"


@pytest.mark.parametrize("name", DECODERS)
def test_one_segment_without_memory_equals_the_plain_model(name, request):
    model = request.getfixturevalue(name)
    ids = document(60)
    config = MemoryConfig(segment_length=64, xl_length=0, memory_layers=())
    torch.testing.assert_close(streamed_logits(model, config, ids), model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_xl_cache_streaming_equals_one_full_forward(name, request):
    model = request.getfixturevalue(name)
    ids = document(150, seed=1)
    config = MemoryConfig(segment_length=16, xl_length=200, memory_layers=(), position_mode=absolute_if_gpt2(name))
    torch.testing.assert_close(streamed_logits(model, config, ids), model(ids).logits, atol=ATOL, rtol=0)


# GPT-2 only in absolute mode: its position embeddings make rebased segments differ from a full forward.
@pytest.mark.parametrize(
    ("name", "position_mode"),
    [(name, mode) for name in DECODERS for mode in ("rebase", "absolute") if (name, mode) != ("tiny_gpt2", "rebase")],
)
def test_knn_memory_with_joint_fusion_equals_one_full_forward(name, position_mode, request):
    model = request.getfixturevalue(name)
    ids = document(150, seed=2)
    config = MemoryConfig(segment_length=16, xl_length=0, memory_layers=(0, 1), fusion="joint",
                          memory_positions="original", top_k=160, memory_capacity=160, position_mode=position_mode)
    torch.testing.assert_close(streamed_logits(model, config, ids), model(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_xl_cache_and_memory_together_equal_a_full_forward(name, request):
    """Tokens leave the XL cache and enter memory at the same moment: none is lost or attended twice."""
    model = request.getfixturevalue(name)
    ids = document(150, seed=3)
    config = MemoryConfig(segment_length=16, xl_length=24, memory_layers=(0, 1), fusion="joint",
                          memory_positions="original", top_k=160, memory_capacity=160,
                          position_mode=absolute_if_gpt2(name))
    torch.testing.assert_close(streamed_logits(model, config, ids), model(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_feeding_in_pieces_equals_feeding_at_once(name, request):
    """Segments are cut by the stream, not by feed calls: any split gives the same logits."""
    model = request.getfixturevalue(name)
    ids = document(120, seed=4)
    config = MemoryConfig(segment_length=16, xl_length=20, memory_layers=(-1,), top_k=4, memory_capacity=64,
                          position_mode="absolute" if name == "tiny_gpt2" else "rebase")
    whole = streamed_logits(model, config, ids)
    torch.testing.assert_close(streamed_logits(model, config, ids, chunks=[5, 1, 30, 17, 16, 51]), whole,
                               atol=ATOL, rtol=0)


def test_gate_closed_equals_xl_only_and_gate_open_ignores_local_context(tiny_llama):
    ids = document(96, seed=5)
    xl_only = streamed_logits(tiny_llama, MemoryConfig(segment_length=16, xl_length=16, memory_layers=()), ids)
    closed = MemoryConfig(segment_length=16, xl_length=16, memory_layers=(0, 1), top_k=8, gate_init=-30.0)
    torch.testing.assert_close(streamed_logits(tiny_llama, closed, ids), xl_only, atol=1e-5, rtol=0)

    # Gate open, no XL cache, every layer a memory layer: from segment 2 on, every token's attention reads
    # memory only, so a token's logits depend on itself and on earlier segments, not on its neighbours.
    opened = MemoryConfig(segment_length=16, xl_length=0, memory_layers=(0, 1), top_k=8, gate_init=30.0)
    base = streamed_logits(tiny_llama, opened, ids)
    neighbour_changed = ids.clone()
    neighbour_changed[0, 20] = (ids[0, 20] + 1) % 320
    changed = streamed_logits(tiny_llama, opened, neighbour_changed)
    others = [i for i in range(16, 32) if i != 20]
    torch.testing.assert_close(changed[:, others], base[:, others], atol=1e-5, rtol=0)
    assert not torch.allclose(changed[:, 20], base[:, 20])
    earlier_changed = ids.clone()
    earlier_changed[0, 3] = (ids[0, 3] + 1) % 320  # segment 1 reaches segment 2 through memory only
    assert not torch.allclose(streamed_logits(tiny_llama, opened, earlier_changed)[:, 16:32], base[:, 16:32])


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_generate_equals_transformers_generate(name, request):
    model = request.getfixturevalue(name)
    model.generation_config.eos_token_id = None  # decode the full length in both
    model.generation_config.pad_token_id = 0
    prompt = document(10, seed=6)
    expected = model.generate(prompt, max_new_tokens=30, do_sample=False)[:, 10:]
    config = MemoryConfig(segment_length=8, xl_length=64, memory_layers=(), position_mode=absolute_if_gpt2(name))
    mem_model = attach(model, config)
    with mem_model.session() as session:
        assert torch.equal(session.generate(prompt, max_new_tokens=30), expected)


def test_generation_reads_memory_and_moves_old_tokens_into_it(tiny_llama):
    config = MemoryConfig(segment_length=8, xl_length=8, memory_layers=(1,), top_k=4, memory_capacity=100)
    mem_model = attach(tiny_llama, config)
    with mem_model.session() as session:
        session.feed(document(20, seed=7))
        index = session.state.knn.indexes[1]
        before = int(index.size[0])
        out = session.generate(document(3, seed=8), max_new_tokens=25)
        assert out.shape == (1, 25)
        # 20 + 3 fed and 24 decoded tokens forwarded = 47: segments closed at 8, 16, ..., 40 tokens, each
        # keeping the last 8 in the XL cache, so 40 - 8 = 32 tokens are in memory and 7 in the open segment.
        assert session.tokens_seen == 47 and session.state.local.open_length == 7
        assert int(index.size[0]) == 32 > before


def test_retrieved_ids_never_refer_to_evicted_or_local_tokens(tiny_qwen2, monkeypatch):
    capacity = 24
    config = MemoryConfig(segment_length=8, xl_length=8, memory_layers=(0, 1), top_k=8, memory_capacity=capacity)
    mem_model = attach(tiny_qwen2, config)
    seen = []
    original_search = TorchIndex.search

    def spy(index, queries, k, **kwargs):
        result = original_search(index, queries, k, **kwargs)
        seen.append((int(index.total_added[0]), result.ids[result.mask]))
        return result

    monkeypatch.setattr(TorchIndex, "search", spy)
    with mem_model.session() as session:
        for start in range(0, 200, 8):
            local_start = session.state.local.local_start
            calls = len(seen)
            session.feed(document(200, seed=9)[:, start : start + 8])
            for total, ids in seen[calls:]:
                assert total == local_start  # memory holds exactly the tokens before the local context
                assert ids.numel() and int(ids.min()) >= total - capacity and int(ids.max()) < local_start
    assert len(seen) > 20


def test_detach_restores_the_original_model(tiny_llama):
    ids = document(40, seed=10)
    before_logits = tiny_llama(ids).logits
    before_state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    implementation = tiny_llama.config._attn_implementation
    mem_model = attach(tiny_llama, MemoryConfig(segment_length=8, memory_layers=(-1,), top_k=4, memory_capacity=64))
    assert tiny_llama.config._attn_implementation == "memlm"
    assert any(name.startswith("memlm_") for name in tiny_llama.state_dict())
    with mem_model.session() as session:
        session.feed(ids)
    model = mem_model.detach()
    assert model is tiny_llama and tiny_llama.config._attn_implementation == implementation
    assert not hasattr(model, "memlm_memory")
    after_state = model.state_dict()
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], v) for k, v in before_state.items())
    torch.testing.assert_close(model(ids).logits, before_logits, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="detached"):
        mem_model.session()


def test_attached_model_outside_a_session_is_the_plain_model(tiny_qwen2):
    ids = document(30, seed=11)
    expected = tiny_qwen2(ids).logits
    attach(tiny_qwen2, MemoryConfig(memory_layers=(0,)))
    torch.testing.assert_close(tiny_qwen2(ids).logits, expected, atol=1e-6, rtol=0)


def test_other_models_in_the_process_are_untouched(tiny_llama, tiny_qwen2):
    ids = document(30, seed=14)
    expected = tiny_qwen2(ids).logits
    attach(tiny_llama, MemoryConfig(memory_layers=(0,)))
    assert tiny_qwen2.config._attn_implementation == "sdpa" and not hasattr(tiny_qwen2, "memlm_memory")
    assert torch.equal(tiny_qwen2(ids).logits, expected)


def test_mistral_streams_with_its_xl_cache():
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    model = transformers.MistralForCausalLM(config).eval()
    ids = document(100, seed=12)
    streamed = streamed_logits(model, MemoryConfig(segment_length=16, xl_length=128, memory_layers=()), ids)
    torch.testing.assert_close(streamed, model(ids).logits, atol=ATOL, rtol=0)


def test_yarn_keys_are_moved_by_the_angle_only():
    """YaRN folds a scaling factor into cos/sin; re-rotating cached keys must not apply it twice."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                         "original_max_position_embeddings": 64},
    )
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.model.rotary_emb.attention_scaling != 1.0
    ids = document(120, seed=13)
    streamed = streamed_logits(model, MemoryConfig(segment_length=16, xl_length=128, memory_layers=()), ids)
    torch.testing.assert_close(streamed, model(ids).logits, atol=ATOL, rtol=0)
    memory = MemoryConfig(segment_length=16, xl_length=0, memory_layers=(0, 1), fusion="joint",
                          memory_positions="original", top_k=128, memory_capacity=128)
    torch.testing.assert_close(streamed_logits(model, memory, ids), model(ids).logits, atol=ATOL, rtol=0)
