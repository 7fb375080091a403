"""Run the tasks of ``tasks.py`` through memory models, side by side, and keep every record.

A *cell* is (task, length, depth); each cell has ``trials`` samples, each with its own seed (a hash of the
cell and trial, so cells never share keys), and every mode answers the same samples. A *mode* is a
``MemoryConfig`` override of the model (``memory``: as trained; ``xl-only``: no kNN memory; ``off``: no XL
cache and no memory, the model sees one segment) plus, optionally, a control that shows memory is what
helps: ``reset`` empties the kNN memory between the haystack and the question, ``other`` streams another
sample's haystack (another key) before this sample's question. One JSON file per (task, mode, cell) is
written as it finishes; a rerun skips the files that exist.

``perplexity`` streams a text and reports the mean next-token loss by the token's distance from the
document start (Memorizing Transformers' figure), per mode.
"""

from __future__ import annotations

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
    (``{"method": "yarn", "factor": 8}``, ``memlm.extend_context``) and an optional ``control``."""

    name: str
    overrides: dict = field(default_factory=dict)
    control: str | None = None  # None, "reset" or "other"
    extend: dict | None = None
    #: the longest haystack this mode is run on (full attention: the model's window); longer cells are skipped
    max_length: int | None = None

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
    {method: ..., factor: ...}, max_length: ...}}``."""
    if spec.endswith((".yaml", ".yml")):
        import yaml

        with open(spec) as file:
            entries = yaml.safe_load(file) or {}
        if not isinstance(entries, dict):
            raise ValueError(f"{spec}: expected a mapping of mode name -> MemoryConfig overrides")
        modes = []
        for name, values in entries.items():
            values = dict(values or {})
            control, extend, longest = values.pop("control", None), values.pop("extend", None), values.pop(
                "max_length", None)
            modes.append(Mode(str(name), values, control, extend, longest))
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


def answer(mem_model, samples: list[Sample], control: str | None = None,
           others: list[Sample] | None = None) -> tuple[list[str], int]:
    """Stream the samples' contexts (or, for ``other``, the ``others``' contexts) through one session, a row per
    sample, then generate after each question, greedily. Returns the answer texts and the tokens streamed per row.

    Rows of one session are independent streams (``runtime/rows.py``): a row's answer is the one it gets alone.
    ``reset`` empties the memory between haystack and question, which a session does for all its rows: one row.
    """
    if control == "reset" and len(samples) != 1:
        raise ValueError(f"control 'reset' answers one sample per session, got {len(samples)}")
    if len({s.max_new_tokens for s in samples}) != 1:
        raise ValueError("the samples of one batch must ask for the same max_new_tokens")
    contexts = [s.context for s in (others if control == "other" else samples)]
    with torch.no_grad(), mem_model.session(batch_size=len(samples)) as session:
        session.feed(contexts if len(samples) > 1 else contexts[0])
        if control == "reset" and session.state.memory is not None:
            session.state.clear_memory()
        questions = [" " + s.question for s in samples]
        texts = session.generate(questions if len(samples) > 1 else questions[0],
                                 max_new_tokens=samples[0].max_new_tokens)
        tokens = session.tokens_seen
    texts = [texts] if isinstance(texts, str) else texts
    return texts, max(tokens) if isinstance(tokens, list) else tokens


def run_cell(mem_model, samples: list[Sample], mode: Mode, others: list[Sample] | None = None,
             batch_size: int = 1) -> list[dict]:
    """One record per sample: the output, its score and what it cost (a batch's time shared by its rows).
    Up to ``batch_size`` samples run as the rows of one session."""
    if mode.control == "reset":
        batch_size = 1
    records = []
    for first in range(0, len(samples), batch_size):
        batch = samples[first : first + batch_size]
        start = time.perf_counter()
        outputs, tokens = answer(mem_model, batch, mode.control, others[first : first + batch_size] if others else None)
        seconds = (time.perf_counter() - start) / len(batch)
        for sample, output in zip(batch, outputs, strict=True):
            records.append({"task": sample.task, "mode": mode.name, "seed": sample.seed, "depth": sample.depth,
                            "tokens": tokens, "score": score(sample, output), "output": output,
                            "references": sample.references, "seconds": round(seconds, 3), "batch": len(batch)})
    return records


def evaluate(models: dict[str, object] | Callable[[Mode], object], tokenizer, *, tasks: Iterable[str],
             lengths: Iterable[int], depths: Iterable[float | None], trials: int, modes: list[Mode],
             haystack: Haystack | None = None, output: str | Path | None = None, progress: bool = False,
             task_options: dict | None = None, batch_size: int = 1) -> list[dict]:
    """Every (task, length, depth) cell, ``trials`` samples each, answered in every mode; returns the cell
    summaries ``{task, mode, length, depth, trials, accuracy, records}``. ``models``: mode name -> memory model,
    or a function making one for a ``Mode``. With ``output``, each summary is written to
    ``output/task/mode/L{length}_d{depth}.json`` as it finishes and existing files are read instead of rerun.
    ``batch_size``: samples of a cell answered as the rows of one session (faster on a real model; same answers).
    A mode's cells longer than its ``max_length`` are skipped."""
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
        if not callable(models):
            return models[mode.name]
        if mode.name not in cache:
            cache[mode.name] = models(mode)
        return cache[mode.name]

    cells = [(t, length, d) for t in tasks for length in lengths for d in depths]
    bar = tqdm(total=len(cells) * len(modes), unit="cell", disable=not progress, desc="memlm eval")
    summaries = []
    for task, length, depth in cells:
        samples = None
        for mode in modes:
            if mode.max_length is not None and length > mode.max_length:
                bar.update(1)
                continue
            path = None if output is None else Path(output) / task / mode.name / f"L{length}_d{depth}.json"
            if path is not None and path.is_file():
                summaries.append(json.loads(path.read_text()))
                bar.update(1)
                continue
            if samples is None:
                options = (task_options or {}).get(task, {})
                samples = [make_sample(task, tokenizer, haystack, length, depth, cell_seed(task, length, depth, k),
                                       **options) for k in range(trials)]
                # "other": each trial streams the next trial's haystack (another key, the same length)
                others = samples[1:] + samples[:1] if trials > 1 else [
                    make_sample(task, tokenizer, haystack, length, depth, cell_seed(task, length, depth, -1),
                                **options)]
            records = run_cell(model_for(mode), samples, mode, others if mode.control == "other" else None,
                               batch_size)
            summary = {"task": task, "mode": mode.name, "length": length, "depth": depth, "trials": trials,
                       "haystack": haystack.name, "accuracy": statistics.fmean(r["score"] for r in records),
                       "records": records}
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.with_suffix(".tmp").write_text(json.dumps(summary, indent=1))
                path.with_suffix(".tmp").replace(path)  # a cell is written whole or not at all
            summaries.append(summary)
            bar.update(1)
    bar.close()
    return summaries


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


