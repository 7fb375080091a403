"""The methods side by side on SmolLM2-135M: the README's tables and plot, from what `memlm eval` wrote.

    python benchmarks/report_smollm2.py [--results benchmarks/results/smollm2] [--plot docs/smollm2_methods.png]
    python benchmarks/report_smollm2.py --results benchmarks/results/smollm2_blocks   # block retrieval (issue 38)

Reads every cell file under ``--results`` (``<haystack>/<task>/<mode>/L<length>_d<depth>.json``, as the commands
in the README write them; ``memory_variants/`` holds the memory configurations compared) and
``<haystack>/perplexity.json``; prints markdown: accuracy per method and length
(with the trials behind each cell), tokens/s per method and length against full attention (the plain model)
and against the XL-only stream, and War and Peace perplexity by token distance.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from memlm.eval.runner import perplexity_table

#: rows in the order the README reads them (modes not listed follow, alphabetically)
ORDER = ("full", "xl-only", "memory", "blocks", "blocks-per-layer", "blocks-pooled-sum", "blocks-pooled-3-sum",
         "blocks-2", "blocks-8", "blocks-4", "blocks-per-token", "blocks-minmax", "blocks-representatives", "blocks-32",
         "sinks", "lm-infinite", "full-unscaled", "ntk-x2", "dynamic-ntk", "yarn-x2", "dilated", "layers-0-14",
         "layers-15-29", "local-1024")
TASKS = {("filler", "passkey"): "passkey, filler", ("war_and_peace", "passkey"): "passkey, War and Peace",
         ("war_and_peace_distractors", "passkey"): "passkey, War and Peace + 4 distractor numbers",
         ("filler", "niah_multikey"): "multikey (RULER), filler",
         ("filler", "niah_multikey_uuids"): "multikey, UUID values (RULER), filler"}


def load(results: Path) -> list[dict]:
    cells = []
    for path in sorted(results.glob("*/*/*/L*.json")):
        cell = json.loads(path.read_text())
        cell["haystack_name"] = path.parts[-4]
        cells.append(cell)
    tasks = list(TASKS)
    rank = {mode: i for i, mode in enumerate(ORDER)}
    return sorted(cells, key=lambda c: (tasks.index((c["haystack_name"], c["task"])) if (c["haystack_name"], c["task"])
                                        in tasks else len(tasks), rank.get(c["mode"], len(rank)), c["mode"],
                                        c["length"]))


def accuracy_table(cells: list[dict]) -> str:
    lengths = sorted({c["length"] for c in cells})
    rows: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        rows[(TASKS.get((c["haystack_name"], c["task"]), c["task"]), c["mode"])][c["length"]] += [
            r["score"] for r in c["records"]]
    out = ["| task | method | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|---|" + "---|" * len(lengths)]
    for (task, mode), by_length in rows.items():
        cells_ = [f"{100 * statistics.fmean(by_length[n]):.0f}% ({len(by_length[n])})" if n in by_length else "-"
                  for n in lengths]
        out.append(f"| {task} | {mode} | " + " | ".join(cells_) + " |")
    return "\n".join(out)


def speed_table(cells: list[dict], fastest: bool = False) -> str:
    """tokens/s per mode and length, over every record (a batch's time is shared by its rows); ``fastest``: the
    fastest record's (trials that ran beside other work on the same cores are slower, never faster)."""
    lengths = sorted({c["length"] for c in cells})
    tokens, seconds = defaultdict(float), defaultdict(float)
    best = defaultdict(float)
    for c in cells:
        for r in c["records"]:
            tokens[(c["mode"], c["length"])] += r["tokens"]
            seconds[(c["mode"], c["length"])] += r["seconds"]
            best[(c["mode"], c["length"])] = max(best[(c["mode"], c["length"])], r["tokens"] / r["seconds"])
    speed = best if fastest else {key: tokens[key] / seconds[key] for key in tokens if seconds[key] > 0}
    modes = list(dict.fromkeys(c["mode"] for c in cells))
    out = ["| method | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for mode in modes:
        row = []
        for n in lengths:
            if (mode, n) not in speed:
                row.append("-")
                continue
            ratios = [f"{speed[(mode, n)] / speed[(base, n)]:.2f}x {base}" for base in ("full", "xl-only")
                      if base != mode and (base, n) in speed]
            row.append(f"{speed[(mode, n)]:,.0f}" + (f" ({', '.join(ratios)})" if ratios else ""))
        out.append(f"| {mode} | " + " | ".join(row) + " |")
    return "\n".join(out)


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys((c["haystack_name"], c["task"]) for c in cells))
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.2), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        chosen = [c for c in cells if (c["haystack_name"], c["task"]) == task]
        for mode in dict.fromkeys(c["mode"] for c in chosen):
            points = sorted((c["length"], 100 * c["accuracy"]) for c in chosen if c["mode"] == mode)
            axis.plot(*zip(*points, strict=True), marker="o", label=mode)
        axis.axvline(8192, color="grey", linestyle=":", linewidth=1)  # the model's trained window
        axis.set_xscale("log", base=2)
        axis.set(title=TASKS.get(task, task[1]), xlabel="haystack tokens", ylabel="accuracy (%)", ylim=(-5, 105))
    axes[0][0].legend(fontsize=8)
    figure.suptitle("SmolLM2-135M, training-free (dotted: its 8,192-token window)", fontsize=10, y=1.03)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="benchmarks/results/smollm2")
    parser.add_argument("--plot", help="write the accuracy plot to this PNG")
    args = parser.parse_args()
    results = Path(args.results)
    loaded = load(results)
    cells = [c for c in loaded if c["haystack_name"] != "memory_variants"]
    variants = [c for c in loaded if c["haystack_name"] == "memory_variants"]
    if not cells:
        raise SystemExit(f"no cell files under {results}: run the memlm eval commands of the README first")
    print("Accuracy (trials per cell in brackets):\n\n" + accuracy_table(cells))
    if variants:
        print("\nMemory variants, passkey with 4 distractor numbers (trials in brackets):\n\n"
              + accuracy_table(variants) + "\n\n" + speed_table(variants))
    print("\nTokens/s (haystack streamed and question answered, all rows of a cell in one batch):\n\n"
          + speed_table(cells))
    print("\nTokens/s of each cell's fastest trial:\n\n" + speed_table(cells, fastest=True))
    for path in sorted(results.glob("*/perplexity.json")):
        print(f"\nPerplexity by token distance ({path.parent.name}):\n\n"
              + perplexity_table(json.loads(path.read_text())))
    if args.plot:
        plot(cells, Path(args.plot))
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
