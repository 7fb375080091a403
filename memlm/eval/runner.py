"""Run the tasks of ``tasks.py`` through memory models, side by side, and keep every record.

A *cell* is (task, length, depth); each cell has ``trials`` samples, each with its own seed (a hash of the
cell and trial, so cells never share keys), and every mode answers the same samples. A *mode* is a
``MemoryConfig`` override of the model (``memory``: as trained; ``xl-only``: no kNN memory; ``off``: no XL
cache and no memory, the model sees one segment) plus, optionally, a control that shows memory is what
helps: ``reset`` empties the kNN memory between the haystack and the question, ``other`` streams another
sample's haystack (another key) before this sample's question. One JSON file per (task, mode, cell) holds the
records answered so far, rewritten after each batch of samples; a rerun answers only the trials its files lack
(a killed run resumes, ``--trials 20`` after ``--trials 10`` runs ten more).

``perplexity`` streams a text and reports the mean next-token loss by the token's distance from the
document start (Memorizing Transformers' figure), per mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .tasks import Haystack, Sample, make_sample, score


@dataclass
class Mode:
    """A configuration to compare: ``overrides`` of the model's MemoryConfig, an optional RoPE ``extend``
    (``{"method": "yarn", "factor": 8}``, ``memlm.extend_context``), an optional full-sequence ``attention``
    (``{"name": "dilated", ...}``, ``memlm.use_attention``: a segment is one forward) and an optional
    ``control``."""

    name: str
    overrides: dict = field(default_factory=dict)
    control: str | None = None  # None, "reset" or "other"
    extend: dict | None = None
    #: the longest haystack this mode is run on (full attention: the model's window); longer cells are skipped
    max_length: int | None = None
    attention: dict | None = None

    def __post_init__(self) -> None:
        if self.control not in (None, "reset", "other"):
            raise ValueError(f"mode {self.name!r}: control must be 'reset' or 'other', got {self.control!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ValueError(f"mode {self.name!r}: max_length must be a positive integer, got {self.max_length!r}")


MODES = {
    "memory": Mode("memory"),
    "xl-only": Mode("xl-only", {"memory_layers": ()}),
    "off": Mode("off", {"memory_layers": (), "xl_length": 0}),
    "sinks": Mode("sinks", {"memory_layers": (), "sink_tokens": 4}),  # StreamingLLM: 4 sinks + the XL window
    "memory-reset": Mode("memory-reset", control="reset"),
    "memory-other": Mode("memory-other", control="other"),
}


def parse_modes(spec: str) -> list[Mode]:
    """``memory,xl-only,off`` (names of ``MODES``) or a YAML file: ``{name: {overrides..., control: ..., extend:
    {method: ..., factor: ...}, attention: {name: ..., ...}, max_length: ...}}``."""
    if spec.endswith((".yaml", ".yml")):
        import yaml

        with open(spec) as file:
            entries = yaml.safe_load(file) or {}
        if not isinstance(entries, dict):
            raise ValueError(f"{spec}: expected a mapping of mode name -> MemoryConfig overrides")
        modes = []
        for name, values in entries.items():
            values = dict(values or {})
            options = {key: values.pop(key, None) for key in ("control", "extend", "max_length", "attention")}
            modes.append(Mode(str(name), values, **options))
        return modes
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODES]
    if unknown or not names:
        raise ValueError(f"unknown modes {unknown or spec!r}; named modes: {sorted(MODES)} (or a YAML file)")
    return [MODES[name] for name in names]


def cell_seed(task: str, length: int, depth: float | None, trial: int) -> int:
    """The seed of one trial of one cell: distinct across cells and trials, the same for every mode."""
    digest = hashlib.sha256(f"{task}|{length}|{depth}|{trial}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


# ------------------------------------------------------------------------------------- answering


def run_cell(mem_model, samples: list[Sample], modes: list[Mode], batch_size: int = 1,
             spare: Sample | None = None) -> dict[str, list[dict]]:
    """Records of every mode of ``modes`` on one cell's samples: mode name -> one record per sample (its output,
    score and cost), in sample order. The modes share ``mem_model`` and differ only in their control.

    Each haystack is fed once, as a row of a session of up to ``batch_size`` rows (rows are independent streams,
    ``runtime/rows.py``: a row's answer is the one it gets alone), and every mode's question is asked of it in a
    ``Session.branch``: the sample's own question (no control), the same after the memory is emptied (``reset``),
    and the previous sample's question (``other``: sample i is asked after sample i+1's haystack). With one
    sample, ``other`` streams ``spare``'s haystack. A record's seconds: its row's share of the feed and of its
    mode's generation, what the mode would cost alone.
    """
    n = len(samples)
    if len({m.name for m in modes}) != len(modes):
        raise ValueError(f"modes must have distinct names, got {[m.name for m in modes]}")
    haystacks = list(samples)
    if n == 1 and any(m.control == "other" for m in modes):
        if spare is None:
            raise ValueError("control 'other' with one sample needs a spare sample whose haystack it streams")
        haystacks.append(spare)
    records: dict[str, list[dict | None]] = {m.name: [None] * n for m in modes}
    eos = mem_model.model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    for first in range(0, len(haystacks), batch_size):
        rows = list(range(first, min(first + batch_size, len(haystacks))))
        with torch.no_grad(), mem_model.session(batch_size=len(rows)) as session:
            start = time.perf_counter()
            contexts = [haystacks[j].context for j in rows]
            session.feed(contexts if len(rows) > 1 else contexts[0])
            fed = time.perf_counter() - start
            for mode in modes:
                # the sample whose question each row's haystack answers (None: the row only fills the batch)
                asked = [asked_on(j, n, mode.control) for j in rows]
                start = time.perf_counter()
                # the last mode needs the stream no more: no copy of it
                with session.branch() if mode is not modes[-1] else contextlib.nullcontext():
                    if mode.control == "reset" and session.state.memory is not None:
                        session.state.clear_memory()
                    asking = [samples[0 if i is None else i] for i in asked]
                    questions = [" " + sample.question for sample in asking]
                    steps = []  # the new ids [rows] of every step: each row's answer is cut to its own budget
                    session.generate(questions if len(rows) > 1 else questions[0], streamer=steps.append,
                                     max_new_tokens=max(sample.max_new_tokens for sample in asking))
                    tokens = session.tokens_seen  # streamed: haystack, question and answer
                new = torch.stack(steps, dim=1).tolist()
                texts = [mem_model.tokenizer.decode(own_answer(new[r], sample.max_new_tokens, eos),
                                                    skip_special_tokens=True) for r, sample in enumerate(asking)]
                tokens = tokens if isinstance(tokens, list) else [tokens] * len(rows)
                seconds = (fed + time.perf_counter() - start) / len(rows)
                for i, output, row_tokens in zip(asked, texts, tokens, strict=True):
                    if i is None or records[mode.name][i] is not None:
                        continue
                    sample = samples[i]
                    records[mode.name][i] = {
                        "task": sample.task, "mode": mode.name, "seed": sample.seed, "depth": sample.depth,
                        "tokens": row_tokens, "score": score(sample, output), "output": output,
                        "references": sample.references, "seconds": round(seconds, 3), "batch": len(rows)}
    return records


def evaluate(models: dict[str, object] | Callable[[Mode], object], tokenizer, *, tasks: Iterable[str],
             lengths: Iterable[int], depths: Iterable[float | None], trials: int, modes: list[Mode],
             haystack: Haystack | None = None, output: str | Path | None = None, progress: bool = False,
             task_options: dict | None = None, batch_size: int = 1) -> list[dict]:
    """Every (task, length, depth) cell, ``trials`` samples each, answered in every mode; returns the cell
    summaries ``{task, mode, length, depth, trials, accuracy, records}``. ``models``: mode name -> memory model,
    or a function making one for a ``Mode``. With ``output``, each summary is written to
    ``output/task/mode/L{length}_d{depth}.json`` after each batch of samples, and the trials a file holds are read
    instead of rerun (its first ``trials`` records, when it holds more).
    ``batch_size``: samples of a cell answered as the rows of one session (faster on a real model; same answers).
    Modes that differ only in their control share one model and each haystack's prefill (``run_cell``). A mode's
    cells longer than its ``max_length`` are skipped."""
    haystack = haystack or Haystack()
    tasks, lengths, depths = list(tasks), list(lengths), list(depths)
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for length in lengths:
        if not isinstance(length, int) or length < 64:
            raise ValueError(f"lengths must be integers >= 64 tokens, got {length!r}")
    cache: dict[str, object] = {}

    def model_for(mode: Mode):
        """One model per configuration: modes that differ only in their control share it (and its prefills)."""
        if not callable(models):
            return models[mode.name]
        key = json.dumps([mode.overrides, mode.extend, mode.attention], sort_keys=True, default=str)
        if key not in cache:
            cache[key] = models(mode)
        return cache[key]

    cells = [(t, length, d) for t in tasks for length in lengths for d in depths]
    bar = tqdm(total=len(cells) * len(modes), unit="cell", disable=not progress, desc="memlm eval")
    summaries = []
    for task, length, depth in cells:
        seeds = [cell_seed(task, length, depth, k) for k in range(trials)]
        done: dict[str, list[dict]] = {}  # mode name -> the records its file already holds (the first trials)
        pending: dict[int, list[Mode]] = {}  # the modes to run, by the model they share
        for mode in modes:
            if mode.max_length is not None and length > mode.max_length:
                bar.update(1)
                continue
            stored = read_cell(cell_path(output, task, mode, length, depth), seeds, mode)
            if len(stored) >= trials:
                summaries.append(cell_summary(task, mode, length, depth, haystack, stored[:trials]))
                bar.update(1)
                continue
            done[mode.name] = stored
            pending.setdefault(id(model_for(mode)), []).append(mode)
        if not pending:
            continue
        options = (task_options or {}).get(task, {})
        samples = [make_sample(task, tokenizer, haystack, length, depth, seed, **options) for seed in seeds]
        # "other" with one trial streams a spare haystack (another key, the same length)
        spare = make_sample(task, tokenizer, haystack, length, depth, cell_seed(task, length, depth, -1), **options)
        for group in pending.values():
            # a cell grows and is written a batch of samples at a time (a killed run resumes at its next sample);
            # "other" pairs neighbouring samples, so a group with it answers the whole cell at once
            pairs = any(mode.control == "other" for mode in group)
            first, step = (0, trials) if pairs else (min(len(done[mode.name]) for mode in group), batch_size)
            for start in range(first, trials, step):
                results = run_cell(model_for(group[0]), samples[start : start + step], group, batch_size, spare)
                for mode in group:
                    done[mode.name][start : start + step] = results[mode.name]
                    write_cell(cell_path(output, task, mode, length, depth),
                               cell_summary(task, mode, length, depth, haystack, done[mode.name]))
            for mode in group:
                summaries.append(cell_summary(task, mode, length, depth, haystack, done[mode.name]))
                bar.update(1)
    bar.close()
    return summaries


def own_answer(ids: list[int], budget: int, eos: set[int]) -> list[int]:
    """A row's new ids as a generation of its own would end: at most ``budget``, up to its first end token (a batch
    pads a finished row until every row is done)."""
    ids = ids[:budget]
    ends = [t for t, token in enumerate(ids) if token in eos]
    return ids[: ends[0] + 1] if ends else ids


def asked_on(haystack: int, n: int, control: str | None) -> int | None:
    """Which of a cell's ``n`` samples asks its question on haystack ``haystack`` (``n``: the spare), or None."""
    if control == "other":  # the previous sample: its key is not in this haystack
        return (haystack - 1) % n if n > 1 else 0 if haystack == n else None
    return haystack if haystack < n else None


def cell_path(output: str | Path | None, task: str, mode: Mode, length: int, depth: float | None) -> Path | None:
    return None if output is None else Path(output) / task / mode.name / f"L{length}_d{depth}.json"


def read_cell(path: Path | None, seeds: list[int], mode: Mode) -> list[dict]:
    """The records of a cell's file that answer the first of ``seeds`` (all of them, or none where the file's
    seeds differ or ``mode`` pairs samples with their neighbours and the file holds fewer than asked)."""
    if path is None or not path.is_file():
        return []
    records = json.loads(path.read_text())["records"]
    if [r["seed"] for r in records[: len(seeds)]] != seeds[: len(records)]:
        return []
    return records if len(records) >= len(seeds) or mode.control != "other" else []


def cell_summary(task: str, mode: Mode, length: int, depth: float | None, haystack: Haystack,
                 records: list[dict]) -> dict:
    return {"task": task, "mode": mode.name, "length": length, "depth": depth, "trials": len(records),
            "haystack": haystack.name, "accuracy": statistics.fmean(r["score"] for r in records), "records": records}


def write_cell(path: Path | None, summary: dict) -> None:
    """Write a cell's summary whole (through a temporary file: a killed run leaves the last complete one)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(summary, indent=1))
        path.with_suffix(".tmp").replace(path)


# ------------------------------------------------------------------------------------ perplexity

#: token-distance buckets of the perplexity report (upper ends)
BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, math.inf)


def perplexity(mem_model, ids: torch.Tensor, buckets: tuple = BUCKETS) -> dict:
    """Stream ids [tokens] through one session; mean next-token loss (and perplexity) by the predicted token's
    distance from the document start: ``{"buckets": [{"to", "tokens", "loss", "ppl"}], "loss", "tokens"}``."""
    with torch.no_grad(), mem_model.session() as session:
        losses = []
        for start in range(0, ids.numel() - 1, 4096):
            window = ids[start : start + 4097]
            logits = session.feed(window[None, :-1], return_logits=True).logits[0]
            losses.append(torch.nn.functional.cross_entropy(logits.float(), window[1:], reduction="none"))
    return bucketed(torch.cat(losses), buckets)


def bucketed(loss: torch.Tensor, buckets: tuple = BUCKETS) -> dict:
    """Next-token losses [n] of a document from its start, as ``perplexity`` reports them (by distance buckets)."""
    positions = torch.arange(1, loss.numel() + 1)
    rows, low = [], 0
    for high in buckets:
        chosen = loss[(positions > low) & (positions <= high)]
        if chosen.numel():
            mean = float(chosen.mean())
            rows.append({"from": low, "to": high if high != math.inf else None, "tokens": chosen.numel(),
                         "loss": round(mean, 4), "ppl": round(math.exp(mean), 3)})
        low = high
    mean = float(loss.mean())
    return {"buckets": rows, "loss": round(mean, 4), "ppl": round(math.exp(mean), 3), "tokens": loss.numel()}


# ------------------------------------------------------------------------------------- reporting


def table(summaries: list[dict]) -> str:
    """Markdown: accuracy (%) per task and mode (rows) by length (columns), averaged over depths."""
    lengths = sorted({s["length"] for s in summaries})
    rows: dict[tuple, dict] = {}
    for s in summaries:
        rows.setdefault((s["task"], s["mode"]), {}).setdefault(s["length"], []).append(s["accuracy"])
    out = ["| task | mode | " + " | ".join(f"{n:,}" for n in lengths) + " |",
           "|---|---|" + "---|" * len(lengths)]
    for (task, mode), by_length in rows.items():
        cells = [f"{100 * statistics.fmean(by_length[n]):.0f}" if n in by_length else "" for n in lengths]
        out.append(f"| {task} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def perplexity_table(results: dict[str, dict]) -> str:
    """Markdown: perplexity per mode (rows) by token-distance bucket (columns)."""
    buckets = max((result["buckets"] for result in results.values()), key=len)  # modes may stream fewer tokens
    out = ["| mode | " + " | ".join(f"{r['from']:,}-{r['to']:,}" if r["to"] else f"{r['from']:,}+" for r in buckets)
           + " | all |", "|---|" + "---|" * (len(buckets) + 1)]
    for name, result in results.items():
        ppl = {r["from"]: f"{r['ppl']:.2f}" for r in result["buckets"]}
        cells = [ppl.get(r["from"], "") for r in buckets] + [f"{result['ppl']:.2f}"]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(summaries: list[dict], directory: str | Path) -> list[Path]:
    """PNG files: per task, an accuracy heat map (length x depth) per mode, and accuracy against length per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory, written = Path(directory), []
    directory.mkdir(parents=True, exist_ok=True)
    for task in sorted({s["task"] for s in summaries}):
        cells = [s for s in summaries if s["task"] == task]
        modes = list(dict.fromkeys(s["mode"] for s in cells))
        lengths = sorted({s["length"] for s in cells})
        depths = sorted({s["depth"] for s in cells}, key=lambda d: -1 if d is None else d)
        figure, axes = plt.subplots(1, len(modes), figsize=(3.2 * len(modes), 2.8), squeeze=False)
        for axis, mode in zip(axes[0], modes, strict=True):
            grid = [[next((100 * s["accuracy"] for s in cells if s["mode"] == mode and s["length"] == n and
                           s["depth"] == d), float("nan")) for n in lengths] for d in depths]
            image = axis.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            axis.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
            axis.set_yticks(range(len(depths)), ["rand" if d is None else f"{d:.0%}" for d in depths])
            axis.set_title(f"{task}: {mode}", fontsize=9)
            axis.set_xlabel("tokens")
        axes[0][0].set_ylabel("needle depth")
        figure.colorbar(image, ax=axes[0].tolist(), label="accuracy (%)")
        path = directory / f"{task}_heatmap.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
        figure, axis = plt.subplots(figsize=(4.5, 3))
        for mode in modes:
            means = [statistics.fmean(s["accuracy"] for s in cells if s["mode"] == mode and s["length"] == n)
                     for n in lengths]
            axis.plot(lengths, [100 * m for m in means], marker="o", label=mode)
        axis.set_xscale("log", base=2)
        axis.set(xlabel="tokens", ylabel="accuracy (%)", title=task, ylim=(-5, 105))
        axis.legend(fontsize=8)
        path = directory / f"{task}_length.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def plot_perplexity(results: dict[str, dict], path: str | Path) -> Path:
    """Perplexity against token distance, one line per mode (``results``: mode -> ``perplexity`` output)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 3))
    for mode, result in results.items():
        rows = result["buckets"]
        axis.plot([r["to"] or 2 * r["from"] for r in rows], [r["ppl"] for r in rows], marker="o", label=mode)
    axis.set_xscale("log", base=2)
    axis.set(xlabel="token distance from the document start", ylabel="perplexity")
    axis.legend(fontsize=8)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return Path(path)


