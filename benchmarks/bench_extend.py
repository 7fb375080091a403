"""RoPE context extension of the base recipe model: perplexity on War and Peace by context length, per method.

    memlm train --config examples/train_base.yaml --output runs/base        # the model (trained at 256 tokens)
    python benchmarks/bench_extend.py --model runs/base --text ../shared/data/war_and_peace.txt \
        [--finetune-steps 200 --train ../shared/data/tinyshakespeare.txt] [--plot extend.png]

Each method extends the model from 256 to 2,048 positions (factor 8) with ``memlm.extend_context``; "none"
is the model as trained (extrapolation). For every context length L the text's first tokens are cut into
windows of L tokens and each window is one forward; the table gives the perplexity of all their tokens.
"memlm stream" is the unextended model streamed through a session over the same windows (rebase positions,
segments of 128 with an XL cache of 128: no position ever exceeds the trained 256). With ``--finetune-steps``
every method is also fine-tuned on the training text at 2,048 tokens for the same number of steps (same data,
seed and learning rate) first. Windows start a tenth into the text (past the Gutenberg header).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import transformers

from memlm import MemoryConfig, attach, extend_context
from memlm.train.data import TextDocuments
from memlm.train.trainer import TrainConfig, Trainer

from machine import describe

METHODS = {
    "none": None,
    "linear (PI)": ("linear", {}),
    "ntk": ("ntk", {}),
    "dynamic": ("dynamic", {}),
    "yarn": ("yarn", {}),
    "abf (500K)": ("abf", {"rope_theta": 500000.0}),
    "giraffe (power 0.5)": ("giraffe", {"power": 0.5}),
    "giraffe (truncate 256)": ("giraffe", {"truncate": 256}),
}
LENGTHS = (256, 512, 1024, 2048, 4096)
FACTOR = 8


def perplexity(model, ids: torch.Tensor, length: int, windows: int, stream: bool = False) -> float:
    """exp(mean loss) over ``windows`` consecutive windows of ``length`` tokens of ids [n]."""
    total, count = 0.0, 0
    mem_model = None
    if stream:
        mem_model = attach(model, MemoryConfig(segment_length=128, xl_length=128, memory_layers=()))
    try:
        with torch.no_grad():
            for w in range(windows):
                window = ids[w * length : (w + 1) * length][None]
                if stream:
                    with mem_model.session() as session:
                        logits = session.feed(window, return_logits=True).logits
                else:
                    logits = model(window).logits
                loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), window[0, 1:], reduction="sum")
                total, count = total + float(loss), count + window.shape[1] - 1
    finally:
        if mem_model is not None:
            mem_model.detach()
    return math.exp(total / count)


def finetune(model, tokenizer, train_path: str, steps: int) -> None:
    mem_model = attach(model, MemoryConfig(segment_length=2048, xl_length=0, memory_layers=()), tokenizer=tokenizer)
    config = TrainConfig(steps=steps, batch_size=2, document_tokens=2048, trainable="all", lr=5e-4, warmup_steps=10,
                         schedule="cosine", seed=1, progress=False)
    Trainer(mem_model, TextDocuments(train_path, tokenizer), config).train()
    mem_model.detach()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="runs/base", help="a memlm train output (model/ in it) or a model dir")
    parser.add_argument("--text", default="../shared/data/war_and_peace.txt")
    parser.add_argument("--tokens", type=int, default=16384, help="evaluation tokens per length (default 16384)")
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--train", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    print(describe())
    directory = Path(args.model) / "model" if (Path(args.model) / "model").is_dir() else Path(args.model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    base = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()
    text = Path(args.text).read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text[len(text) // 10 :], add_special_tokens=False)["input_ids"][: args.tokens])
    rows = {}
    runs = [(name, False) for name in METHODS] + [("memlm stream (rebase: segment 128 + XL 128)", True)]
    for tuned in ([False, True] if args.finetune_steps else [False]):
        for name, stream in runs:
            model = copy.deepcopy(base)
            if not stream and METHODS[name] is not None:
                method, parameters = METHODS[name]
                extend_context(model, method, factor=None if method == "abf" else FACTOR, **parameters)
            start = time.perf_counter()
            if tuned:
                finetune(model, tokenizer, args.train, args.finetune_steps)
            label = f"{name}{' + fine-tune' if tuned else ''}"
            rows[label] = [perplexity(model, ids, n, args.tokens // n, stream) for n in LENGTHS]
            print(f"{label}: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"\nperplexity on {args.text} ({args.tokens:,} tokens per length), base trained at 256 tokens\n")
    print("| method | " + " | ".join(f"{n:,}" for n in LENGTHS) + " |")
    print("|---|" + "---|" * len(LENGTHS))
    for label, values in rows.items():
        print(f"| {label} | " + " | ".join(f"{v:,.1f}" if v < 1e5 else f"{v:.1e}" for v in values) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"lengths": LENGTHS, "perplexity": rows}, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4))
        for label, values in rows.items():
            axis.plot(LENGTHS, values, marker="o", label=label, linestyle="--" if "fine-tune" in label else "-")
        axis.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="perplexity")
        axis.set_xticks(LENGTHS, [str(n) for n in LENGTHS])
        axis.legend(fontsize=7)
        figure.savefig(args.plot, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
