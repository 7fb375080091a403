"""The passkey test: can a model find a number hidden far back in a long haystack?

A haystack of filler sentences hides ``The pass key is N. Remember it. N is the pass key.`` at a
chosen depth and ends with ``What is the pass key? The pass key is`` (``memlm.train.data.Passkey``, the
Landmark-Attention / LongLLaMA test). The haystack is streamed into a session, the answer decoded
greedily; it is right when every token of `` N`` comes out. ``memlm demo`` runs one trial,
``benchmarks/bench_passkey.py`` a grid of them.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from memlm.train.data import Passkey


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
    """Run one trial per seed: haystacks of ``length`` tokens (question and answer included), key at
    ``depth`` (a fraction of the haystack; random per seed when None). Trials run as the rows of one
    batched session (one per answer length, when keys tokenize into different numbers of tokens)."""
    if not seeds:
        raise ValueError("passkey_trials needs at least one seed")
    task = Passkey(tokenizer, digits=digits, depth=depth)
    samples = [task.sample(random.Random(f"passkey:{seed}"), length) for seed in seeds]
    # Rows of a session stream in step, so one session takes the keys whose answers have the same length.
    groups: dict[int, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(len(sample["answer"]), []).append(i)
    results: list[PasskeyResult | None] = [None] * len(samples)
    for answer_tokens, rows in groups.items():
        prompts = torch.tensor([samples[i]["ids"][:-answer_tokens] for i in rows])
        start = time.perf_counter()
        with torch.no_grad(), mem_model.session(batch_size=len(rows)) as session:
            session.feed(prompts[:, :-1], progress=progress)
            answers = session.generate(prompts[:, -1:], max_new_tokens=answer_tokens, eos_token_id=[])
        speed = prompts.numel() / (time.perf_counter() - start)
        for i, answer in zip(rows, answers, strict=True):
            sample = samples[i]
            results[i] = PasskeyResult(key=sample["key"], answer=tokenizer.decode(answer).strip(),
                                       right=answer.tolist() == sample["answer"], key_position=sample["key_start"],
                                       tokens=length, tokens_per_second=speed)
    return results
