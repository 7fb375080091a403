"""The passkey test: can a model find a number hidden far back in a long haystack?

A haystack of filler sentences hides ``The pass key is N. Remember it. N is the pass key.`` at a
chosen depth and ends with ``What is the pass key? The pass key is`` (``memlm.data.Passkey``, the
Landmark-Attention / LongLLaMA test). The haystack is streamed into a session, the answer decoded
greedily; it is right when every token of `` N`` comes out. ``memlm demo`` runs one trial,
``benchmarks/bench_passkey.py`` a grid of them; rows of a batch are independent trials.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from .data import Passkey


@dataclass
class PasskeyResult:
    """One trial: the hidden ``key``, the model's ``answer`` (decoded), whether it is ``right``, the
    token index where the key starts (``key_position``) of ``tokens`` in all, and the streaming
    speed of its batch (``tokens_per_second``, every row counted)."""

    key: str
    answer: str
    right: bool
    key_position: int
    tokens: int
    tokens_per_second: float


def passkey_trials(mem_model, tokenizer, *, length: int, seeds: list[int], depth: float | None = None,
                   digits: int = 5, progress: bool = False) -> list[PasskeyResult]:
    """Run one trial per seed, all in one batched session: haystacks of ``length`` tokens (question and
    answer included), key at ``depth`` (a fraction of the haystack; random per seed when None)."""
    if not seeds:
        raise ValueError("passkey_trials needs at least one seed")
    task = Passkey(tokenizer, digits=digits, depth=depth)
    samples = [task.sample(random.Random(f"passkey:{seed}"), length) for seed in seeds]
    answer_tokens = len(samples[0]["answer"])
    if any(len(s["answer"]) != answer_tokens for s in samples):
        raise RuntimeError("keys of one batch must have answers of the same number of tokens")
    prompts = torch.tensor([s["ids"][:-answer_tokens] for s in samples])
    start = time.perf_counter()
    with torch.no_grad(), mem_model.session(batch_size=len(seeds)) as session:
        session.feed(prompts[:, :-1], progress=progress)
        answers = session.generate(prompts[:, -1:], max_new_tokens=answer_tokens, eos_token_id=[])
    speed = prompts.numel() / (time.perf_counter() - start)
    return [
        PasskeyResult(key=s["key"], answer=tokenizer.decode(row).strip(), right=row.tolist() == s["answer"],
                      key_position=s["key_start"], tokens=length, tokens_per_second=speed)
        for s, row in zip(samples, answers, strict=True)
    ]
