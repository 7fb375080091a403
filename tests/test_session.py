"""Sessions: lifecycle, text input, streaming text, losses, sampling, persistence, and every bad input."""

from __future__ import annotations

import pytest
import torch

from memlm import MemoryConfig, MemoryModel, attach

from conftest import document, make_text

SMALL = {"segment_length": 16, "xl_length": 16, "memory_layers": (-1,), "top_k": 4, "memory_capacity": 256}


def test_leaving_the_block_frees_the_session_even_after_an_error(tiny_llama):
    mem_model = attach(tiny_llama, MemoryConfig(**SMALL))
    with pytest.raises(KeyError), mem_model.session() as session:
        session.feed(document(80))
        index = session.state.knn.indexes[1]
        assert int(index.size[0]) > 0
        raise KeyError("user code failed")
    assert int(index.size[0]) == 0 and session.state.local.cache == {}
    for use in (lambda: session.feed(document(4)), lambda: session.generate(document(2)), session.reset):
        with pytest.raises(RuntimeError, match="session is closed"):
            use()


def test_two_sessions_of_one_model_are_independent(tiny_llama):
    mem_model = attach(tiny_llama, MemoryConfig(**SMALL))
    a_ids, b_ids = document(70, seed=1), document(70, seed=2)
    with mem_model.session() as alone:
        expected = alone.feed(a_ids, return_logits=True).logits
    with mem_model.session() as a, mem_model.session() as b:
        parts = []
        for start in range(0, 70, 10):  # interleaved feeds
            parts.append(a.feed(a_ids[:, start : start + 10], return_logits=True).logits)
            b.feed(b_ids[:, start : start + 10])
    torch.testing.assert_close(torch.cat(parts, dim=1), expected, atol=1e-5, rtol=0)


def test_reset_forgets_the_document_and_keeps_the_session(tiny_llama):
    mem_model = attach(tiny_llama, MemoryConfig(**SMALL))
    ids = document(50, seed=3)
    with mem_model.session() as session:
        first = session.feed(ids, return_logits=True).logits
        session.reset()
        assert session.tokens_seen == 0 and session.state.knn.indexes == {}
        torch.testing.assert_close(session.feed(ids, return_logits=True).logits, first, atol=0, rtol=0)


def test_text_input_and_text_generation(tiny_llama, tokenizer):
    mem_model = attach(tiny_llama, MemoryConfig(**SMALL), tokenizer=tokenizer)
    text = make_text(30, seed=4)
    with mem_model.session() as session:
        result = session.feed(text, progress=True)
        # the last word waits for what follows
        assert result.tokens == len(tokenizer(text[: text.rindex(" ")])["input_ids"])
        assert result.segments == -(-result.tokens // 16)
        assert session.held_text == [text[text.rindex(" ") :]]
        assert result.tokens + session.flush().tokens == len(tokenizer(text)["input_ids"])
        session.reset()
        assert session.feed(text, final=True).tokens == len(tokenizer(text)["input_ids"])
        answer = session.generate("Silver orchard", max_new_tokens=12)
    assert isinstance(answer, str) and answer


def test_feed_stream_gives_the_tokens_of_the_joined_text(tiny_llama, tokenizer):
    mem_model = attach(tiny_llama, MemoryConfig(**SMALL), tokenizer=tokenizer)
    text = make_text(40, seed=5)
    cuts = sorted(torch.randint(len(text), (25,), generator=torch.Generator().manual_seed(0)).tolist())
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert "".join(chunks) == text
    with mem_model.session() as whole, mem_model.session() as streamed:
        expected = whole.feed(text).tokens + whole.flush().tokens
        result = streamed.feed_stream(iter(chunks)).tokens  # the text ends with the iterator
        assert result == expected == len(tokenizer(text)["input_ids"]) and streamed.held_text == [""]
        # Same tokens; only the forwards are cut differently, so the sums may round differently.
        torch.testing.assert_close(streamed._last_logits, whole._last_logits, atol=1e-5, rtol=0)
        for layer, (keys, _) in whole.state.local.cache.items():
            torch.testing.assert_close(streamed.state.local.cache[layer][0], keys, atol=1e-5, rtol=0)
        with pytest.raises(TypeError, match="text chunks"):
            streamed.feed_stream([3])


def test_loss_equals_transformers_loss_and_has_a_graph(tiny_llama):
    ids = document(64, seed=6)
    labels = ids.clone()
    labels[0, 10:14] = -100
    expected = tiny_llama(ids, labels=labels).loss
    config = MemoryConfig(segment_length=16, xl_length=64, memory_layers=(-1,), top_k=4, memory_capacity=64)
    mem_model = attach(tiny_llama, config)
    with mem_model.session() as session:
        result = session.feed(ids, labels=labels)
        torch.testing.assert_close(result.loss, expected, atol=1e-5, rtol=0)
        result.loss.backward()
        assert tiny_llama.lm_head.weight.grad is not None
    with mem_model.session() as session, torch.no_grad():
        assert session.feed(ids, labels=labels).loss.grad_fn is None


def test_memory_gates_receive_gradients(tiny_llama):
    config = MemoryConfig(segment_length=16, xl_length=0, memory_layers=(0, 1), top_k=4, memory_capacity=64)
    mem_model = attach(tiny_llama, config)
    ids = document(48, seed=7)
    with mem_model.session() as session:
        session.feed(ids, labels=ids).loss.backward()
    grad = mem_model.memory_module.gates.grad
    assert grad is not None and grad.shape == (2, 4) and grad.abs().sum() > 0


def test_sampling_is_seeded_and_streamers_get_every_token(tiny_llama):
    mem_model = attach(tiny_llama, MemoryConfig(**SMALL))
    prompt = document(12, seed=8)
    outs, streamed = [], []
    for _ in range(2):
        torch.manual_seed(123)
        with mem_model.session() as session:
            outs.append(session.generate(prompt, max_new_tokens=15, do_sample=True, temperature=0.7, top_p=0.9,
                                         streamer=lambda token: streamed.append(int(token[0]))))
    assert torch.equal(outs[0], outs[1]) and streamed[:15] == outs[0][0].tolist()


def test_generation_stops_at_eos(tiny_llama):
    mem_model = attach(tiny_llama, MemoryConfig(**SMALL))
    with mem_model.session() as session:
        first = session.generate(document(5, seed=9), max_new_tokens=6, eos_token_id=[])
    eos = int(first[0, 2])
    with mem_model.session() as session:
        out = session.generate(document(5, seed=9), max_new_tokens=6, eos_token_id=eos)
    assert out.shape[1] <= 3 and int(out[0, -1]) == eos


def test_batched_sessions_keep_rows_apart(tiny_qwen2):
    mem_model = attach(tiny_qwen2, MemoryConfig(**SMALL))
    rows = torch.cat([document(60, seed=10), document(60, seed=11)])
    with mem_model.session(batch_size=2) as session:
        both = session.feed(rows, return_logits=True).logits
    for row in range(2):
        with mem_model.session() as session:
            alone = session.feed(rows[row : row + 1], return_logits=True).logits
        torch.testing.assert_close(both[row : row + 1], alone, atol=1e-5, rtol=0)


def test_save_and_load_pretrained(tiny_llama, tmp_path):
    config = MemoryConfig(**SMALL, gate_init=0.5)
    mem_model = attach(tiny_llama, config)
    with torch.no_grad():
        mem_model.memory_module.gates.add_(torch.arange(4.0))
    mem_model.save_pretrained(tmp_path)
    gates = mem_model.memory_module.gates.detach().clone()
    model = mem_model.detach()
    loaded = MemoryModel.from_pretrained(model, tmp_path)
    assert loaded.config == config
    assert torch.equal(loaded.memory_module.gates, gates)
    loaded.detach()
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        MemoryModel.from_pretrained(model, tmp_path / "missing")


# --------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"fusion": "sum"}, "fusion must be one of \\('gate', 'joint'\\), got 'sum'"),
        ({"memory_positions": "last"}, "memory_positions must be one of .* got 'last'"),
        ({"position_mode": "relative"}, "position_mode must be one of .* got 'relative'"),
        ({"index": "annoy"}, "index must be one of .* got 'annoy'"),
        ({"segment_length": 0}, "segment_length must be an integer >= 1, got 0"),
        ({"xl_length": -1}, "xl_length must be an integer >= 0, got -1"),
        ({"top_k": 64, "memory_capacity": 32}, "top_k \\(64\\) cannot exceed memory_capacity \\(32\\)"),
        ({"memory_layers": (1, 1)}, "lists a layer twice"),
        ({"memory_layers": ("top",)}, "memory_layers must be a tuple of layer indices"),
        ({"gate_init": float("nan")}, "gate_init must be a finite number"),
        ({"memory_dtype": "int8"}, "memory_dtype must be None or one of"),
    ],
)
def test_bad_config_values_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        MemoryConfig(**fields)


def assert_untouched(model) -> None:
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "memlm_memory")


def test_bad_attach_leaves_the_model_unchanged(tiny_llama, tiny_gpt2, tiny_bart):
    with pytest.raises(ValueError, match="memory layer 2 is out of range for a model with 2 layers"):
        attach(tiny_llama, MemoryConfig(memory_layers=(2,)))
    with pytest.raises(ValueError, match="memory layer -3 is out of range"):
        attach(tiny_llama, MemoryConfig(memory_layers=(-3,)))
    with pytest.raises(ValueError, match="name one layer twice"):
        attach(tiny_llama, MemoryConfig(memory_layers=(1, -1)))
    assert_untouched(tiny_llama)
    with pytest.raises(ValueError, match="cannot attach to BartForConditionalGeneration: supported are Llama, Mistral"):
        attach(tiny_bart, MemoryConfig(memory_layers=(0,)))
    assert tiny_bart.config._attn_implementation != "memlm" and not hasattr(tiny_bart, "memlm_memory")
    with pytest.raises(ValueError, match="exceeds GPT2LMHeadModel's max_position_embeddings \\(256\\)"):
        attach(tiny_gpt2, MemoryConfig(segment_length=300, xl_length=0, memory_layers=(0,)))
    assert_untouched(tiny_gpt2)
    # an absolute-position model cannot move its cached tokens: rebased positions would collide
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel has absolute position embeddings.*xl_length=16 would give "
                                         "cached and new tokens the same positions"):
        attach(tiny_gpt2, MemoryConfig(segment_length=16, xl_length=16, memory_layers=(0,)))
    assert_untouched(tiny_gpt2)
    with pytest.raises(TypeError, match="expects a MemoryConfig"):
        attach(tiny_llama, {"segment_length": 8})
    with pytest.raises(TypeError, match="expects a transformers PreTrainedModel"):
        attach(torch.nn.Linear(2, 2), MemoryConfig())
    attach(tiny_llama, MemoryConfig(memory_layers=(0,)))
    with pytest.raises(ValueError, match="already has memlm attached"):
        attach(tiny_llama, MemoryConfig(memory_layers=(0,)))


def test_bad_session_input_is_refused_and_nothing_stored_is_lost(tiny_llama, tiny_gpt2):
    mem_model = attach(tiny_llama, MemoryConfig(**SMALL))
    with mem_model.session(batch_size=2) as session:
        session.feed(torch.cat([document(40, seed=12), document(40, seed=13)]))
        seen, sizes = session.tokens_seen, session.state.knn.indexes[1].size.clone()
        with pytest.raises(ValueError, match="text input needs a tokenizer"):
            session.feed("some text")
        with pytest.raises(ValueError, match="batch_size 2, got ids for 1 rows"):
            session.feed(document(8))
        with pytest.raises(ValueError, match="token ids must lie in \\[0, 320\\)"):
            session.feed(torch.full((2, 4), 320))
        with pytest.raises(ValueError, match="labels must be a tensor of the ids' shape \\[2, 4\\]"):
            session.feed(torch.zeros(2, 4, dtype=torch.long), labels=torch.zeros(2, 6, dtype=torch.long))
        with pytest.raises(ValueError, match="expected text or integer ids"):
            session.feed(torch.zeros(2, 4))
        with pytest.raises(ValueError, match="no tokens"):
            session.feed(torch.zeros(2, 0, dtype=torch.long))
        with pytest.raises(ValueError, match="max_new_tokens"):
            session.generate(torch.zeros(2, 2, dtype=torch.long), max_new_tokens=-1)
        with pytest.raises(ValueError, match="top_p must be a number in \\(0, 1\\], got 0"):
            session.generate(torch.zeros(2, 2, dtype=torch.long), top_p=0)
        with pytest.raises(ValueError, match="top_k must be an integer in \\[0, inf\\), got -3"):
            session.generate(torch.zeros(2, 2, dtype=torch.long), top_k=-3)
        with pytest.raises(ValueError, match="repetition_penalty must be a number in \\(0, inf\\), got -1"):
            session.generate(torch.zeros(2, 2, dtype=torch.long), repetition_penalty=-1.0)
        with pytest.raises(ValueError, match="stop_strings must be a non-empty string"):
            session.generate(torch.zeros(2, 2, dtype=torch.long), stop_strings=[""])
        with pytest.raises(ValueError, match="unknown generation fields \\['top_q'\\]"):
            session.generate(torch.zeros(2, 2, dtype=torch.long), top_q=0.5)
        assert session.tokens_seen == seen and torch.equal(session.state.knn.indexes[1].size, sizes)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        mem_model.session(batch_size=0)

    absolute = attach(tiny_gpt2, MemoryConfig(segment_length=64, xl_length=64, memory_layers=(),
                                              position_mode="absolute"))
    with absolute.session() as session:
        session.feed(document(250, seed=14))
        cache = {layer: k.clone() for layer, (k, _) in session.state.local.cache.items()}
        with pytest.raises(ValueError, match="position 259 is past this model's max_position_embeddings \\(256\\)"):
            session.feed(document(10, seed=15))
        with pytest.raises(ValueError, match="position 257 is past"):
            session.generate(document(2, seed=15), max_new_tokens=7)
        assert session.tokens_seen == 250
        assert all(torch.equal(session.state.local.cache[layer][0], k) for layer, k in cache.items())


def test_the_id_history_is_bounded_and_save_document_says_when_it_was(tiny_llama, tmp_path):
    from memlm.store import MemoryStore

    mem_model = attach(tiny_llama, MemoryConfig(**SMALL))
    ids = document(350, seed=21)
    with mem_model.session(history_tokens=100) as bounded, mem_model.session(history_tokens=None) as full:
        for start in range(0, 350, 30):  # forwards of 30 ids: the oldest kept one is cut in the middle
            bounded.feed(ids[:, start : start + 30])
            full.feed(ids[:, start : start + 30])
        assert bounded.stream_length == full.stream_length == 350
        kept, mask = bounded.stream_ids()
        assert mask is None and torch.equal(kept, ids[:, -100:])
        assert bounded.history.kept == 100 and bounded.history.dropped == 250
        # Greedy decoding without processors over past ids does not depend on them; a repetition penalty sees the
        # kept ids only. The model state is the same either way.
        assert torch.equal(bounded.generate(max_new_tokens=5), full.generate(max_new_tokens=5))
        assert bounded.stream_length == full.stream_length == 355
        store = MemoryStore(tmp_path / "store")
        with pytest.raises(ValueError, match="kept only its last 100 token ids"):
            bounded.save_document(store, "doc")
        assert store.documents() == []  # nothing was written
        assert full.save_document(store, "doc").tokens == 355
    with pytest.raises(ValueError, match="history_tokens"):
        mem_model.session(history_tokens=0)


@pytest.mark.parametrize("rows", [1, 2])
def test_a_branch_gives_the_stream_back_so_one_haystack_serves_every_question(tiny_qwen2, tokenizer, rows):
    """Each question asked in a branch gets the answer (and logits) of a fresh session fed the haystack and that
    question; after the branches the stream continues as if they never ran. An XL cache that evicts into a memory
    larger than top_k, text held back mid-word, rows of different lengths (rows=2: one stream per row)."""
    config = MemoryConfig(segment_length=16, xl_length=16, memory_layers=(0, 1), top_k=4, fusion="joint")
    mem_model = attach(tiny_qwen2, config, tokenizer=tokenizer)
    text = make_text(30, seed=3)
    haystacks = [text[:500], text[40:520]][:rows]
    questions = [" Where is the river", " Which window is silver"]

    def fresh(question):
        with torch.no_grad(), mem_model.session(batch_size=rows) as session:
            session.feed(haystacks if rows > 1 else haystacks[0])
            out = session.generate([question] * rows if rows > 1 else question, max_new_tokens=5, eos_token_id=[])
            return out, session._last_logits.clone()

    expected = [fresh(q) for q in questions]
    with torch.no_grad(), mem_model.session(batch_size=rows) as session:
        session.feed(haystacks if rows > 1 else haystacks[0])
        tokens = session.tokens_seen
        for question, (answer, logits) in zip(questions, expected, strict=True):
            with session.branch():
                out = session.generate([question] * rows if rows > 1 else question, max_new_tokens=5,
                                       eos_token_id=[])
                assert out == answer
                torch.testing.assert_close(session._last_logits, logits, rtol=1e-5, atol=1e-5)
        assert session.tokens_seen == tokens
        continued = session.generate([questions[0]] * rows if rows > 1 else questions[0], max_new_tokens=5,
                                     eos_token_id=[])
    assert continued == expected[0][0]


def test_a_branch_is_refused_where_the_stream_cannot_be_copied(tiny_llama):
    mem_model = attach(tiny_llama, MemoryConfig(segment_length=16, xl_length=16, memory_layers=(0,), index="faiss"))
    with mem_model.session() as session, pytest.raises(ValueError, match="index='faiss' cannot be copied"):
        session.branch().__enter__()
