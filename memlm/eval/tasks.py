"""Long-context tasks as text: a haystack of real sentences with facts hidden in it, a question, the answers.

Generators (each a function of a seeded ``random.Random``; nothing is downloaded):

* ``passkey`` (Landmark Attention, Mohtashami & Jaggi 2023; LongLLaMA): ``The pass key is N. Remember it.
  N is the pass key.`` ... ``What is the pass key? The pass key is``; optionally with distractor
  numbers (``The door code is M.``) in the haystack.
* RULER (Hsieh et al. 2024): ``niah_single`` (number, word or UUID values), ``niah_multikey`` (distractor
  needles of the same form; ``niah_multikey_uuids``: UUID values, RULER's multikey-3 kind),
  ``niah_multivalue``, ``niah_multiquery``, ``variable_tracking`` (``VAR A = 12345``, ``VAR B = VAR A``, ...),
  ``cwe`` and ``fwe`` (common / frequent word extraction);
  scored as RULER scores: the fraction of reference strings found in the output.
* ``lines`` (LongChat-Lines, used by Giraffe, Pal et al. 2023): ``line adj-noun: REGISTER_CONTENT is
  <N>`` lines, the first integer of the answer scored.
* ``babilong_qa1`` / ``babilong_qa2`` (Kuratov et al. 2024): bAbI-style facts (people moving between
  rooms; qa2: carrying objects) scattered through the haystack; right when the answer's first sentence
  names the right location.

A haystack is a run of whole sentences of a text the user names (``Haystack.from_file``) or the built-in
filler; needles go between sentences at a chosen depth (a fraction of the haystack).
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

from memlm.train.data import FILLER

SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lively", "misty", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "vast", "wild")
NOUNS = ("anchor", "badger", "candle", "dagger", "ember", "falcon", "garden", "harbor", "island", "jackal",
         "kettle", "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "river", "saddle", "tower",
         "valley", "willow")
ACTORS = ("John", "Mary", "Sandra", "Daniel")
ROOMS = ("bedroom", "kitchen", "garden", "hallway", "bathroom", "office")
OBJECTS = ("apple", "football", "milk")


@dataclass
class Sample:
    """One trial: ``context`` (the haystack with its needles) then ``question``, which the model continues.

    references: the answer strings; metric: how an output is scored (``score``); needles: character offsets
    of the needles in ``context``; distractors: the other values hidden in the haystack.
    """

    task: str
    seed: int
    context: str
    question: str
    references: list[str]
    metric: str
    max_new_tokens: int
    depth: float | None = None
    needles: list[int] = field(default_factory=list)
    distractors: list[str] = field(default_factory=list)


class Haystack:
    """Whole sentences of a text, taken from a seeded random start, to a token budget."""

    def __init__(self, text: str | None = None, name: str = "filler") -> None:
        if text is None:
            sentences = list(FILLER)
        else:
            sentences = [" ".join(s.split()) for s in SENTENCE_END.split(text)]
            sentences = [s for s in sentences if len(s) > 1]
        if not sentences:
            raise ValueError("the haystack text has no sentences")
        self.sentences, self.name = sentences, name
        self._tokens: dict[int, int] = {}

    @classmethod
    def from_file(cls, path) -> Haystack:
        with open(path, encoding="utf-8") as file:
            return cls(file.read(), name=str(path))

    def take(self, rng: random.Random, tokens: int, tokenizer) -> list[str]:
        """Consecutive sentences (wrapping around) from a random start whose tokens add up to about ``tokens``."""
        out, total, at = [], 0, rng.randrange(len(self.sentences))
        while total < tokens:
            if at not in self._tokens:
                self._tokens[at] = len(tokenizer(" " + self.sentences[at], add_special_tokens=False)["input_ids"])
            if total + self._tokens[at] > tokens and out:
                break
            out.append(self.sentences[at])
            total += self._tokens[at]
            at = (at + 1) % len(self.sentences)
        return out


def insert(sentences: list[str], needles: list[tuple[float, str]]) -> tuple[str, list[int]]:
    """Join sentences with each needle placed between sentences at its depth; returns the text and the needles'
    character offsets (in needle order)."""
    slots = sorted(range(len(needles)), key=lambda i: needles[i][0])
    parts, offsets, length, n = [], [0] * len(needles), 0, len(sentences)
    position = {i: min(n, round(needles[i][0] * n)) for i in slots}
    for s in range(n + 1):
        for i in slots:
            if position[i] == s:
                offsets[i] = length + (1 if parts else 0)
                parts.append(needles[i][1])
                length += len(needles[i][1]) + (1 if len(parts) > 1 else 0)
        if s < n:
            parts.append(sentences[s])
            length += len(sentences[s]) + (1 if len(parts) > 1 else 0)
    return " ".join(parts), offsets


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _key(rng: random.Random, used: set[str]) -> str:
    """A new ``adjective-noun`` key (``adjective-noun-N`` once half of those are taken)."""
    while True:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if len(used) >= len(ADJECTIVES) * len(NOUNS) // 2:
            key += f"-{rng.randrange(10_000)}"
        if key not in used:
            used.add(key)
            return key


def _value(rng: random.Random, kind: str, used: set[str], digits: int = 7) -> str:
    """A value not in ``used`` (which it joins): a ``digits``-digit number, an adjective+noun word, or a UUID."""
    while True:
        if kind == "numbers":
            value = _number(rng, digits)
        elif kind == "words":
            value = f"{rng.choice(ADJECTIVES)}{rng.choice(NOUNS)}"
        else:  # uuids
            value = "-".join("".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (8, 4, 4, 4, 12))
        if value not in used:
            used.add(value)
            return value


def _budget(tokens: int, tokenizer, *texts: str) -> int:
    """Haystack tokens left once the needles and the question are in."""
    used = sum(len(tokenizer(" " + t, add_special_tokens=False)["input_ids"]) for t in texts)
    return max(0, tokens - used - 8)


def _fit(text: Callable[[int], str], budget: int, tokenizer, high: int) -> int:
    """The largest n <= high (at least 1) whose ``text(n)`` has at most ``budget`` tokens (binary search)."""
    low = 1
    while low < high:
        middle = (low + high + 1) // 2
        if len(tokenizer(text(middle), add_special_tokens=False)["input_ids"]) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def _depths(rng: random.Random, depth: float | None, n: int) -> list[float]:
    """The first needle (the one asked about) at ``depth`` (random when None), the others anywhere."""
    first = rng.random() if depth is None else depth
    return [first] + [rng.random() for _ in range(n - 1)]


# ------------------------------------------------------------------------------------------ tasks


def passkey(rng, tokenizer, haystack: Haystack, length: int, depth, *, digits: int = 5,
            distractors: int = 0) -> Sample:
    key = _number(rng, digits)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question = "What is the pass key? The pass key is"
    others = set()
    while len(others) < distractors:
        if (other := _number(rng, digits)) != key:
            others.add(other)
    others = sorted(others)
    fakes = [f"The door code is {other}." for other in others]
    sentences = haystack.take(rng, _budget(length, tokenizer, needle, question, *fakes), tokenizer)
    text, offsets = insert(sentences, [(d, n) for d, n in zip(_depths(rng, depth, 1 + len(fakes)),
                                                                [needle, *fakes], strict=True)])
    return Sample("passkey", 0, text, question, [key], "first_int", max_new_tokens=digits + 2, depth=depth,
                  needles=offsets[:1], distractors=others)


RULER_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
RULER_QUESTION = ("What is the special magic {kind} for {key} mentioned in the provided text? The special magic "
                  "{kind} for {key} mentioned in the provided text is")


def niah(rng, tokenizer, haystack: Haystack, length: int, depth, *, variant: str = "single", values: str = "numbers",
         keys: int = 4, value_count: int = 4, queries: int = 2) -> Sample:
    """RULER needle-in-a-haystack: ``single`` (one needle), ``multikey`` (``keys`` needles, one asked),
    ``multivalue`` (one key, ``value_count`` values, all asked), ``multiquery`` (``keys`` needles, ``queries``
    asked)."""
    if values not in ("numbers", "words", "uuids"):
        raise ValueError(f"niah values must be 'numbers', 'words' or 'uuids', got {values!r}")
    kind = values
    used_keys, used_values = set(), set()
    n_keys = {"single": 1, "multivalue": 1}.get(variant, keys)
    per_key = value_count if variant == "multivalue" else 1
    facts = [(_key(rng, used_keys), [_value(rng, values, used_values) for _ in range(per_key)]) for _ in range(n_keys)]
    asked = facts[: queries if variant == "multiquery" else 1]
    needles = [RULER_NEEDLE.format(kind=kind, key=key, value=value) for key, vals in facts for value in vals]
    if len(asked) == 1:
        question = RULER_QUESTION.format(kind=kind, key=asked[0][0])
    else:
        names = ", ".join(key for key, _ in asked[:-1]) + f" and {asked[-1][0]}"
        question = (f"What are all the special magic {kind} for {names} mentioned in the provided text? The "
                    f"special magic {kind} for {names} mentioned in the provided text are")
    sentences = haystack.take(rng, _budget(length, tokenizer, *needles, question), tokenizer)
    depths = _depths(rng, depth, len(needles))
    text, offsets = insert(sentences, list(zip(depths, needles, strict=True)))
    references = [value for _, vals in asked for value in vals]
    distractors = [value for _, vals in facts[len(asked):] for value in vals]
    tokens_per_value = len(tokenizer(" " + references[0], add_special_tokens=False)["input_ids"])
    return Sample(f"niah_{variant}", 0, text, question, references, "all", depth=depth,
                  max_new_tokens=(tokens_per_value + 3) * len(references) + 4, needles=offsets[: len(references)],
                  distractors=distractors)


def variable_tracking(rng, tokenizer, haystack: Haystack, length: int, depth, *, hops: int = 4,
                      chains: int = 2) -> Sample:
    """RULER variable tracking: ``chains`` chains ``VAR X = N``, ``VAR Y = VAR X``, ... of ``hops`` hops; asked:
    every variable that holds the first chain's value."""
    names = set()
    while len(names) < chains * (hops + 1):  # five capitals, as RULER names them
        names.add("".join(rng.choice(string.ascii_uppercase) for _ in range(5)))
    names, values, statements, references = rng.sample(sorted(names), len(names)), set(), [], []
    for c in range(chains):
        chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        value = _value(rng, "numbers", values, 5)
        statements.append([f"VAR {chain[0]} = {value}."] +
                          [f"VAR {b} = VAR {a}." for a, b in pairwise(chain)])
        if c == 0:
            asked_value, references = value, chain
    question = (f"Find all variables that are assigned the value {asked_value} in the text above. Answer: "
                f"According to the chain(s) of variable assignment in the text above, {len(references)} "
                "variables are assigned the value " + asked_value + ", they are:")
    flat = [s for chain in statements for s in chain]
    sentences = haystack.take(rng, _budget(length, tokenizer, *flat, question), tokenizer)
    # a chain's statements in order, spread from its depth to the end
    first = rng.random() if depth is None else depth
    placed = []
    for c, chain in enumerate(statements):
        start = first if c == 0 else rng.random()
        placed += [(start + (1 - start) * i / len(chain), s) for i, s in enumerate(chain)]
    text, offsets = insert(sentences, placed)
    return Sample("variable_tracking", 0, text, question, references, "all", max_new_tokens=4 * len(references) + 4,
                  depth=depth, needles=offsets[: hops + 1],
                  distractors=[n for n in names if n not in references])


def _word_list() -> list[str]:
    try:
        from wonderwords import RandomWord
    except ImportError as error:  # the eval extra
        raise ImportError("the cwe task takes its words from the wonderwords package: pip install "
                          "'memlm[eval]'") from error
    words = RandomWord().filter(include_categories=["noun", "adjective", "verb"], word_min_length=3,
                                word_max_length=9, regex="[a-z]+")
    return sorted(set(words))


def cwe(rng, tokenizer, haystack: Haystack, length: int, depth, *, common: int = 10, frequency: int | None = None,
        rare_frequency: int = 3) -> Sample:
    """RULER common words extraction: a numbered list of words in which ``common`` words appear ``frequency``
    times (default: grows with the length, 3 to 30) and the others ``rare_frequency`` times (fewer than the
    common ones); asked: the ``common`` most common. The list is the whole context (no haystack text)."""
    frequency = frequency or max(3, min(30, length // 200))
    rare_frequency = min(rare_frequency, frequency - 1)
    pool = rng.sample(_word_list(), 4000)
    common_words, rare_words = pool[:common], pool[common:]
    shuffle = rng.random()  # one shuffle seed for every candidate size
    header = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
              "ones that appear most often.\n")
    question = (f"Question: What are the {common} most common words in the above list? Answer: The top {common} "
                "words that appear most often in the list are:")

    def listing(n_rare: int) -> str:
        words = [w for w in common_words for _ in range(frequency)] + [
            w for w in rare_words[:n_rare] for _ in range(rare_frequency)]
        random.Random(shuffle).shuffle(words)
        return header + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))

    budget = _budget(length, tokenizer, question)
    n_rare = _fit(listing, budget, tokenizer, len(rare_words))
    return Sample("cwe", 0, listing(n_rare), question, common_words, "all", max_new_tokens=6 * common, depth=None)


def fwe(rng, tokenizer, haystack: Haystack, length: int, depth, *, alpha: float = 2.0, vocabulary: int = 500) -> Sample:
    """RULER frequent words extraction: coded words drawn from a Zipf distribution; asked: the three most
    frequent. The coded text is the whole context."""
    codes = ["".join(rng.choice(string.ascii_lowercase) for _ in range(6)) for _ in range(vocabulary)]
    weights = [1 / (rank + 1) ** alpha for rank in range(vocabulary)]
    drawn = rng.choices(codes, weights, k=4 * length)
    header = ("Read the following coded text and track the frequency of each coded word. Find the three most "
              "frequently appeared coded words. ... ")
    question = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text? Answer: According to the coded text above, "
                "the three most frequently appeared words are:")
    n = _fit(lambda k: header + " ".join(drawn[:k]) + " ...", _budget(length, tokenizer, question), tokenizer,
             len(drawn))
    words = drawn[:n]
    counts = {code: words.count(code) for code in codes[:10]}
    top = sorted(counts, key=lambda c: -counts[c])[:3]
    return Sample("fwe", 0, header + " ".join(words) + " ...", question, top, "all", max_new_tokens=20, depth=None)


def lines(rng, tokenizer, haystack: Haystack, length: int, depth, *, digits: int = 5) -> Sample:
    """LongChat-Lines: numbered register lines (the whole context); asked: one line's number."""
    used_keys, used_values = set(), set()
    header = ("Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and "
              "contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, "
              "memorize its corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve "
              "the corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:")
    # more lines than fit (every line takes more than six tokens), fewer than there are distinct values
    keys = max(2, min(length // 6, 9 * 10 ** (digits - 1) // 2))
    rows = [(_key(rng, used_keys), _value(rng, "numbers", used_values, digits)) for _ in range(keys)]

    def record(n: int) -> str:
        return header + "\n" + "\n".join(f"line {k}: REGISTER_CONTENT is <{v}>" for k, v in rows[:n])

    question = "Now the record is over. Tell me what is the <REGISTER_CONTENT> in line {}? I need the number. " \
               "The <REGISTER_CONTENT> is"
    rows = rows[: _fit(record, _budget(length, tokenizer, question.format(rows[0][0])), tokenizer, keys)]
    at = min(len(rows) - 1, round((rng.random() if depth is None else depth) * (len(rows) - 1)))
    key, value = rows[at]
    context = record(len(rows))
    return Sample("lines", 0, context, question.format(key), [value], "first_int", max_new_tokens=digits + 3,
                  depth=depth, needles=[context.index(f"line {key}:")], distractors=[v for k, v in rows if k != key])


def babilong(rng, tokenizer, haystack: Haystack, length: int, depth, *, qa: int = 1, facts: int = 6) -> Sample:
    """bAbI qa1 (single supporting fact: where is X after moves) or qa2 (two facts: where is the object X picked
    up) in a haystack; right when the first sentence of the answer names the location."""
    places = {actor: None for actor in ACTORS}
    lines_, held = [], {}
    for _ in range(facts):
        actor, room = rng.choice(ACTORS), rng.choice(ROOMS)
        lines_.append(f"{actor} went to the {room}.")
        places[actor] = room
        if qa == 2 and rng.random() < 0.5:
            thing = rng.choice(OBJECTS)
            if held.get(thing) is None:
                lines_.append(f"{actor} picked up the {thing}.")
                held[thing] = actor
    if qa == 1:
        actor = next((a for a in reversed([line.split()[0] for line in lines_])), ACTORS[0])
        question, answer = f"Where is {actor}? Answer: {actor} is in the", places[actor]
    else:
        if not held:  # make sure someone carries something
            actor = next(a for a in ACTORS if places[a] is not None)
            lines_.append(f"{actor} picked up the {OBJECTS[0]}.")
            held[OBJECTS[0]] = actor
        thing = rng.choice(sorted(held))
        question, answer = f"Where is the {thing}? Answer: The {thing} is in the", places[held[thing]]
    sentences = haystack.take(rng, _budget(length, tokenizer, *lines_, question), tokenizer)
    start = rng.random() * 0.5 if depth is None else depth
    placed = [(start + (1 - start) * i / len(lines_), line) for i, line in enumerate(lines_)]
    text, offsets = insert(sentences, placed)
    return Sample(f"babilong_qa{qa}", 0, text, question, [answer], "first_sentence", max_new_tokens=8, depth=depth,
                  needles=offsets, distractors=[room for room in ROOMS if room != answer])


TASKS: dict[str, Callable[..., Sample]] = {
    "passkey": passkey,
    "niah_single": niah,
    "niah_multikey": lambda *a, **k: niah(*a, variant="multikey", **k),
    # RULER's multikey-3 kind: UUID values among needles of the same form, where block representatives fail
    "niah_multikey_uuids": lambda *a, **k: niah(*a, variant="multikey", values="uuids", **k),
    "niah_multivalue": lambda *a, **k: niah(*a, variant="multivalue", **k),
    "niah_multiquery": lambda *a, **k: niah(*a, variant="multiquery", **k),
    "variable_tracking": variable_tracking,
    "cwe": cwe,
    "fwe": fwe,
    "lines": lines,
    "babilong_qa1": babilong,
    "babilong_qa2": lambda *a, **k: babilong(*a, qa=2, **k),
}


def make_sample(task: str, tokenizer, haystack: Haystack, length: int, depth: float | None, seed: int,
                **options) -> Sample:
    """The sample of ``task`` for one cell and trial: ``seed`` alone decides it (give each cell and trial its own)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {sorted(TASKS)}")
    if depth is not None and not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    sample = TASKS[task](random.Random(f"{task}:{seed}"), tokenizer, haystack, length, depth, **options)
    sample.seed = seed
    return sample


# ----------------------------------------------------------------------------------------- scoring

FIRST_INT = re.compile(r"\d+")


def score(sample: Sample, output: str) -> float:
    """The sample's metric of a model's output: ``all`` (RULER's string_match_all: the fraction of references
    found, case-insensitive), ``first_int`` (the first integer equals the reference), ``first_sentence``
    (BABILong: the first sentence names the reference and no other candidate)."""
    if sample.metric == "all":
        text = output.lower()
        return sum(ref.lower() in text for ref in sample.references) / len(sample.references)
    if sample.metric == "first_int":
        found = FIRST_INT.search(output)
        return float(found is not None and found.group() == sample.references[0])
    if sample.metric == "first_sentence":
        first = re.split(r"[.!?\n]", output.strip(), maxsplit=1)[0].lower()
        named = [room for room in ROOMS if re.search(rf"\b{room}\b", first)]
        return float(named == [sample.references[0]])
    raise ValueError(f"unknown metric {sample.metric!r}")
