"""The trainer: exact resume, data parallel on gloo, what LoRA trains, the RMT curriculum, bad configs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memlm import MemoryConfig, attach, use_attention
from memlm.train import TrainConfig, Trainer, checkpoint_path
from memlm.train.data import AssociativeRecall
from memlm.train.parallel import sequence_group

from conftest import VOCAB_SIZE, build_tiny_llama

TASK = AssociativeRecall(vocab_size=VOCAB_SIZE, pairs=4, keys=16, values=16)
GATED = MemoryConfig(segment_length=8, xl_length=8, memory_layers=(1,), top_k=8, memory_capacity=32)


def trainer(config: TrainConfig, memory: MemoryConfig = GATED) -> Trainer:
    return Trainer(attach(build_tiny_llama(), memory), TASK, config)


def train_config(**overrides) -> TrainConfig:
    values = {"steps": 6, "batch_size": 2, "document_tokens": 32, "trainable": "all", "lr": 3e-3, "warmup_steps": 2,
              "progress": False}
    return TrainConfig(**{**values, **overrides})


def parameters(t: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in t.mem_model.model.named_parameters()}


def test_resume_continues_exactly(tmp_path):
    straight = trainer(train_config())
    straight.train()
    first = trainer(train_config(checkpoint_dir=str(tmp_path)))
    first.train(steps=3)
    assert checkpoint_path(tmp_path) == tmp_path / "step-3"
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint.json", "step-3"}
    assert {p.name for p in (tmp_path / "step-3").iterdir()} == {"trainable.safetensors", "trainer_state.pt",
                                                                 "train_config.json"}
    resumed = trainer(train_config(checkpoint_dir=str(tmp_path)))
    resumed.resume(tmp_path)
    assert resumed.step == 3
    resumed.train()
    assert resumed.history == straight.history
    expected = parameters(straight)
    for name, value in parameters(resumed).items():
        assert torch.equal(value, expected[name]), name


#: A child process: train, checkpoint at step 2, then die by SIGKILL at one point of the step-4 checkpoint save:
#: just before (or after) the given call, counted from the start of that save.
KILLED_DURING_SAVE = """
import os, shutil, signal, sys
from pathlib import Path
import torch
import memlm.train.trainer as trainer_module
sys.path.insert(0, {tests!r})
from test_train import train_config, trainer

target, occurrence, when = {point!r}
calls = {{}}
def killing(name, call):
    def wrapped(*args, **kwargs):
        if t.step == 4:
            calls[name] = calls.get(name, 0) + 1
            if (name, calls[name], when) == (target, occurrence, "before"):
                os.kill(os.getpid(), signal.SIGKILL)
        result = call(*args, **kwargs)
        if t.step == 4 and (name, calls.get(name), when) == (target, occurrence, "after"):
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped
trainer_module.save_file = killing("save_file", trainer_module.save_file)
torch.save = killing("torch.save", torch.save)
os.fsync = killing("fsync", os.fsync)
os.replace = killing("replace", os.replace)
shutil.rmtree = killing("rmtree", shutil.rmtree)
Path.write_text = killing("write_text", Path.write_text)
t = trainer(train_config(checkpoint_dir={directory!r}, checkpoint_every=2))
t.train()
"""

#: Where the save is cut: before the weights, the state, the config, the first fsync, the manifest, its rename,
#: the deletion of the previous checkpoint, and after that deletion.
KILL_POINTS = [("save_file", 1, "before"), ("torch.save", 1, "before"), ("write_text", 1, "before"),
               ("fsync", 1, "before"), ("write_text", 2, "before"), ("replace", 1, "before"),
               ("rmtree", 1, "before"), ("rmtree", 1, "after")]


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS, ids=["-".join(map(str, p)) for p in KILL_POINTS])
def test_a_checkpoint_save_killed_at_any_point_resumes_from_a_whole_checkpoint(tmp_path, point):
    directory = tmp_path / "checkpoints"
    script = KILLED_DURING_SAVE.format(tests=str(Path(__file__).parent), point=point, directory=str(directory))
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.returncode == -9, child.stderr[-2000:]  # it died by SIGKILL in the save, not otherwise
    published = 4 if point in (("rmtree", 1, "before"), ("rmtree", 1, "after")) else 2
    assert checkpoint_path(directory) == directory / f"step-{published}"
    resumed = trainer(train_config(checkpoint_dir=str(directory), checkpoint_every=2))
    resumed.resume(directory)
    assert resumed.step == published
    resumed.train()
    straight = trainer(train_config())
    straight.train()
    assert resumed.history == straight.history
    expected = parameters(straight)
    for name, value in parameters(resumed).items():
        assert torch.equal(value, expected[name]), name
    assert {p.name for p in directory.iterdir()} == {"checkpoint.json", "step-6"}  # leftovers cleaned up


def test_a_checkpoint_loads_without_unpickling_code(tmp_path):
    t = trainer(train_config(steps=2, checkpoint_dir=str(tmp_path)))
    t.train()
    state = torch.load(tmp_path / "step-2" / "trainer_state.pt", weights_only=True)  # what resume does
    assert state["step"] == 2 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    (tmp_path / "step-2" / "trainable.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="not a whole checkpoint"):
        trainer(train_config()).resume(tmp_path)


class EveryToken:
    """Random documents in which every token is scored."""

    def document(self, rng, tokens):
        ids = [rng.randrange(VOCAB_SIZE) for _ in range(tokens)]
        return ids, ids


def test_a_document_fed_in_windows_scores_every_target_of_the_whole_document():
    mem_model = attach(build_tiny_llama(), GATED)
    ids = torch.randint(0, VOCAB_SIZE, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), mem_model.session(batch_size=2) as session:
        whole = session.feed(ids, labels=ids).loss * 2 * 31
    windows = 0.0
    with torch.no_grad(), mem_model.session(batch_size=2) as session:
        for start in range(0, 32, 8):  # each window's labels reach one token into the next window
            windows += session.feed(ids[:, start : start + 8], labels=ids[:, start : start + 9]).loss * (
                2 * (ids[:, start + 1 : start + 9].shape[1]))
    torch.testing.assert_close(windows, whole)


def test_documents_in_windows_carry_memory_across_steps_and_resume_exactly(tmp_path):
    """Two optimizer steps per document; checkpoints fall between documents."""
    settings = {"steps": 6, "step_segments": 2, "trainable": "all"}
    straight = Trainer(attach(build_tiny_llama(), GATED), EveryToken(), train_config(**settings))
    assert straight.windows == 2
    straight.train()
    first = Trainer(attach(build_tiny_llama(), GATED), EveryToken(),
                    train_config(**settings, checkpoint_dir=str(tmp_path)))
    first.train(steps=2)
    with pytest.warns(UserWarning, match="no checkpoint at step 3: it is inside a document"):
        first.train(steps=1)
    with pytest.raises(ValueError, match="inside a document; checkpoints fall on document boundaries"):
        first.save_checkpoint(tmp_path)
    resumed = Trainer(attach(build_tiny_llama(), GATED), EveryToken(), train_config(**settings))
    resumed.resume(tmp_path)
    resumed.train()
    assert resumed.history == straight.history
    expected = parameters(straight)
    for name, value in parameters(resumed).items():
        assert torch.equal(value, expected[name]), name


def test_a_window_without_scored_tokens_only_fills_memory():
    """Associative recall asks its questions at the end: the first windows stream the pairs in, unscored."""
    t = trainer(train_config(steps=4, step_segments=1, warmup_steps=0))
    before = parameters(t)
    t.train_step()
    assert math.isnan(t.history[0]) and all(torch.equal(v, before[n]) for n, v in parameters(t).items())
    t.train(steps=3)  # the last window holds the questions: an update
    assert not math.isnan(t.history[-1])
    assert any(not torch.equal(v, before[n]) for n, v in parameters(t).items())


WHOLE = MemoryConfig(segment_length=32, xl_length=0, memory_layers=())  # one forward per 32-token document


def full_parameters(t: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter, whole (FSDP2 holds DTensor shards: gathered on every rank)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in t.mem_model.model.named_parameters()}


def _rank_train(rank: int, world: int, store: str, out: str, overrides: dict, sequence: int,
                resume_after: int | None) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        config = train_config(**overrides, sequence_parallel=sequence)

        def new_trainer() -> Trainer:
            if sequence > 1:  # whole documents, each sharded over a group of `sequence` ranks with ring attention
                model = use_attention(build_tiny_llama(), "ring", group=sequence_group(sequence))
                return Trainer(attach(model, WHOLE), TASK, config)
            return trainer(config)

        t = new_trainer()
        if resume_after is not None:  # checkpoint, then continue in a fresh trainer from the files
            t.train(steps=resume_after)
            t = new_trainer()
            t.resume(config.checkpoint_dir)
        t.train()
        evaluation = t.evaluate(documents=4)
        weights = full_parameters(t)
        if rank == 0:
            torch.save({"params": weights, "history": t.history, "evaluation": evaluation}, out)
    finally:
        dist.destroy_process_group()


def distributed_run(tmp_path, world: int, overrides: dict, sequence: int = 1, resume_after: int | None = None) -> dict:
    out = str(tmp_path / "ranks.pt")
    mp.spawn(_rank_train, args=(world, str(tmp_path / "store"), out, overrides, sequence, resume_after),
             nprocs=world, join=True)
    return torch.load(out)


def assert_same_training(ranks: dict, single: Trainer) -> None:
    assert ranks["history"] == pytest.approx(single.history, rel=1e-5)
    for name, value in parameters(single).items():
        torch.testing.assert_close(ranks["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_gloo_ranks_equal_one_rank_with_twice_the_batch(engine, tmp_path):
    ranks = distributed_run(tmp_path, 2, {"steps": 2, "batch_size": 2, "grad_accumulation": 2,
                                          "data_parallel": engine})
    single = trainer(train_config(steps=2, batch_size=4, grad_accumulation=2))
    single.train()
    assert_same_training(ranks, single)


@pytest.mark.slow
def test_fsdp_checkpoints_gather_the_shards_and_resume_exactly(tmp_path):
    ranks = distributed_run(tmp_path, 2, {"steps": 3, "data_parallel": "fsdp",
                                          "checkpoint_dir": str(tmp_path / "checkpoint")}, resume_after=2)
    single = trainer(train_config(steps=3, batch_size=4))
    single.train()
    assert_same_training(ranks, single)


@pytest.mark.slow
@pytest.mark.parametrize("world, sequence", [(2, 2), (4, 2)])
def test_sequence_parallel_ring_training_equals_one_rank(world, sequence, tmp_path):
    """Documents sharded over `sequence` ranks with ring attention, data parallel over world / sequence groups: the
    same losses, parameters and held-out evaluation as one process with the whole batch."""
    ranks = distributed_run(tmp_path, world, {"steps": 2, "batch_size": 2}, sequence)
    single = Trainer(attach(build_tiny_llama(), WHOLE), TASK,
                     train_config(steps=2, batch_size=2 * world // sequence))
    single.train()
    assert_same_training(ranks, single)
    assert ranks["evaluation"] == pytest.approx(single.evaluate(documents=4), rel=1e-5)


def test_lora_trains_only_the_adapters_and_memlm_parameters():
    t = trainer(train_config(trainable="lora", steps=1, lr=1e-2, warmup_steps=0))
    names = set(t.parameters)
    assert names and all("lora_" in n or n.startswith("memlm_memory.") for n in names)
    assert any(".q_proj.lora_A" in n for n in names) and any(".v_proj.lora_B" in n for n in names)
    assert "memlm_memory.gates" in names
    before = parameters(t)
    t.train()
    after = parameters(t)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    # LoRA's B starts at zero, so A gets no gradient in the first step; B and the gates move.
    assert "memlm_memory.gates" in changed and any("lora_B" in n for n in changed)
    assert changed <= names
    for name, p in t.mem_model.model.named_parameters():
        assert p.requires_grad == (name in names)


def test_memory_only_training_moves_the_gates_alone():
    t = trainer(train_config(trainable="memory", steps=2, lr=1e-1, warmup_steps=0))
    before = parameters(t)
    t.train()
    after = parameters(t)
    assert {n for n in after if not torch.equal(after[n], before[n])} == {"memlm_memory.gates"}


def test_rmt_curriculum_grows_the_documents():
    memory = MemoryConfig(segment_length=8, xl_length=0, memory_layers=(), rmt_tokens=2, rmt_bptt_depth=2)
    t = trainer(train_config(trainable="memory", steps=4, curriculum=((0, 2), (2, 4))), memory)
    assert [t.document_tokens(s) for s in range(4)] == [16, 16, 32, 32]
    before = parameters(t)["memlm_memory.rmt_memory"]
    t.train()
    assert not torch.equal(parameters(t)["memlm_memory.rmt_memory"], before)


def test_crossbatch_training_steps(tmp_path):
    memory = MemoryConfig(segment_length=8, xl_length=0, memory_layers=(1,), fusion="joint")
    t = trainer(train_config(steps=2, batch_size=3, crossbatch_positives=1, crossbatch_negatives=2), memory)
    history = t.train()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history)))
    assert t.evaluate(documents=3)["scored_tokens"] == 3 * 4  # evaluation runs on the kNN index


@pytest.mark.parametrize(("overrides", "message"), [
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"trainable": "head"}, "trainable must be one of"),
    ({"trainable": "lora+"}, r"now .lora_embed_norm. .* LoRA\+ is Hayou et al"),
    ({"lr": -1.0}, "lr must be a finite number > 0"),
    ({"grad_clip": 0}, "grad_clip must be a number > 0 or None"),
    ({"crossbatch_negatives": 1}, "needs crossbatch_positives"),
    ({"curriculum": ((1, 2),)}, "curriculum must be"),
    ({"precision": "fp8"}, "precision must be one of"),
    ({"step_segments": 2, "curriculum": ((0, 2),)}, "not both"),
    ({"data_parallel": "zero3"}, "data_parallel must be one of"),
    ({"sequence_parallel": 0}, "sequence_parallel must be an integer >= 1"),
    ({"sequence_parallel": 2, "step_segments": 1}, "whole documents in one sharded forward"),
])
def test_bad_train_configs_say_what_was_expected(overrides, message):
    with pytest.raises(ValueError, match=message):
        train_config(**overrides)


def test_configs_that_do_not_fit_the_model_are_refused():
    with pytest.raises(ValueError, match="multiple of segment_length"):
        trainer(train_config(document_tokens=30))
    with pytest.raises(ValueError, match="multiple of step_segments x segment_length"):
        trainer(train_config(document_tokens=32, step_segments=3))
    with pytest.raises(ValueError, match="multiple of the steps per document"):
        trainer(train_config(document_tokens=32, step_segments=1, checkpoint_every=3))
    with pytest.raises(ValueError, match="needs a CUDA model"):
        trainer(train_config(precision="bf16"))
    with pytest.raises(ValueError, match="leaves nothing to train"):
        trainer(train_config(trainable="memory"), MemoryConfig(segment_length=8, memory_layers=()))
    with pytest.raises(ValueError, match="name no module"):
        trainer(train_config(trainable="lora", lora_targets=("c_attn",)))
    with pytest.raises(ValueError, match="at most batch_size - 1"):
        trainer(train_config(crossbatch_positives=1, crossbatch_negatives=2),
                MemoryConfig(segment_length=8, memory_layers=(1,), fusion="joint"))


def test_sequence_parallel_refuses_what_a_sharded_forward_cannot_train(tmp_path):
    with pytest.raises(ValueError, match="must divide the world size 1"):
        trainer(train_config(sequence_parallel=2))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="memory config needs memory_layers"):
            Trainer(attach(use_attention(build_tiny_llama(), "ring"), GATED), TASK, train_config())
        t = Trainer(attach(use_attention(build_tiny_llama(), "ring"), WHOLE), TASK, train_config(steps=1))
        assert t.ring is not None and math.isfinite(t.train()[0])  # one rank: the ring is causal attention
    finally:
        dist.destroy_process_group()


def test_resume_refuses_a_checkpoint_of_other_parameters(tmp_path):
    t = trainer(train_config(trainable="memory", steps=1, checkpoint_dir=str(tmp_path)))
    t.train()
    with pytest.raises(ValueError, match="holds weights for other parameters"):
        trainer(train_config()).resume(tmp_path)
    with pytest.raises(FileNotFoundError, match="made by save_checkpoint"):
        trainer(train_config()).resume(tmp_path / "nothing")




def test_memlm_train_runs_a_recipe_and_resumes(tmp_path, capsys):
    from memlm.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model:\n"
        "  llama: {vocab_size: 320, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,\n"
        "          num_attention_heads: 2, num_key_value_heads: 2}\n"
        "memory: {segment_length: 8, xl_length: 8, memory_layers: [0], fusion: joint, top_k: 8}\n"
        "task: {name: associative_recall, pairs: 4, keys: 8, values: 8, fact_tokens: true}\n"
        "train: {steps: 4, batch_size: 2, document_tokens: 32, trainable: all, crossbatch_positives: 2,\n"
        "        progress: false}\n"
        "evaluate: {documents: 4}\n"
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--output", str(out), "--steps", "2"]) == 0
    assert "steps=2" in capsys.readouterr().out
    for name in ("metrics.json", "memlm/memlm_config.json", "model/config.json", "checkpoint/checkpoint.json"):
        assert (out / name).is_file(), name
    assert main(["train", "--config", str(recipe), "--output", str(out), "--resume"]) == 0
    assert "steps=4" in capsys.readouterr().out
    recipe.write_text("model: {path: a, llama: {}}\ntask: {name: text}\n")
    with pytest.raises(ValueError, match="exactly one of 'path'"):
        main(["train", "--config", str(recipe), "--output", str(out)])
    recipe.write_text("task: {name: text}\n")
    with pytest.raises(ValueError, match="model and task required"):
        main(["train", "--config", str(recipe), "--output", str(out)])
    recipe.write_text("model: {llama: {}}\ntask: {name: associative_recall}\ntrain: {stepz: 3}\n")
    with pytest.raises(ValueError, match="unknown TrainConfig fields \\['stepz'\\]"):
        main(["train", "--config", str(recipe), "--output", str(out)])
    tiny = ("model: {llama: {vocab_size: 320, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1,\n"
            "                num_attention_heads: 2}}\n")
    recipe.write_text(tiny + "memory: {memory_layers: [0]}\ntask: {name: associative_recall, pears: 3}\n")
    with pytest.raises(ValueError, match=r"task 'associative_recall': .*pears"):
        main(["train", "--config", str(recipe), "--output", str(out)])


@pytest.mark.slow
def test_memory_learns_recall_beyond_the_xl_window_and_no_memory_stays_at_chance():
    """Facts in the first of four segments, questions in the last, XL window one segment: only memory reaches
    the facts. Trained with differentiable CrossBatch memory, evaluated through the kNN index on held-out
    documents."""
    task = AssociativeRecall(vocab_size=VOCAB_SIZE, pairs=8, keys=12, values=12, fact_tokens=True)
    settings = {"batch_size": 32, "document_tokens": 64, "trainable": "all", "lr": 3e-3, "warmup_steps": 20,
                "schedule": "constant", "progress": False}
    accuracy = {}
    for name, layers, steps, extra in (("memory", (0,), 400, {"crossbatch_positives": 2}), ("none", (), 150, {})):
        memory = MemoryConfig(segment_length=16, xl_length=16, memory_layers=layers, fusion="joint", top_k=32,
                              memory_capacity=64)
        t = Trainer(attach(build_tiny_llama(), memory), task, TrainConfig(steps=steps, **settings, **extra))
        t.train()
        accuracy[name] = t.evaluate(documents=128)["accuracy"]
    assert accuracy["memory"] >= 0.9, accuracy
    assert accuracy["none"] < 2 / 12, accuracy  # chance is 1/12


def test_lora_embed_norm_trains_adapters_embeddings_and_norms_and_merges_into_the_weights():
    from memlm.train.lora import merge_lora, unload_lora

    t = trainer(train_config(trainable="lora_embed_norm", steps=2, lr=1e-2, warmup_steps=0))
    model = t.mem_model.model
    names = set(t.parameters)
    adapters = {n for n in names if "lora_" in n}
    # LoRA on q, k, v, o of both layers (A and B each), the input embeddings, every RMSNorm, memlm's gates
    assert {n.split(".")[-4] for n in adapters} == {"q_proj", "k_proj", "v_proj", "o_proj"} and len(adapters) == 16
    norms = {n for n, _ in model.named_parameters() if "norm" in n}
    assert len(norms) == 2 * 2 + 1  # two per layer and the final one
    assert names == adapters | norms | {"model.embed_tokens.weight", "memlm_memory.gates"}
    t.train()
    ids = torch.randint(0, VOCAB_SIZE, (2, 24))
    with torch.no_grad():
        adapted = model(ids).logits
        merge_lora(model)
        assert not any("lora_" in n for n, _ in model.named_parameters())
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=0)
    # unloading without merging leaves the base model exactly as it was
    untrained = trainer(train_config(trainable="lora_embed_norm", steps=1)).mem_model.model
    unload_lora(untrained)
    original = dict(build_tiny_llama().named_parameters())
    after = {n: p for n, p in untrained.named_parameters() if not n.startswith("memlm_memory.")}
    assert after.keys() == original.keys() and all(torch.equal(after[n], original[n]) for n in original)
    with pytest.raises(ValueError, match="no LoRA adapters to merge"):
        merge_lora(model)


RING_RECIPE = (
    "model:\n"
    "  llama: {vocab_size: 320, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,\n"
    "          num_attention_heads: 4, num_key_value_heads: 2}\n"
    "memory: {segment_length: 32, xl_length: 0, memory_layers: []}\n"
    "task: {name: associative_recall, pairs: 4, keys: 8, values: 8}\n"
    "train: {steps: 2, batch_size: 2, document_tokens: 32, trainable: all, progress: false, sequence_parallel: %d}\n"
    "evaluate: {documents: 4}\n"
)


def _rank_recipe(rank: int, world: int, port: int, recipe: str, out: str) -> None:
    import os

    from memlm.cli import main

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # what torchrun sets
    torch.set_num_threads(1)
    assert main(["train", "--config", recipe, "--output", out]) == 0


@pytest.mark.slow
def test_memlm_train_under_torchrun_shards_documents_with_ring_attention(tmp_path):
    import json
    import socket

    recipe = tmp_path / "ring.yaml"
    recipe.write_text(RING_RECIPE % 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_recipe, args=(2, port, str(recipe), str(tmp_path / "ring")), nprocs=2, join=True)
    from memlm.cli import main

    recipe.write_text(RING_RECIPE % 1)
    assert main(["train", "--config", str(recipe), "--output", str(tmp_path / "one")]) == 0
    ring, one = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ring", "one"))
    assert ring == pytest.approx(one, rel=1e-5)
    saved = json.loads((tmp_path / "ring" / "model" / "config.json").read_text())
    assert not str(saved.get("_attn_implementation", saved.get("attn_implementation", ""))).startswith("memlm")
