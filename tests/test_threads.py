"""The thread policy (``memlm/runtime/threads.py``): each forward on min(limit, what its work pays for, free cores)."""

import subprocess
import sys
import time

import pytest
import torch

from memlm import MemoryConfig, ThreadPolicy, attach
from memlm.runtime import threads as thread_module
from memlm.runtime.threads import WORK_PER_THREAD, available_cores, busy_elsewhere, forward_work

from conftest import build_tiny_llama, document


def forward_threads(mem_model, **session_kwargs) -> list[int]:
    """The intra-op threads every forward of a 3-segment feed ran on, seen from inside the model."""
    seen = []
    hook = mem_model.model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    try:
        with torch.no_grad(), mem_model.session(**session_kwargs) as session:
            session.feed(document(3 * mem_model.config.segment_length, seed=1))
    finally:
        hook.remove()
    return seen


@pytest.fixture
def mem_model():
    return attach(build_tiny_llama(), MemoryConfig(segment_length=16, xl_length=16, memory_layers=(1,), top_k=4))


@pytest.fixture
def torch_threads():
    """torch's thread count comes back after the test, whatever it set."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_bad_limits_are_refused():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be None or an integer >= 1"):
            ThreadPolicy(bad)


def test_the_limit_defaults_to_torchs_count_where_the_policy_is_made(torch_threads):
    torch.set_num_threads(1)
    assert ThreadPolicy().limit == 1
    torch.set_num_threads(2)
    assert ThreadPolicy().limit == 2 and ThreadPolicy.of(3).limit == 3
    policy = ThreadPolicy(2, adaptive=False)
    assert ThreadPolicy.of(policy) is policy


def test_a_fixed_policy_runs_every_forward_on_its_count_and_torchs_count_comes_back(mem_model, torch_threads):
    torch.set_num_threads(1)
    assert forward_threads(mem_model, threads=ThreadPolicy(2, adaptive=False)) == [2, 2, 2]
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert forward_threads(mem_model, threads=ThreadPolicy(1, adaptive=False)) == [1, 1, 1]
    assert torch.get_num_threads() == 2


def test_small_forwards_run_on_one_thread(mem_model, torch_threads):
    """A tiny model's segment is far below WORK_PER_THREAD: a second thread would not pay for its fork and join."""
    per_token, per_row = forward_work(mem_model.model)
    assert 16 * per_token + per_row < WORK_PER_THREAD
    assert forward_threads(mem_model, threads=4) == [1, 1, 1]


def test_forward_work_counts_the_weights_a_token_passes_through(mem_model):
    model = mem_model.model
    embedding = model.get_input_embeddings().weight.numel()
    layers = sum(p.numel() for p in model.model.layers.parameters()) + model.model.norm.weight.numel()
    gates = sum(p.numel() for p in mem_model.memory_module.parameters())  # memlm's own (a gate per head)
    assert forward_work(model) == (layers + gates, embedding)  # tied output layer: one row per logit vector


def test_large_forwards_take_the_cores_other_processes_leave(torch_threads, monkeypatch):
    policy, work = ThreadPolicy(8), 100 * WORK_PER_THREAD
    cores = available_cores()
    for busy, expected in ((0, min(8, cores)), (cores - 1, 1), (cores + 3, 1), (None, min(8, cores))):
        monkeypatch.setattr(thread_module, "busy_elsewhere", lambda busy=busy: busy)
        assert policy.threads(work) == expected
    assert policy.threads(3 * WORK_PER_THREAD) <= 3  # no more threads than the work pays for
    assert ThreadPolicy(8, adaptive=False).threads(1) == 8


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the runnable tasks are read from Linux's /proc")
def test_busy_processes_are_seen():
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.3)
        seen = [busy_elsewhere() for _ in range(50)]
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert all(isinstance(n, int) and n >= 0 for n in seen)
    assert max(seen) >= 2  # both spin all the time: each is running or waiting in a run queue


def test_logits_do_not_depend_on_the_thread_count(mem_model, torch_threads):
    ids = document(40, seed=2)
    logits = []
    for threads in (1, 2):
        with torch.no_grad(), mem_model.session(threads=ThreadPolicy(threads, adaptive=False)) as session:
            logits.append(session.feed(ids, return_logits=True).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
