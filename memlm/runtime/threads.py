"""How many intra-op threads each forward of a session runs on.

memlm's work per segment is many small operations (a few matmuls per layer over a segment of tens to hundreds of
tokens, a search, a merge). torch runs each on all its OpenMP threads, and every parallel region ends at a barrier:
when another process holds one of the cores, the threads that are done spin, then sleep, until the descheduled one
runs again, so an operation of a tenth of a millisecond can last a scheduler slice. ``benchmarks/bench_threads.py``
on a 2-core AMD EPYC (AVX2), streaming on 1 and 2 threads (the README's table):

    memlm-tiny    idle 3,873 vs 3,683 tok/s;  beside one busy process 3,554 vs 973;  beside two 2,339 vs 1,150
    SmolLM2-135M  idle   169 vs   282 tok/s;  beside one busy process   142 vs  67;  beside two    64 vs    51

A second thread pays up to 1.7x on an idle machine and costs 1.3-4x on a busy one. So each forward runs on

    min(limit, threads its work pays for, cores that other processes leave free)

- ``limit``: the session's ``threads``, by default ``torch.get_num_threads()`` of the thread that opened the session
  (``OMP_NUM_THREADS``, ``torch.set_num_threads``, the commands' ``--threads``);
- the work: one thread per ``WORK_PER_THREAD`` multiply-adds of the forward (its tokens times the model's weights
  outside the input embedding, plus one row of the output layer): below it, fork and join cost what a second core
  saves (memlm-tiny's 64-token segments gain nothing from a second core, SmolLM2's 256-token ones 1.7x). The memory
  search is not counted: over hundreds of thousands of entries it outweighs a small model's layers;
- free cores: the CPUs this process may run on minus the tasks of other processes that are runnable right now
  (Linux: ``/proc/loadavg`` counts every runnable task, ``/proc/self/task`` says which are ours). Read before every
  forward that could use more than one thread, so a busy neighbour is seen within one segment. Where ``/proc`` is
  not readable, every core counts as free. Never more threads than cores: those would wait for each other.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from memlm.config import check_integer

#: multiply-adds of a forward per thread that pays for itself (see the module docstring)
WORK_PER_THREAD = 1 << 26


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or ``taskset``'s cores)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_elsewhere() -> int | None:
    """How many tasks of other processes are runnable right now, or None where Linux's ``/proc`` does not say."""
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])  # runnable tasks, ours included
        ours = 0
        for task in os.scandir("/proc/self/task"):
            with contextlib.suppress(FileNotFoundError), open(os.path.join(task.path, "stat"), "rb") as f:
                stat = f.read()
                state = stat.rindex(b")") + 2  # the state follows the name, which may hold any byte
                ours += stat[state : state + 1] == b"R"
        return max(0, running - ours)
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class ThreadPolicy:
    """Intra-op threads per forward (see the module docstring).

    limit: the most threads a forward uses (>= 1); None: ``torch.get_num_threads()`` where the policy is made.
    adaptive: False runs every forward on exactly ``limit`` threads (benchmarks compare fixed counts with it).
    """

    limit: int | None = None
    adaptive: bool = True

    def __post_init__(self) -> None:
        check_integer("threads", self.limit, 1, optional=True)
        if self.limit is None:
            object.__setattr__(self, "limit", torch.get_num_threads())

    @classmethod
    def of(cls, threads: int | ThreadPolicy | None) -> ThreadPolicy:
        """A session's ``threads`` argument as a policy: a policy, a limit, or None (torch's setting)."""
        return threads if isinstance(threads, ThreadPolicy) else cls(threads)

    def threads(self, work: int) -> int:
        """Threads for a forward of ``work`` multiply-adds."""
        if not self.adaptive or self.limit == 1:
            return self.limit
        wanted = min(self.limit, max(1, work // WORK_PER_THREAD))
        if wanted == 1:
            return 1
        return max(1, min(wanted, available_cores() - (busy_elsewhere() or 0)))

    @contextlib.contextmanager
    def forward(self, work: int) -> Iterator[int]:
        """Run the block on ``threads(work)`` intra-op threads (of the calling thread); torch's count comes back."""
        before, threads = torch.get_num_threads(), self.threads(work)
        if threads != before:
            torch.set_num_threads(threads)
        try:
            yield threads
        finally:
            if threads != before:
                torch.set_num_threads(before)


def forward_work(model: torch.nn.Module) -> tuple[int, int]:
    """(multiply-adds per token of ``model``'s forward outside its output layer, those of one output row)."""
    weights = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings().weight.numel()
    output = model.get_output_embeddings()
    head = output.weight.numel() if output is not None else 0
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    return weights - embeddings - (0 if tied else head), head
