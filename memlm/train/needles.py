"""Training documents made of ``memlm.eval``'s long-context tasks on a real-text haystack.

``NeedleDocuments`` writes a document of exactly ``tokens`` ids: one sample of a task drawn from a weighted
mixture (passkey with distractor numbers, RULER needles with distractor needles, bAbI facts, ...), its
context and question, then the answer; only the answer is scored. The needles are of the same form the
evaluation asks about, the haystack is whatever text the trainer gives (memlm-tiny: tinyshakespeare; War
and Peace is the held-out evaluation text). A task option given as a list is drawn per document
(``{"digits": [3, 5], "distractors": [0, 4, 8]}``), so one mixture covers every difficulty.

(This module is not imported by ``memlm.train``: ``memlm.eval.tasks`` imports ``memlm.train.data``.)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from memlm.eval.tasks import TASKS, Haystack

from .data import IGNORE_INDEX


@dataclass(frozen=True)
class NeedleTask:
    """One entry of a mixture: a ``memlm.eval`` task name, its weight and its options (lists are drawn)."""

    name: str
    weight: float = 1.0
    options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"unknown task {self.name!r}; tasks: {sorted(TASKS)}")
        if not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise ValueError(f"the weight of task {self.name!r} must be a number > 0, got {self.weight!r}")
        object.__setattr__(self, "options", tuple(dict(self.options).items()))

    def draw(self, rng: random.Random) -> dict:
        return {key: rng.choice(value) if isinstance(value, list) else value for key, value in self.options}


def answer_text(references: Sequence[str]) -> str:
    """The answer the model is taught: the references in order (``a``, ``a and b``, ``a, b and c``) and a period."""
    words = list(references)
    return (words[0] if len(words) == 1 else ", ".join(words[:-1]) + f" and {words[-1]}") + "."


class NeedleDocuments:
    """Documents of ``tokens`` ids: [haystack text to fill ; the sample's context ; question ; answer].

    The generators size their haystacks to about the requested length; the few tokens they leave are filled
    with haystack text before the sample (never between its needles and its question), so every fact stays
    where the generator put it. labels: the answer's ids, -100 elsewhere.
    """

    def __init__(self, tokenizer, haystack: Haystack, tasks: Sequence[NeedleTask]) -> None:
        if not tasks:
            raise ValueError("NeedleDocuments needs at least one NeedleTask")
        self.tokenizer, self.haystack, self.tasks = tokenizer, haystack, tuple(tasks)
        self.weights = [task.weight for task in self.tasks]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def document(self, rng: random.Random, tokens: int) -> tuple[list[int], list[int]]:
        for _ in range(16):  # a draw whose facts alone overflow a short document is drawn again
            task = rng.choices(self.tasks, self.weights)[0]
            options, budget = task.draw(rng), tokens
            for _ in range(3):  # a generator may overshoot by a few tokens where its pieces join: ask for fewer
                sample = TASKS[task.name](rng, self.tokenizer, self.haystack, budget, None, **options)
                body = self.encode(sample.context + " " + sample.question)
                answer = self.encode(" " + answer_text(sample.references))
                room = tokens - len(body) - len(answer)
                if room >= 0:
                    return self.assemble(rng, body, answer, room)
                budget += room - 4
        raise ValueError(f"no task of the mixture fits a document of {tokens} tokens")

    def assemble(self, rng: random.Random, body: list[int], answer: list[int], room: int) -> tuple[list, list]:
        fill: list[int] = []
        while len(fill) < room:
            fill += self.encode(" ".join(self.haystack.take(rng, room - len(fill), self.tokenizer)) + " ")
        ids = fill[len(fill) - room :] + body + answer
        return ids, [IGNORE_INDEX] * (len(ids) - len(answer)) + answer
