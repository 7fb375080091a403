"""Block retrieval memory (InfLLM / Quest): against the model's own attention, brute-force scoring and the store."""

import math

import pytest
import torch
import transformers

from memlm import MemoryConfig, attach
from memlm.memory.block_memory import BlockMemory
from memlm.positions.policy import PositionPolicy
from memlm.store import MemoryStore
from memlm.store.documents import DocumentWriter, ask

from conftest import VOCAB_SIZE, build_tiny_llama, document, make_text, session_logits, turn

BLOCKS = dict(retrieval="blocks", fusion="joint", memory_layers=(0, 1))


def block_model(model, **overrides):
    return attach(model, MemoryConfig(**{"segment_length": 16, "xl_length": 16, "block_size": 8, **BLOCKS,
                                         **overrides}))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("position_mode,sinks", [("absolute", 3), ("rebase", 0)])
def test_every_block_selected_is_the_models_own_attention(request, fixture, position_mode, sinks):
    """With top_blocks covering the whole memory, the selected blocks stand right before the local context at their
    true distances: the stream is the model's full attention over the document, through evictions of the XL cache,
    a partly filled newest block (the sinks shift block boundaries off the segments) and feeds of any size."""
    model = request.getfixturevalue(fixture).double()
    ids = document(101, seed=1)
    expected = model(ids).logits
    mem_model = block_model(model, top_blocks=16, memory_capacity=128, sink_tokens=sinks, position_mode=position_mode)
    # rebase: the model's rotary module computes its angles in float32 at other positions than the plain forward
    atol = 1e-12 if position_mode == "absolute" else 1e-6
    for chunks in (None, [5, 40, 1, 1, 54]):
        torch.testing.assert_close(session_logits(mem_model, ids, chunks), expected, atol=atol, rtol=0)


def test_selected_blocks_are_attended_as_sinks_plus_blocks_plus_local(tiny_qwen2):
    """top_blocks smaller than memory and a memory that evicts: each memory layer's output equals a float64 softmax
    over [sinks ; the blocks the rule picked, in document order, right before the local context ; local], computed
    here from the model's own projections of the whole document."""
    model = tiny_qwen2.double()
    ids = document(90, seed=2)
    config = dict(top_blocks=2, memory_capacity=32, sink_tokens=2, position_mode="absolute")
    mem_model = block_model(model, **config)
    layer = mem_model.model.model.layers[0].self_attn
    captured = {}
    layer.register_forward_hook(lambda module, args, kwargs, out: captured.update(out=out[0]), with_kwargs=True)
    with mem_model.session() as session:
        session.feed(ids[:, :80])
        session.state.memory.selections = []
        session.feed(ids[:, 80:88])
        chosen = next(ids_ for memory_layer, ids_ in session.state.memory.selections if memory_layer == 0)[0]
        first_entry = session.state.memory.blocks[0].first
        memory_start = session.state.memory.memory_start
    got = captured["out"]
    # the reference: q, k, v of layer 0 from the plain model over the whole prefix, positions as documented
    hidden = model.model.embed_tokens(ids[:, :88])
    normed = model.model.layers[0].input_layernorm(hidden)
    attention = model.model.layers[0].self_attn
    q = attention.q_proj(normed).view(1, 88, 4, 16).transpose(1, 2)
    k = attention.k_proj(normed).view(1, 88, 2, 16).transpose(1, 2)
    v = attention.v_proj(normed).view(1, 88, 2, 16).transpose(1, 2)
    inv_freq = model.model.rotary_emb.inv_freq
    local_start = 80 - 16  # the open segment (80..87) and the XL cache (64..79)
    assert first_entry % 8 == 0 and memory_start == 2
    outs = []
    for head in range(4):
        kv = head // 2
        blocks = sorted(chosen[kv].tolist())
        entries = [memory_start + e for b in blocks for e in range(b * 8, b * 8 + 8)
                   if first_entry <= e < local_start - memory_start]
        positions = list(range(2)) + list(range(local_start - len(entries), local_start)) + list(range(64, 88))
        keys = torch.cat((k[0, kv, :2], k[0, kv, entries], k[0, kv, 64:88]))
        values = torch.cat((v[0, kv, :2], v[0, kv, entries], v[0, kv, 64:88]))
        rotated = turn(keys, torch.tensor(positions), inv_freq)
        query = turn(q[0, head, 80:88], torch.arange(80, 88), inv_freq)
        scores = query @ rotated.T / math.sqrt(16)
        visible = torch.ones_like(scores, dtype=torch.bool)
        visible[:, -8:] = torch.ones(8, 8, dtype=torch.bool).tril()
        outs.append(torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1) @ values)
    expected = attention.o_proj(torch.stack(outs, dim=1).reshape(1, 8, 64))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def brute_force_votes(keys, first, total, q, scale, block_size, scoring, representatives, before_local, inv_freq,
                      per_token=False):
    """The votes from their definition, in float64 loops: keys [hkv, total, d] of entries 0..total-1 (live from
    ``first``), q [hq, n, d] at its positions -> votes [hkv, live blocks] (per_token: [hkv, n, live blocks], each
    token's votes summed over the key/value head's query heads)."""
    kv_heads, _, dim = keys.shape
    q_heads, n, _ = q.shape
    group = q_heads // kv_heads
    blocks = range(first // block_size, -(-total // block_size))
    votes = torch.zeros(kv_heads, n, len(blocks), dtype=torch.float64)
    for kv in range(kv_heads):
        for head in range(kv * group, (kv + 1) * group):
            for i in range(n):
                query = turn(q[head, i : i + 1].double(), torch.tensor([-before_local]), inv_freq)[0]
                scores = []
                for b in blocks:
                    block = keys[kv, max(b * block_size, first) : min((b + 1) * block_size, total)].double()
                    if scoring == "minmax":
                        low, high = block.min(dim=0).values, block.max(dim=0).values
                        scores.append(sum(max(query[c] * low[c], query[c] * high[c]) for c in range(dim)))
                    elif scoring == "exact":  # the attention the block draws, in score units
                        scores.append(math.log(sum(math.exp(scale * float(query @ key)) for key in block)) / scale)
                    else:
                        mean = block.mean(dim=0)
                        central = sorted(range(len(block)), key=lambda t: -float(block[t] @ mean))[:representatives]
                        scores.append(max(float(query @ block[t]) for t in central))
                votes[kv, i] += torch.softmax(torch.tensor(scores, dtype=torch.float64) * scale, dim=0)
    return votes if per_token else votes.sum(dim=1)


def brute_force_lift(votes):
    """Each block's lift from its definition: votes [tokens, blocks] -> [blocks], the votes above the block's
    median (the lower middle one) over the tokens, summed; one token: its votes."""
    tokens, blocks = votes.shape
    if tokens == 1:
        return votes[0]
    lifts = []
    for j in range(blocks):
        column = sorted(float(v) for v in votes[:, j])
        median = column[(tokens - 1) // 2]
        lifts.append(sum(max(v - median, 0.0) for v in column))
    return torch.tensor(lifts, dtype=torch.float64)


def best_blocks(votes, first, block_size, top_blocks):
    """Per row of votes [heads, live blocks], the ``top_blocks`` block ids of largest vote, ascending."""
    start = first // block_size
    return [sorted(start + j for j in sorted(range(len(row)), key=lambda j: -float(row[j]))[:top_blocks])
            for row in votes]


def brute_force_choice(keys, first, total, q, scale, block_size, top_blocks, scoring, representatives, before_local,
                       inv_freq):
    """The rule from its definition: the chosen block ids per kv head, ascending."""
    votes = brute_force_votes(keys, first, total, q, scale, block_size, scoring, representatives, before_local,
                              inv_freq)
    return best_blocks(votes, first, block_size, top_blocks)


@pytest.mark.parametrize("scoring,exact_queries,rule,dtype,neighbours", [
    ("minmax", 0, "minmax", torch.float32, 0),
    ("representatives", 4, "representatives", torch.float32, 0),  # 5 queries: more than exact_queries
    ("minmax", 5, "exact", torch.float32, 0), ("representatives", 64, "exact", torch.float32, 0),
    ("minmax", 64, "exact", torch.bfloat16, 0),
    ("minmax", 64, "exact", torch.float32, 1), ("minmax", 0, "minmax", torch.float32, 2)])
def test_the_block_chosen_is_the_one_the_rule_defines(tiny_qwen2, scoring, exact_queries, rule, dtype, neighbours):
    """Against brute force: memory that wrapped its ring (evicted), a partly filled newest block, grouped heads; a
    forward of at most exact_queries queries scores exactly, a longer one by block_scoring's summary; a
    bfloat16 memory is scored from the keys it holds; neighbours: each chosen block's live neighbours are read
    with it, each block once (3 chosen of 6 live blocks: neighbours shared and outside memory)."""
    rotary = tiny_qwen2.model.rotary_emb
    positions = PositionPolicy("rebase", "first", rotary, memory_span=3 * (1 + 2 * neighbours) * 8)
    memory = BlockMemory(capacity=48, block_size=8, top_blocks=3, scoring=scoring, representatives=3,
                         exact_queries=exact_queries, dtype=dtype, positions=positions, devices={},
                         neighbours=neighbours)
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 77, 16, generator=generator).to(dtype).float()  # what memory holds
    values = torch.randn(1, 2, 77, 16, generator=generator).to(dtype).float()
    for start, stop in ((0, 13), (13, 16), (16, 40), (40, 77)):
        memory.add(0, keys[:, :, start:stop], values[:, :, start:stop])
    layer = memory.blocks[0]
    assert (layer.first, layer.total) == (32, 77)  # 77 - 48 = 29 over capacity: blocks 0..3 left whole
    q = torch.randn(1, 4, 5, 16, generator=generator)
    chosen = memory.select(0, q, local_start=100, scale=0.25, sinks=2)
    frame = 2 + 3 * (1 + 2 * neighbours) * 8
    expected = brute_force_choice(keys[0], 32, 77, q[0], 0.25, 8, 3, rule, 3, frame - 1, rotary.inv_freq)
    expected = [sorted({b + o for b in blocks for o in range(-neighbours, neighbours + 1)} & set(range(4, 10)))
                for blocks in expected]  # live blocks: 4..9
    assert [ids[: len(blocks)] for ids, blocks in zip(chosen[0].tolist(), expected, strict=True)] == expected
    assert all(b >= 10 for ids, blocks in zip(chosen[0].tolist(), expected, strict=True) for b in ids[len(blocks):])
    # read: the chosen blocks' entries in document order, the live ones ending right before the frame
    got_keys, got_values, live = memory.read(0, q, local_start=100, scale=0.25, sinks=2)
    for kv in range(2):
        entries = [e for b in expected[kv] for e in range(b * 8, b * 8 + 8)]
        assert live[0, kv].tolist() == [e < 77 for e in entries] + [False] * (live.shape[-1] - len(entries))
        kept = [e for e in entries if e < 77]
        places = torch.arange(frame - len(kept), frame)
        rotated = turn(keys[0, kv, kept], places, rotary.inv_freq)  # memory rotates in its own dtype
        tolerance = {} if dtype == torch.float32 else dict(atol=3e-2, rtol=0)
        torch.testing.assert_close(got_keys[0, kv, : len(kept)], rotated, **tolerance)
        torch.testing.assert_close(got_values[0, kv, : len(kept)], values[0, kv, kept])


@pytest.mark.parametrize("hold", [True, False])
def test_a_generated_token_reads_the_blocks_its_prompt_selected_while_memory_is_unchanged(tiny_qwen2, hold):
    """hold: a one-token forward reads the last longer forward's blocks until new entries arrive, then selects by
    its own query (brute force) until the next longer forward; without hold it always selects for itself."""
    rotary = tiny_qwen2.model.rotary_emb
    positions = PositionPolicy("rebase", "first", rotary, memory_span=2 * 8)
    memory = BlockMemory(capacity=64, block_size=8, top_blocks=2, scoring="minmax", representatives=2,
                         exact_queries=8, hold=hold, dtype=torch.float32, positions=positions, devices={})
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 56, 16, generator=generator)
    memory.add(0, keys[:, :, :48], keys[:, :, :48])
    prompt = torch.randn(1, 4, 6, 16, generator=generator)
    token = torch.randn(1, 4, 1, 16, generator=generator) * 3

    def alone(q, total):
        return brute_force_choice(keys[0], 0, total, q[0], 0.25, 8, 2, "exact", 2, 16 - 1, rotary.inv_freq)

    prompted = memory.select(0, prompt, local_start=100, scale=0.25)
    assert prompted[0].tolist() == alone(prompt, 48)
    assert alone(token, 48) != prompted[0].tolist()  # alone, the token would read other blocks
    expected = prompted[0].tolist() if hold else alone(token, 48)
    assert memory.select(0, token, local_start=100, scale=0.25)[0].tolist() == expected
    memory.add(0, keys[:, :, 48:], keys[:, :, 48:])  # new entries: what the prompt selected from is gone
    assert memory.select(0, token, local_start=100, scale=0.25)[0].tolist() == alone(token, 56)
    assert memory.select(0, token, local_start=100, scale=0.25)[0].tolist() == alone(token, 56)  # not held
    again = memory.select(0, prompt, local_start=100, scale=0.25)  # a longer forward selects (and holds) anew
    assert again[0].tolist() != alone(token, 56)
    assert memory.select(0, token, local_start=100, scale=0.25)[0].tolist() == (
        again[0].tolist() if hold else alone(token, 56))


@pytest.mark.parametrize("hold", [True, False])
def test_a_question_selects_by_votes_pooled_over_heads_and_layers(tiny_qwen2, hold):
    """pooled_from=1, memory layers 0..3, against brute force: a forward scored exactly selects per key/value head at
    layer 0 and, at each layer above, the blocks of the largest lift of each token's votes summed over both heads and
    the layers from 1 up to it, the same for both heads, with their neighbours (memory wrapped, its newest block
    partly filled). The next question pools anew; a segment (more than exact_queries) selects per layer and head; a
    generated token reads the question's pooled choice (hold) or selects by its own pooled votes."""
    rotary = tiny_qwen2.model.rotary_emb
    span = 2 * 3 * 8  # 2 blocks of 8, each with a neighbour on each side
    positions = PositionPolicy("rebase", "first", rotary, memory_span=span)
    memory = BlockMemory(capacity=48, block_size=8, top_blocks=2, scoring="minmax", representatives=2,
                         exact_queries=5, hold=hold, dtype=torch.float32, positions=positions, devices={},
                         neighbours=1, pooled_from=1)
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(4, 1, 2, 77, 16, generator=generator)
    for layer in range(4):
        for start, stop in ((0, 40), (40, 77)):
            memory.add(layer, keys[layer, :, :, start:stop], keys[layer, :, :, start:stop])
    assert memory.blocks[3].live_blocks == range(4, 10)

    def votes(layer, q, rule, per_token=False):
        return brute_force_votes(keys[layer, 0], 32, 77, q[0], 0.25, 8, rule, 2, span - 1, rotary.inv_freq, per_token)

    def with_neighbours(blocks):
        return [sorted({b + o for b in row for o in (-1, 0, 1)} & set(range(4, 10))) for row in blocks]

    def selected(layer, q):
        return [[b for b in row if b < 10] for row in memory.select(layer, q, local_start=100, scale=0.25)[0].tolist()]

    def pooled_choices(q, score=brute_force_lift):
        pool, choices = 0, []
        for layer in range(4):
            token_votes = votes(layer, q, "exact", per_token=True)  # [hkv, n, blocks]
            pool = pool + token_votes.sum(dim=0) if layer else 0  # [n, blocks]
            choices.append(best_blocks(score(pool).expand(2, -1) if layer else token_votes.sum(dim=1), 32, 8, 2))
        return choices

    per_head_differs = lift_differs = False
    for seed, tokens in ((4, 5), (5, 4)):  # two questions, one after the other (an even count: the lower median)
        question = torch.randn(1, 4, tokens, 16, generator=torch.Generator().manual_seed(seed))
        for layer, choice in enumerate(pooled_choices(question)):
            assert selected(layer, question) == with_neighbours(choice)
            assert choice[0] == choice[1] or layer == 0
            per_head_differs |= choice != best_blocks(votes(layer, question, "exact"), 32, 8, 2)
        lift_differs |= pooled_choices(question) != pooled_choices(question, score=lambda pool: pool.sum(dim=0))
    assert per_head_differs and lift_differs  # the test tells pooling from per head, lift from summed votes
    held = [selected(layer, question) for layer in range(4)]
    token = torch.randn(1, 4, 1, 16, generator=generator) * 3
    expected = held if hold else [with_neighbours(choice) for choice in pooled_choices(token)]
    assert [selected(layer, token) for layer in range(4)] == expected
    segment = torch.randn(1, 4, 6, 16, generator=generator)
    for layer in range(4):
        assert selected(layer, segment) == with_neighbours(best_blocks(votes(layer, segment, "minmax"), 32, 8, 2))


def test_memory_keeps_the_newest_whole_blocks_through_growth_and_wrapping():
    positions = PositionPolicy("rebase", "first", None)
    for capacity in (24, 64, 4096):
        memory = BlockMemory(capacity=capacity, block_size=8, top_blocks=1, scoring="minmax", representatives=2,
                             exact_queries=0, dtype=None, positions=positions, devices={})
        keys = torch.randn(2, 3, 150, 4)
        start = 0
        for n in (1, 7, 9, 30, 3, 60, 40):
            memory.add(5, keys[:, :, start : start + n], -keys[:, :, start : start + n])
            start += n
            layer = memory.blocks[5]
            first = 0 if start <= capacity else -(-(start - capacity) // 8) * 8
            for row in range(2):
                got_keys, got_values, got_first = memory.entries(5, row)
                assert got_first == first
                torch.testing.assert_close(got_keys, keys[row, :, first:start])
                torch.testing.assert_close(got_values, -keys[row, :, first:start])
            low, high, _ = layer.summaries(layer.live_blocks)
            for j, block in enumerate(layer.live_blocks):
                entries = keys[:, :, max(block * 8, first) : min(block * 8 + 8, start)]
                torch.testing.assert_close(low[:, :, j], entries.amin(dim=2))
                torch.testing.assert_close(high[:, :, j], entries.amax(dim=2))
            assert layer.keys.shape[2] <= capacity


@pytest.mark.parametrize("pooled", [None, 1])
def test_rows_branches_and_generation_select_as_a_session_of_their_own(tiny_qwen2, pooled):
    """Rows of a batch, branches and generation select blocks as a session of their own does, forward by forward
    (selection is per forward: rows are cut into the same forwards here), also with votes pooled over layers."""
    mem_model = block_model(tiny_qwen2.double(), top_blocks=2, memory_capacity=64, pooled_selection_from=pooled)
    rows = torch.cat([document(75, seed=10), document(75, seed=11)])
    prompt = document(5, seed=12)
    alone = []
    for row in range(2):
        with mem_model.session() as session:
            logits = session.feed(rows[row : row + 1], return_logits=True).logits
            alone.append((logits, session.generate(prompt, max_new_tokens=8, eos_token_id=[])))
    with mem_model.session(batch_size=2) as session:
        logits = session.feed(rows, return_logits=True).logits
        generated = session.generate(prompt.expand(2, -1), max_new_tokens=8, eos_token_id=[])
    for row in range(2):
        torch.testing.assert_close(logits[row : row + 1], alone[row][0], atol=1e-10, rtol=0)
        assert torch.equal(generated[row : row + 1], alone[row][1])
    with mem_model.session() as session:
        session.feed(rows[:1])
        with session.branch():
            assert torch.equal(session.generate(prompt, max_new_tokens=8, eos_token_id=[]), alone[0][1])
        assert torch.equal(session.generate(prompt, max_new_tokens=8, eos_token_id=[]), alone[0][1])


def test_stored_documents_resume_and_ask_with_block_memory(tmp_path, tokenizer):
    mem_model = attach(build_tiny_llama(), MemoryConfig(segment_length=32, xl_length=32, block_size=16, top_blocks=2,
                                                        memory_capacity=256, memory_dtype="float16", **BLOCKS),
                       tokenizer=tokenizer)
    text = make_text(120, seed=6)
    with MemoryStore(tmp_path / "store") as store:
        writer = DocumentWriter(store, mem_model, "doc")
        try:
            writer.write(text.encode())
            writer.finish()
        finally:
            writer.close()
        # the writer forwards whole segments, as a session fed the token ids at once does (selection is per forward)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        then = torch.tensor([tokenizer(" and then", add_special_tokens=False)["input_ids"]])
        with mem_model.session() as session:
            session.feed(ids)
            expected = session.feed(then, return_logits=True).logits
        with mem_model.session(store=store, documents=["doc"]) as session:
            logits = session.feed(then, return_logits=True).logits
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
        answer = ask(mem_model, store, ["doc"], " The garden", max_new_tokens=4)
        tokens = store.document("doc").tokens
        assert answer.tokens == 4 and answer.retrieved
        assert all(0 <= found["token_offset"] < tokens for found in answer.retrieved)
        # a store made with token retrieval and one made with blocks are not mixed (two memory layers)
        tokens_model = attach(mem_model.detach(), MemoryConfig(segment_length=32, xl_length=32, memory_layers=(0, 1),
                                                               fusion="joint", memory_capacity=256,
                                                               memory_dtype="float16"), tokenizer=tokenizer)
        from memlm.store import FingerprintMismatch

        with pytest.raises(FingerprintMismatch):
            ask(tokens_model, store, ["doc"], " The garden", max_new_tokens=1)


@pytest.mark.parametrize("overrides,field", [
    (dict(block_size=0), "block_size"),
    (dict(top_blocks=0), "top_blocks"),
    (dict(block_size=12), "block_size"),  # does not divide segment_length 16
    (dict(top_blocks=5, memory_capacity=32), "top_blocks"),  # more blocks than memory holds
    (dict(memory_capacity=36), "memory_capacity"),
    (dict(block_representatives=9), "block_representatives"),
    (dict(block_scoring="mean"), "block_scoring"),
    (dict(exact_block_queries=-1), "exact_block_queries"),
    (dict(exact_block_queries=2.5), "exact_block_queries"),
    (dict(hold_blocks="yes"), "hold_blocks"),
    (dict(block_neighbours=-1), "block_neighbours"),
    (dict(top_blocks=2, block_neighbours=1, memory_capacity=40), "block_neighbours"),  # reads 48 entries
    (dict(pooled_selection_from="10"), "pooled_selection_from"),
    (dict(pooled_selection_from=True), "pooled_selection_from"),
    (dict(pooled_selection_from=1, exact_block_queries=0), "pooled_selection_from"),  # pools exact votes only
    (dict(retrieval="pages"), "retrieval"),
    (dict(memory_positions="original"), "memory_positions"),
    (dict(distance_cap=64), "distance_cap"),
    (dict(index="faiss"), "index"),
])
def test_bad_block_settings_name_their_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        MemoryConfig(**{"segment_length": 16, "block_size": 8, **BLOCKS, **overrides})


def test_pooled_selection_from_must_name_a_layer_at_or_below_a_memory_layer(tiny_qwen2):
    """Resolved at attach, before the model is touched, negative counting from the top (tiny_qwen2: 2 layers)."""
    for pooled, message in ((2, "out of range"), (-3, "out of range"), (1, "above every memory layer")):
        with pytest.raises(ValueError, match=message):
            block_model(tiny_qwen2, memory_layers=(0,), pooled_selection_from=pooled)
    assert not hasattr(tiny_qwen2, "memlm_memory")
    mem_model = block_model(tiny_qwen2, pooled_selection_from=-1)
    with mem_model.session() as session:
        session.feed(document(40, seed=2))
        assert session.state.memory.pooled_from == 1


def test_block_memory_needs_a_rotary_model_and_no_training(tiny_gpt2):
    with pytest.raises(ValueError, match="rotary"):
        attach(tiny_gpt2, MemoryConfig(segment_length=16, xl_length=0, block_size=8, **BLOCKS))
    from memlm.memory.crossbatch import CrossBatch
    from memlm.runtime.stream import StreamState

    with pytest.raises(ValueError, match="CrossBatch"):
        StreamState(MemoryConfig(segment_length=16, block_size=8, **BLOCKS), batch_size=2, memory_layers=(0,),
                    memory_module=torch.nn.Module(), rotary=None, max_positions=None,
                    devices={0: torch.device("cpu")}, dtype=torch.float32, crossbatch=CrossBatch(2, 2))


def test_token_retrieval_fingerprint_is_what_it_was():
    """Stores made before block retrieval existed keep opening: the new fields are hashed only when used."""
    from memlm.store.store import config_fields

    fields = config_fields(MemoryConfig())
    assert not {"retrieval", "block_size", "exact_block_queries", "hold_blocks", "block_neighbours"} & set(fields)
    assert config_fields(MemoryConfig(segment_length=256, **BLOCKS))["retrieval"] == "blocks"
    # block stores made before exact scoring and held selections existed selected as exact_block_queries=0 and
    # hold_blocks=False do, and hash the same
    old = config_fields(MemoryConfig(segment_length=256, exact_block_queries=0, hold_blocks=False, **BLOCKS))
    assert "exact_block_queries" not in old and "hold_blocks" not in old
    assert "hold_blocks" not in config_fields(MemoryConfig(segment_length=256, hold_blocks=False, **BLOCKS))
    new = config_fields(MemoryConfig(segment_length=256, **BLOCKS))
    assert new["exact_block_queries"] == 64 and new["hold_blocks"] is True and "block_neighbours" not in new
    assert config_fields(MemoryConfig(segment_length=256, block_neighbours=1, **BLOCKS))["block_neighbours"] == 1
    assert "pooled_selection_from" not in new
    assert config_fields(MemoryConfig(segment_length=256, pooled_selection_from=3, **BLOCKS))[
        "pooled_selection_from"] == 3


def test_mistral_sliding_window_and_float32_blocks_run():
    config = transformers.MistralConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        sliding_window=64)
    torch.manual_seed(0)
    mem_model = block_model(transformers.MistralForCausalLM(config).eval(), top_blocks=2, memory_capacity=64)
    logits = session_logits(mem_model, document(70))
    assert logits.shape == (1, 70, VOCAB_SIZE) and torch.isfinite(logits).all()


def test_the_service_ingests_and_answers_with_block_memory(tmp_path):
    """memlm-tiny with block retrieval behind the HTTP app: upload, query with citations inside the document,
    and a store the service made reopens in a session."""
    from fastapi.testclient import TestClient

    from memlm.serve.app import create_app
    from memlm.tiny import load_default

    mem_model, _ = load_default(retrieval="blocks", block_size=16, top_blocks=4, memory_dtype="float16")
    text = make_text(200, seed=7) + " The pass key is 417. Remember it. 417 is the pass key. " + make_text(100, seed=8)
    with MemoryStore(tmp_path / "store") as store:
        with TestClient(create_app(store, mem_model)) as http:
            stored_doc = http.put("/v1/documents/book", content=text.encode(),
                                  headers={"content-type": "text/plain; charset=utf-8"})
            assert stored_doc.status_code == 200 and stored_doc.json()["status"] == "complete"
            answer = http.post("/v1/query", json={"documents": ["book"], "prompt": " What is the pass key? The pass "
                                                  "key is", "max_new_tokens": 3})
            assert answer.status_code == 200 and answer.json()["tokens"] == 3
            tokens = stored_doc.json()["tokens"]
            assert answer.json()["retrieved"] and all(0 <= r["token_offset"] < tokens
                                                      for r in answer.json()["retrieved"])
        with mem_model.session(store=store, documents=["book"]) as session:
            # every token is in block memory or in the local context, once
            assert session.state.memory.blocks[0].total + session.state.local.length == session.tokens_seen == tokens
