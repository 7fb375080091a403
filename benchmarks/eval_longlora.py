"""LongLoRA on the base recipe model: perplexity on War and Peace at 2,048 and 256 tokens after the same budget.

    memlm train --config examples/train_base.yaml --output runs/base
    python benchmarks/eval_longlora.py --steps 200 [--output benchmarks/results/longlora.json]

Every configuration starts from ``examples/longlora_tiny.yaml`` (PI 256 -> 2,048, fine-tuned on tinyshakespeare at
2,048 tokens, same data, seed, steps and learning rate) and changes what is trained and how attention runs in
training; every trained model is evaluated with full attention (as LongLoRA infers): the perplexity of
``--windows`` windows of 2,048 tokens (and of 256) of War and Peace, from a tenth into the book, one forward each.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import transformers
import yaml

from memlm.positions.scaling import extend_from_spec
from memlm.train import recipe as recipes

from machine import describe

CONFIGS = {
    "full fine-tune, full attention": {"trainable": "all", "attention": None},
    "LoRA (q, v), full attention": {"trainable": "lora", "attention": None},
    "LoRA + embed, norm, full attention": {"trainable": "lora_embed_norm", "attention": None},
    "LoRA + embed, norm, S2-Attn (LongLoRA)": {"trainable": "lora_embed_norm",
                                               "attention": {"name": "s2", "group_size_ratio": 0.25}},
}


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, length: int, windows: int) -> float:
    losses = []
    for w in range(windows):
        window = ids[w * length : (w + 1) * length + 1]
        logits = model(window[None, :-1]).logits[0]
        losses.append(torch.nn.functional.cross_entropy(logits.float(), window[1:], reduction="none"))
    return math.exp(float(torch.cat(losses).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="examples/longlora_tiny.yaml")
    parser.add_argument("--text", default="../shared/data/war_and_peace.txt")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--output", default="benchmarks/results/longlora.json")
    args = parser.parse_args()
    print(describe())
    base = yaml.safe_load(Path(args.recipe).read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(base["model"]["path"])
    text = Path(args.text).read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text[len(text) // 10 :], add_special_tokens=False)["input_ids"])
    results = {}

    model = transformers.AutoModelForCausalLM.from_pretrained(base["model"]["path"]).eval()
    extend_from_spec(model, base["extend"])
    results["no fine-tune (PI only)"] = {"ppl_2048": perplexity(model, ids, 2048, args.windows),
                                         "ppl_256": perplexity(model, ids, 256, 8 * args.windows)}
    print("no fine-tune", results["no fine-tune (PI only)"], flush=True)
    for name, change in CONFIGS.items():
        spec = copy.deepcopy(base)
        spec["train"].update(trainable=change["trainable"], steps=args.steps, progress=False)
        spec.pop("attention", None)
        if change["attention"]:
            spec["attention"] = change["attention"]
        with tempfile.TemporaryDirectory() as work:
            path = Path(work) / "recipe.yaml"
            path.write_text(yaml.safe_dump(spec))
            start = time.perf_counter()
            metrics = recipes.run(path, Path(work) / "run")
            seconds = time.perf_counter() - start
            model = transformers.AutoModelForCausalLM.from_pretrained(Path(work) / "run" / "model").eval()
        results[name] = {"ppl_2048": perplexity(model, ids, 2048, args.windows),
                         "ppl_256": perplexity(model, ids, 256, 8 * args.windows),
                         "train_loss": metrics["final_loss"], "train_seconds": round(seconds, 1)}
        print(name, results[name], flush=True)
    print("\n| configuration | ppl at 2,048 | ppl at 256 | final train loss | train s |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ppl_2048']:,.1f} | {r['ppl_256']:,.1f} | {r.get('train_loss', float('nan')):.3f} | "
              f"{r.get('train_seconds', 0):.0f} |")
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
