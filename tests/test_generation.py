"""Generation in a session behaves like transformers' generate; every generated token enters the stream;
rows of different lengths in one batch equal their own sessions (runtime/generation.py, rows.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from memlm import MemoryConfig, attach

from conftest import document

MEMORY = dict(segment_length=16, xl_length=16, memory_layers=(1,), top_k=4, memory_capacity=4096)


def sampled(mem_model, prompt, config, seed):
    with mem_model.session() as session:
        torch.manual_seed(seed)
        return session.generate(prompt, generation_config=config)


def test_sampling_equals_model_generate_with_the_same_config(tiny_llama, tokenizer):
    """Memory off and an XL cache covering everything: the session computes the model's own logits, so the same
    GenerationConfig and seed give the same tokens (top-k, repetition penalty, stop strings, EOS, padding rule)."""
    mem_model = attach(tiny_llama, MemoryConfig(segment_length=32, xl_length=1024, memory_layers=()),
                       tokenizer=tokenizer)
    prompt = document(70, seed=1)
    config = GenerationConfig(do_sample=True, top_k=20, temperature=0.9, repetition_penalty=1.3, max_new_tokens=30,
                              eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    for seed in range(3):
        torch.manual_seed(seed)
        expected = mem_model.model.generate(prompt, generation_config=config, attention_mask=torch.ones_like(prompt))
        assert torch.equal(sampled(mem_model, prompt, config, seed), expected[:, prompt.shape[1] :])
    # a stop string taken from the middle of a free run stops both at the same token
    free = sampled(mem_model, prompt, config, 0)[0]
    stop = next(text for i in range(8, 28) if "\ufffd" not in (text := tokenizer.decode(free[i : i + 2])).strip()
                and text.strip())  # whole characters (a random model also emits bytes of them)
    config.stop_strings = [stop]
    torch.manual_seed(0)
    expected = mem_model.model.generate(prompt, generation_config=config, tokenizer=tokenizer,
                                        attention_mask=torch.ones_like(prompt))[:, prompt.shape[1] :]
    new = sampled(mem_model, prompt, config, 0)
    assert torch.equal(new, expected) and new.shape[1] < 30 and stop in tokenizer.decode(new[0])


def test_min_p_no_repeat_ngram_bad_words_and_eos_act_as_in_generate(tiny_llama, tokenizer):
    mem_model = attach(tiny_llama, MemoryConfig(segment_length=32, xl_length=1024, memory_layers=()),
                       tokenizer=tokenizer)
    prompt = document(40, seed=2)
    greedy = GenerationConfig(do_sample=False, max_new_tokens=25, no_repeat_ngram_size=2, bad_words_ids=[[5], [7]],
                              eos_token_id=None)
    sampling = GenerationConfig(do_sample=True, min_p=0.05, typical_p=0.9, max_new_tokens=25, eos_token_id=None)
    for config in (greedy, sampling):
        torch.manual_seed(3)
        expected = mem_model.model.generate(prompt, generation_config=config, attention_mask=torch.ones_like(prompt))
        assert torch.equal(sampled(mem_model, prompt, config, 3), expected[:, prompt.shape[1] :])
    # EOS: a row that finishes continues with the pad token; the loop ends when all have
    first = sampled(mem_model, prompt, GenerationConfig(max_new_tokens=10, eos_token_id=None), 0)
    eos = int(first[0, 4])
    with mem_model.session() as session:
        new = session.generate(prompt, max_new_tokens=10, eos_token_id=eos, pad_token_id=1)
    assert new[0].tolist() == first[0, : first[0].tolist().index(eos) + 1].tolist()


def test_multi_turn_is_one_stream(tiny_llama):
    """feed A; generate after P; generate after Q == feed A + P + the first answer; generate after Q."""
    mem_model = attach(tiny_llama, MemoryConfig(**MEMORY))
    a, p, q = document(100, seed=4), document(9, seed=5), document(7, seed=6)
    with mem_model.session() as session:
        session.feed(a)
        first = session.generate(p, max_new_tokens=11, eos_token_id=[])
        second = session.generate(q, max_new_tokens=11, eos_token_id=[])
        assert session.tokens_seen == 100 + 9 + 11 + 7 + 10  # the last answer's last token waits for the next input
        streamed = session.history.stream()[0]
    with mem_model.session() as session:
        session.feed(torch.cat((a, p, first), dim=1))
        assert torch.equal(session.generate(q, max_new_tokens=11, eos_token_id=[]), second)
    assert torch.equal(streamed, torch.cat((a, p, first, q, second[:, :-1]), dim=1))


def test_padded_rows_equal_their_own_sessions(tiny_llama, tokenizer):
    """Rows of 50, 130 and 200 tokens, left-padded in one batch, with an evicting XL cache and kNN memory
    (top_k smaller than memory): each row's logits and greedy continuation equal its own session's."""
    mem_model = attach(tiny_llama, MemoryConfig(**MEMORY), tokenizer=tokenizer)
    rows = [document(n, seed=10 + n)[0] for n in (50, 130, 200)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat((torch.zeros(width - len(r), dtype=torch.long), r)) for r in rows])
    mask = torch.stack([torch.arange(width) >= width - len(r) for r in rows]).long()
    alone = []
    for row in rows:
        with mem_model.session() as session:
            logits = session.feed(row[None], return_logits=True).logits[0]
            alone.append((logits, session.generate(document(3, seed=1), max_new_tokens=8, eos_token_id=[])[0]))
    with mem_model.session(batch_size=3) as session:
        logits = session.feed(ids, attention_mask=mask, return_logits=True).logits
        new = session.generate(document(3, seed=1).expand(3, -1), max_new_tokens=8, eos_token_id=[])
        assert session.tokens_seen == [50 + 3 + 7, 130 + 3 + 7, 200 + 3 + 7]
    for r, (row_logits, row_new) in enumerate(alone):
        torch.testing.assert_close(logits[r, width - len(rows[r]) :], row_logits, atol=1e-5, rtol=0)
        assert torch.equal(new[r], row_new)
    # the padded rows as a prompt, as one passes them to model.generate
    with mem_model.session(batch_size=3) as session:
        new = session.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    for r, row in enumerate(rows):
        with mem_model.session() as session:
            assert torch.equal(new[r], session.generate(row[None], max_new_tokens=8, eos_token_id=[])[0])


def test_a_batch_of_texts_pads_and_a_lockstep_batch_can_part(tiny_llama, tokenizer):
    mem_model = attach(tiny_llama, MemoryConfig(**MEMORY), tokenizer=tokenizer)
    texts = ["Silver orchard and the river", "Winter " * 30 + "harbour", "Candle light"]
    prompt = document(60, seed=7)  # the lockstep rows have memory entries when they part
    alone = []
    for text in texts:
        with mem_model.session() as session:
            session.feed(prompt)
            session.feed(text)
            alone.append(session.generate(" journey", max_new_tokens=6, eos_token_id=[]))
    with mem_model.session(batch_size=3) as session:
        session.feed(prompt.expand(3, -1))  # rows in lockstep, then they part
        assert int(session.state.knn.indexes[1].size.min()) > 0
        session.feed(texts)
        assert session.generate([" journey"] * 3, max_new_tokens=6, eos_token_id=[]) == alone


def test_chat_messages_use_the_template_and_continue_the_conversation(tiny_llama, tokenizer):
    template = ("{% for m in messages %}<pad>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
                "{% if add_generation_prompt %}<pad>assistant: {% endif %}")
    tokenizer.chat_template = template
    try:
        mem_model = attach(tiny_llama, MemoryConfig(**MEMORY), tokenizer=tokenizer)
        eos = tokenizer.eos_token_id
        with mem_model.session() as session:
            first = session.generate([{"role": "user", "content": "the river"}], max_new_tokens=5, eos_token_id=eos)
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": "the river"}], tokenize=False,
                                                     add_generation_prompt=True)
            prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
            assert session.history.stream()[0][0, : len(prompt_ids)].tolist() == prompt_ids
            second = session.generate([{"role": "user", "content": "and the stone"}], max_new_tokens=5)
            assert isinstance(first, str) and isinstance(second, str)
            assert [m["role"] for m in session.conversation] == ["user", "assistant", "user", "assistant"]
            assert session.conversation[1]["content"] == first
    finally:
        tokenizer.chat_template = None
    with mem_model.session() as session, pytest.raises(ValueError, match="a tokenizer with a chat template"):
        session.generate([{"role": "user", "content": "hi"}])


def test_streamers_and_continuing_the_stream(tiny_llama):
    mem_model = attach(tiny_llama, MemoryConfig(**MEMORY))
    seen = []
    with mem_model.session() as session:
        session.feed(document(30, seed=8))
        new = session.generate(max_new_tokens=5, eos_token_id=[], streamer=seen.append)
        assert new.shape == (1, 5) and torch.equal(torch.stack(seen, dim=1), new)
        with pytest.raises(ValueError, match="unknown generation fields \\['beams'\\]"):
            session.generate(max_new_tokens=5, beams=2)
    with mem_model.session() as session, pytest.raises(ValueError, match="the stream is empty"):
        session.generate(max_new_tokens=2)
