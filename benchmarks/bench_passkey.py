"""Passkey retrieval with memlm-tiny: accuracy by haystack length and key depth, memory on vs off.

    python benchmarks/bench_passkey.py                    # 2K-128K, 20 trials per cell (~55 min on 2 cores)
    python benchmarks/bench_passkey.py --lengths 2048 8192 --trials 10 --no-plot
    python benchmarks/bench_passkey.py --from-json a.json b.json    # table + heat map of earlier runs

Three ways to run the same model (``memlm.load_default()``): memory on (XL cache + kNN memory, as
shipped), XL only (``memory_layers=()``) and memory off (no XL cache either: each segment alone).
Each cell is ``--trials`` haystacks with their own keys, streamed as one batched session; a trial is
right when the whole key comes out (chance: 1 in 900 for the 3-digit keys memlm-tiny was trained
on). Prints the table and writes a heat map (``--plot``, needs matplotlib: ``pip install
'memlm[bench]'``) and the raw results as JSON (after every cell, so an interrupted run keeps them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_index import table

from memlm.eval.passkey import passkey_trials
from memlm.tiny import PASSKEY_DIGITS, load_default

from machine import describe

MODES = {"memory on": {}, "XL only": {"memory_layers": ()}, "memory off": {"memory_layers": (), "xl_length": 0}}


def run(lengths: list[int], depths: list[float], trials: int, modes: list[str], digits: int, first_seed: int,
        output: Path) -> list[dict]:
    rows = []
    for mode in modes:
        mem_model, tokenizer = load_default(**MODES[mode])
        for length in lengths:
            for depth in depths:
                start = time.perf_counter()
                seeds = list(range(first_seed, first_seed + trials))
                results = passkey_trials(mem_model, tokenizer, length=length, seeds=seeds, depth=depth, digits=digits)
                rows.append({"mode": mode, "length": length, "depth": depth, "trials": trials,
                             "accuracy": sum(r.right for r in results) / trials,
                             "tokens_per_second": results[0].tokens_per_second,
                             "seconds": time.perf_counter() - start})
                print(f"{mode:>10} {length:>7} tokens, depth {depth:.0%}: {rows[-1]['accuracy']:.0%} "
                      f"({rows[-1]['seconds']:.0f} s)", flush=True)
                output.parent.mkdir(parents=True, exist_ok=True)
                output.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    figure, axes = plt.subplots(1, len(modes), figsize=(3.4 * len(modes) + 1.2, 3.4), squeeze=False,
                                layout="constrained")
    for ax, mode in zip(axes[0], modes, strict=True):
        grid = [[next((r["accuracy"] for r in rows if (r["mode"], r["length"], r["depth"]) == (mode, n, d)),
                      float("nan")) for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                ax.text(j, i, "-" if value != value else f"{value:.0%}", ha="center", va="center", fontsize=9)
        ax.set_title(mode)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("haystack tokens")
    axes[0][0].set_ylabel("key depth")
    figure.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    figure.suptitle("memlm-tiny passkey retrieval (3-digit keys)")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    print(f"\nwrote {path}")


def merge(rows: list[dict]) -> list[dict]:
    """One row per (mode, length, depth): runs of the same cell with other seeds add their trials."""
    cells: dict[tuple, dict] = {}
    for r in rows:
        key = (r["mode"], r["length"], r["depth"])
        if key not in cells:
            cells[key] = dict(r)
            continue
        c = cells[key]
        right = c["accuracy"] * c["trials"] + r["accuracy"] * r["trials"]
        c["trials"] += r["trials"]
        c["accuracy"], c["seconds"] = right / c["trials"], c["seconds"] + r["seconds"]
    return list(cells.values())


def report(rows: list[dict]) -> None:
    """The accuracy table (trials per cell in brackets where a cell had fewer than the most) and speeds."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    most = max(r["trials"] for r in rows)
    cell = {(r["mode"], r["length"], r["depth"]): r for r in rows}
    lines = []
    for mode in modes:
        for depth in depths:
            found = [cell.get((mode, n, depth)) for n in lengths]
            lines.append([mode, f"{depth:.0%}"] + [
                "-" if r is None else f"{r['accuracy']:.0%}" + (f" ({r['trials']})" if r["trials"] < most else "")
                for r in found])
    table(f"Passkey accuracy, memlm-tiny, {most} trials per cell unless (n) says otherwise",
          ["mode", "key depth"] + [f"{n:,} tokens" for n in lengths], lines)
    speed = [[mode] + [next((f"{r['tokens_per_second']:,.0f}" for r in rows if (r["mode"], r["length"]) == (mode, n)),
                            "-") for n in lengths] for mode in modes]
    table("Streaming speed, tokens/s (all trials of a cell in one batch)", ["mode"] + [f"{n:,}" for n in lengths],
          speed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=0, help="trials use seeds first-seed, first-seed + 1, ...")
    parser.add_argument("--digits", type=int, default=PASSKEY_DIGITS, help="key digits (default: as trained)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--plot", default="docs/passkey.png", help="heat-map PNG (default docs/passkey.png)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/passkey.json", help="raw results")
    parser.add_argument("--from-json", nargs="+", metavar="FILE",
                        help="run nothing: print the table and plot the results of earlier runs (their --json files)")
    args = parser.parse_args()
    print(describe())
    if args.from_json:
        rows = merge([row for path in args.from_json for row in json.loads(Path(path).read_text())])
    else:
        rows = run(args.lengths, args.depths, args.trials, args.modes, args.digits, args.first_seed, Path(args.json))
    report(rows)
    if not args.no_plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()
