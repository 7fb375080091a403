"""The evaluation suite: task generators, scoring, the runner and CLI, the lm-evaluation-harness bridge."""

from __future__ import annotations

import json
import re

import pytest
import torch

from memlm import MemoryConfig, attach
from memlm.cli import main
from memlm.eval import runner
from memlm.eval.tasks import TASKS, Haystack, Sample, make_sample, score

from conftest import make_text

TEXT = make_text(600, seed=11).replace(". ", ".\n\n", 40)
NEEDLE_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "lines",
                "variable_tracking", "babilong_qa1", "babilong_qa2")


@pytest.fixture(scope="module")
def haystack():
    return Haystack(TEXT, name="test text")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generators_are_deterministic_distinct_across_cells_and_fit_the_length(task, tokenizer, haystack):
    first = make_sample(task, tokenizer, haystack, 600, 0.5, seed=1)
    again = make_sample(task, tokenizer, haystack, 600, 0.5, seed=1)
    assert (first.context, first.question, first.references) == (again.context, again.question, again.references)
    others = [make_sample(task, tokenizer, haystack, 600, 0.5, seed=runner.cell_seed(task, 600, 0.5, k))
              for k in range(4)]
    assert len({tuple(s.references) for s in others}) >= (2 if task.startswith("babilong") else 4)
    tokens = len(tokenizer(first.context + " " + first.question)["input_ids"])
    assert 0.8 * 600 <= tokens <= 600
    for sample in [first, *others]:
        assert not set(sample.distractors) & set(sample.references)  # a distractor is never the answer
        assert all(ref and ref in sample.context for ref in sample.references)


@pytest.mark.parametrize("task", NEEDLE_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.8])
def test_the_needle_is_where_it_says(task, depth, tokenizer, haystack):
    sample = make_sample(task, tokenizer, haystack, 800, depth, seed=3)
    offset = sample.needles[0]  # the first needle (bAbI: the first fact) at the depth; one holds the answer
    assert any(sample.references[0] in sample.context[at : at + 120] for at in sample.needles)
    if task == "lines":  # the asked line is the depth's line of the record
        records = sample.context.split("\n")[1:]
        asked = next(i for i, line in enumerate(records) if sample.context[offset:].startswith(line))
        assert asked == round(depth * (len(records) - 1))
        return
    assert offset == 0 or sample.context[offset - 1] == " "  # needles sit between sentences
    assert abs(offset / len(sample.context) - depth) < 0.1


def test_multikey_with_uuid_values_asks_one_of_four_uuid_needles(tokenizer, haystack):
    sample = make_sample("niah_multikey_uuids", tokenizer, haystack, 3000, 0.5, seed=4)
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    assert re.fullmatch(uuid, sample.references[0]) and len(sample.distractors) == 3
    assert all(re.fullmatch(uuid, value) and value in sample.context for value in sample.distractors)
    assert sample.references[0] in sample.context and "special magic uuids" in sample.question
    assert score(sample, f" {sample.references[0]}.") == 1.0 and score(sample, f" {sample.distractors[0]}") == 0.0


def test_long_lines_records_fill_the_length_with_distinct_values(tokenizer, haystack):
    sample = make_sample("lines", tokenizer, haystack, 20000, 0.5, seed=1)
    assert 0.9 * 20000 <= len(tokenizer(sample.context + " " + sample.question)["input_ids"]) <= 20000
    values = re.findall(r"<(\d+)>", sample.context)
    keys = re.findall(r"^line (\S+):", sample.context, flags=re.M)
    assert len(values) == len(set(values)) == len(keys) == len(set(keys))
    assert any(re.fullmatch(r"[a-z]+-[a-z]+-\d+", key) for key in keys)  # past half of the adjective-noun pairs


def test_passkey_format_and_distractors(tokenizer, haystack):
    sample = make_sample("passkey", tokenizer, haystack, 700, 0.5, seed=5, digits=6, distractors=3)
    key = sample.references[0]
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in sample.context
    assert sample.question == "What is the pass key? The pass key is" and len(key) == 6
    assert len(sample.distractors) == 3 and all(f"The door code is {d}." in sample.context for d in sample.distractors)
    assert make_sample("passkey", tokenizer, Haystack(), 300, 0.5, seed=5).context.count("The grass is green.") >= 2


def test_variable_tracking_chains_resolve_to_the_references(tokenizer, haystack):
    sample = make_sample("variable_tracking", tokenizer, haystack, 900, 0.2, seed=7)
    value = re.search(r"the value (\d+)", sample.question).group(1)
    assigned = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", sample.context))
    resolved = set()
    for name in assigned:
        at = name
        while assigned[at].startswith("VAR "):
            at = assigned[at][4:]
        if assigned[at] == value:
            resolved.add(name)
    assert resolved == set(sample.references) and len(resolved) == 5


def test_cwe_and_fwe_references_are_the_most_frequent_words(tokenizer, haystack):
    cwe = make_sample("cwe", tokenizer, haystack, 1500, None, seed=2)
    words = re.findall(r"^\d+\. (\S+)$", cwe.context, flags=re.M)
    counts = {w: words.count(w) for w in set(words)}
    assert set(cwe.references) == set(sorted(counts, key=lambda w: -counts[w])[:10])
    fwe = make_sample("fwe", tokenizer, haystack, 1500, None, seed=2)
    coded = fwe.context.split("... ", 1)[1].split()
    counts = {w: coded.count(w) for w in set(coded)}
    assert set(fwe.references) == set(sorted(counts, key=lambda w: -counts[w])[:3])


def test_scoring_on_hand_made_answers():
    def sample(metric, refs):
        return Sample("t", 0, "", "", refs, metric, 8)

    assert score(sample("first_int", ["417"]), " 417. Remember it") == 1.0
    assert score(sample("first_int", ["417"]), " 4170") == 0.0  # the first integer, whole
    assert score(sample("first_int", ["417"]), " 12 then 417") == 0.0
    assert score(sample("first_int", ["417"]), " no number") == 0.0
    assert score(sample("all", ["abc", "def"]), " ABC, then xyz") == 0.5
    assert score(sample("all", ["abc", "def"]), " def and abc and more text") == 1.0
    assert score(sample("all", ["abc"]), "") == 0.0
    assert score(sample("first_sentence", ["kitchen"]), " kitchen. Then the garden.") == 1.0
    assert score(sample("first_sentence", ["kitchen"]), " garden. Then the kitchen.") == 0.0
    assert score(sample("first_sentence", ["kitchen"]), " kitchen or the garden.") == 0.0  # hedging is wrong


def test_bad_input(tokenizer, haystack):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_sample("nope", tokenizer, haystack, 500, 0.5, seed=0)
    with pytest.raises(ValueError, match="depth must be in \\[0, 1\\]"):
        make_sample("passkey", tokenizer, haystack, 500, 1.5, seed=0)
    with pytest.raises(ValueError, match="unknown modes"):
        runner.parse_modes("memory,bogus")
    with pytest.raises(ValueError, match="no sentences"):
        Haystack("   ")


def test_runner_answers_the_same_samples_in_every_mode_one_file_per_cell(tiny_llama, tokenizer, haystack,
                                                                                  tmp_path):
    config = MemoryConfig(segment_length=64, xl_length=64, memory_layers=(1,), top_k=8)
    mem_model = attach(tiny_llama, config, tokenizer=tokenizer)
    modes = runner.parse_modes("memory,memory-reset,memory-other")
    models = {mode.name: mem_model for mode in modes}
    summaries = runner.evaluate(models, tokenizer, tasks=["passkey"], lengths=[400], depths=[0.2], trials=2,
                                modes=modes, haystack=haystack, output=tmp_path)
    by_mode = {s["mode"]: s["records"] for s in summaries}
    assert [r["seed"] for r in by_mode["memory"]] == [r["seed"] for r in by_mode["memory-other"]]
    assert all(r["tokens"] > 350 for records in by_mode.values() for r in records)
    files = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json")}
    assert files == {f"passkey/{m}/L400_d0.2.json" for m in ("memory", "memory-other", "memory-reset")}
    table = runner.table(summaries)
    assert "| passkey | memory-reset |" in table and "400" in table


def test_a_cell_is_written_per_batch_and_a_rerun_answers_only_the_trials_it_lacks(tiny_llama, tokenizer, haystack,
                                                                                  tmp_path, monkeypatch):
    mem_model = attach(tiny_llama, MemoryConfig(segment_length=64, xl_length=64, memory_layers=(1,), top_k=8),
                       tokenizer=tokenizer)
    modes = runner.parse_modes("memory,memory-other")
    models = {mode.name: mem_model for mode in modes}
    run_cell, answered = runner.run_cell, []

    def counting(model, samples, group, *args):
        answered.append(([s.seed for s in samples], [m.name for m in group]))
        if len(answered) == 3:
            raise KeyboardInterrupt  # killed in the middle of the cell
        return run_cell(model, samples, group, *args)

    monkeypatch.setattr(runner, "run_cell", counting)
    cell = {"tasks": ["passkey"], "lengths": [300], "depths": [0.5], "haystack": haystack, "output": tmp_path}
    seeds = [runner.cell_seed("passkey", 300, 0.5, k) for k in range(5)]
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(models, tokenizer, trials=3, modes=modes[:1], **cell)
    path = tmp_path / "passkey" / "memory" / "L300_d0.5.json"
    assert [r["seed"] for r in json.loads(path.read_text())["records"]] == seeds[:2]  # the two answered kept
    answered.clear()
    summary, = runner.evaluate(models, tokenizer, trials=4, modes=modes[:1], **cell)
    assert answered == [([seeds[2]], ["memory"]), ([seeds[3]], ["memory"])]  # only the trials the file lacks
    assert [r["seed"] for r in summary["records"]] == seeds[:4] and summary["trials"] == 4
    assert json.loads(path.read_text())["trials"] == 4
    answered.clear()
    summary, = runner.evaluate(models, tokenizer, trials=2, modes=modes[:1], **cell)
    assert answered == [] and [r["seed"] for r in summary["records"]] == seeds[:2]
    # "other" pairs each sample with its neighbour's haystack: its cell is answered whole (with "memory"'s fifth)
    runner.evaluate(models, tokenizer, trials=2, modes=modes[1:], **cell)
    answered.clear()
    by_mode = {s["mode"]: s for s in runner.evaluate(models, tokenizer, trials=5, modes=modes, **cell)}
    assert answered == [(seeds, ["memory", "memory-other"])]
    outputs = [r["output"] for r in summary["records"]]
    assert [r["output"] for r in by_mode["memory"]["records"][:2]] == outputs  # the same samples, the same answers
    assert by_mode["memory-other"]["trials"] == by_mode["memory"]["trials"] == 5


def test_controls_stream_another_haystack_or_empty_the_memory(tiny_llama, tokenizer, haystack, monkeypatch):
    """One feed per haystack serves the three modes: ``other`` asks sample i after sample i+1's haystack, ``reset``
    asks after the memory was emptied; each answers as a session of its own would."""
    from memlm.memory.knn import KNNMemory
    from memlm.runtime.session import Session

    mem_model = attach(tiny_llama, MemoryConfig(segment_length=64, xl_length=64, memory_layers=(1,), top_k=8),
                       tokenizer=tokenizer)
    samples = [make_sample("passkey", tokenizer, haystack, 400, 0.2, seed=s) for s in (1, 2, 3)]
    modes = runner.parse_modes("memory,memory-reset,memory-other")
    fed, emptied = [], []
    feed, reset = Session.feed, KNNMemory.reset
    monkeypatch.setattr(Session, "feed", lambda self, text, **k: fed.append(text) or feed(self, text, **k))
    monkeypatch.setattr(KNNMemory, "reset", lambda self: emptied.append(bool(self.indexes)) or reset(self))
    records = runner.run_cell(mem_model, samples, modes, batch_size=2)
    assert fed == [[samples[0].context, samples[1].context], samples[2].context]  # each haystack once
    assert True in emptied  # the memory held entries when it was emptied
    assert [r["seed"] for r in records["memory-other"]] == [1, 2, 3]
    monkeypatch.setattr(Session, "feed", feed)

    def alone(context, question, reset_memory=False):
        with torch.no_grad(), mem_model.session() as session:
            session.feed(context)
            if reset_memory:
                session.state.clear_memory()
            return session.generate(" " + question, max_new_tokens=samples[0].max_new_tokens)

    for i, sample in enumerate(samples):
        assert records["memory"][i]["output"] == alone(sample.context, sample.question)
        assert records["memory-reset"][i]["output"] == alone(sample.context, sample.question, reset_memory=True)
        following = samples[(i + 1) % 3]
        assert records["memory-other"][i]["output"] == alone(following.context, sample.question)
    spare = make_sample("passkey", tokenizer, haystack, 400, 0.2, seed=9)
    one = runner.run_cell(mem_model, samples[:1], modes[2:], spare=spare)["memory-other"]
    assert one[0]["output"] == alone(spare.context, samples[0].question)
    with pytest.raises(ValueError, match="needs a spare sample"):
        runner.run_cell(mem_model, samples[:1], modes[2:])


def test_a_batched_cell_answers_as_one_session_per_sample(tiny_llama, tokenizer, haystack):
    """Rows of one session (haystacks of different lengths, an XL cache that evicts, top_k < memory) give every
    sample the answer it gets alone, in every control."""
    mem_model = attach(tiny_llama, MemoryConfig(segment_length=32, xl_length=32, memory_layers=(0, 1), top_k=4),
                       tokenizer=tokenizer)
    samples = [make_sample("passkey", tokenizer, haystack, n, 0.3, seed=s) for s, n in enumerate((300, 380, 333))]
    assert len({len(tokenizer(s.context)["input_ids"]) for s in samples}) == 3
    modes = runner.parse_modes("memory,memory-reset,memory-other")
    alone = runner.run_cell(mem_model, samples, modes, batch_size=1)
    batched = runner.run_cell(mem_model, samples, modes, batch_size=2)
    for mode in modes:
        assert [r["output"] for r in batched[mode.name]] == [r["output"] for r in alone[mode.name]]
        assert [r["batch"] for r in batched[mode.name]] == ([2, 2, 1] if mode.control != "other" else [2, 1, 2])
    # answers of different budgets in one batch: each row's cut to its own max_new_tokens and its own end token
    samples = [make_sample("niah_single", tokenizer, haystack, 300, 0.5, seed=s, values=kind)
               for s, kind in enumerate(("numbers", "uuids", "words"))]
    assert len({s.max_new_tokens for s in samples}) == 3
    alone = runner.run_cell(mem_model, samples, modes[:1], batch_size=1)["memory"]
    batched = runner.run_cell(mem_model, samples, modes[:1], batch_size=3)["memory"]
    assert [r["output"] for r in batched] == [r["output"] for r in alone]


def test_a_mode_skips_cells_beyond_its_max_length(tiny_llama, tokenizer, haystack, tmp_path):
    mem_model = attach(tiny_llama, MemoryConfig(segment_length=64, xl_length=0, memory_layers=()), tokenizer=tokenizer)
    path = tmp_path / "modes.yaml"
    path.write_text("full:\n  segment_length: 512\n  max_length: 400\n  attention: {name: dilated}\n")
    (mode,) = runner.parse_modes(str(path))
    assert mode.max_length == 400 and mode.overrides == {"segment_length": 512}
    assert mode.attention == {"name": "dilated"}
    mode.attention = None
    summaries = runner.evaluate({"full": mem_model}, tokenizer, tasks=["passkey"], lengths=[300, 600], depths=[0.5],
                                trials=1, modes=[mode], haystack=haystack)
    assert [s["length"] for s in summaries] == [300]
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        runner.Mode("full", max_length=0)


def test_perplexity_by_distance_equals_the_plain_models_loss(tiny_llama):
    """An XL cache that covers the document: the streamed loss is the plain model's."""
    ids = torch.randint(0, 320, (700,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(tiny_llama(ids[None]).logits[0, :-1], ids[1:]).item()
    mem_model = attach(tiny_llama, MemoryConfig(segment_length=64, xl_length=1024, memory_layers=()))
    result = runner.perplexity(mem_model, ids, buckets=(256, 1024))
    assert [b["tokens"] for b in result["buckets"]] == [256, 443]
    assert result["loss"] == pytest.approx(expected, abs=1e-3)


@pytest.mark.slow
def test_cli_end_to_end_on_memlm_tiny_and_a_rerun_skips_finished_cells(tmp_path, capsys, monkeypatch):
    haystack = tmp_path / "haystack.txt"
    haystack.write_text(TEXT, encoding="utf-8")
    args = ["eval", "--task", "passkey,niah_multikey,perplexity", "--lengths", "300,600", "--depths", "0.5",
            "--trials", "2", "--haystack", str(haystack), "--modes", "memory,off", "--output", str(tmp_path / "out"),
            "--plot"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| passkey | memory |" in out and "| niah_multikey | off |" in out and "| memory |" in out
    cells = sorted((tmp_path / "out").rglob("L*.json"))
    assert len(cells) == 2 * 2 * 2
    record = json.loads(cells[0].read_text())
    assert record["trials"] == 2 and len(record["records"]) == 2 and record["haystack"] == str(haystack)
    assert (tmp_path / "out" / "passkey_heatmap.png").stat().st_size > 1000
    assert (tmp_path / "out" / "perplexity.png").is_file() and (tmp_path / "out" / "perplexity.json").is_file()
    calls = []
    monkeypatch.setattr(runner, "run_cell", lambda *a, **k: calls.append(a) or [])
    assert main([*args[:-3], "--output", str(tmp_path / "out")]) == 0
    assert calls == []  # every cell was read back
    assert "| passkey | memory |" in capsys.readouterr().out


@pytest.mark.slow
def test_the_harness_bridge_through_simple_evaluate(tiny_llama, tokenizer, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from memlm.eval.harness import MemlmLM

    rows = [{"text": make_text(20, seed=i), "question": "Silver orchard", "choices": [" river", " stone"], "label": 0}
            for i in range(3)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test"}
    tasks = [
        {"task": "memlm_rolling", "output_type": "loglikelihood_rolling", "doc_to_text": "",
         "doc_to_target": "{{text}}", "metric_list": [{"metric": "word_perplexity"}], **common},
        {"task": "memlm_choice", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
         "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}], **common},
        {"task": "memlm_generate", "output_type": "generate_until", "doc_to_text": "{{question}}",
         "doc_to_target": "river", "generation_kwargs": {"until": ["."], "max_gen_toks": 5},
         "metric_list": [{"metric": "exact_match"}], **common},
    ]
    mem_model = attach(tiny_llama, MemoryConfig(segment_length=32, xl_length=32, memory_layers=(1,), top_k=8),
                       tokenizer=tokenizer)
    lm = MemlmLM(mem_model=mem_model)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, log_samples=False, bootstrap_iters=0)["results"]
    assert results["memlm_rolling"]["word_perplexity,none"] > 1
    assert 0 <= results["memlm_choice"]["acc,none"] <= 1 and "exact_match,none" in results["memlm_generate"]
    # rolling log-likelihood: the whole document through one session, every token predicted once
    ids = [tokenizer.eos_token_id] + tokenizer(rows[0]["text"], add_special_tokens=False)["input_ids"]
    with torch.no_grad(), mem_model.session() as session:
        logits = session.feed(torch.tensor([ids[:-1]]), return_logits=True).logits[0]
    expected = -torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()

    class Request:
        args = (rows[0]["text"],)

    assert lm.loglikelihood_rolling([Request()])[0] == pytest.approx(expected, abs=1e-3)


def test_modes_from_yaml_with_a_rope_extension(tmp_path):
    from memlm.tiny import load_default

    path = tmp_path / "modes.yaml"
    path.write_text("yarn: {extend: {method: yarn, factor: 2}, top_k: 8}\nreset: {control: reset}\n")
    yarn, reset = runner.parse_modes(str(path))
    assert (yarn.extend, yarn.overrides, reset.control) == ({"method": "yarn", "factor": 2}, {"top_k": 8}, "reset")
    mem_model, _ = load_default(extend=yarn.extend, **yarn.overrides)
    assert mem_model.model.config.rope_parameters["rope_type"] == "yarn" and mem_model.config.top_k == 8
    with pytest.raises(ValueError, match="extend needs a method"):
        load_default(extend={"factor": 2})
