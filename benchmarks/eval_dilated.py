"""LongNet's dilated attention on the base recipe model: fine-tuned briefly at 2,048 tokens with dilated attention vs
with dense attention, perplexity on War and Peace at 2,048 under each attention.

    memlm train --config examples/train_base.yaml --output runs/base
    python benchmarks/eval_dilated.py --steps 200 [--output benchmarks/results/dilated_finetune.json]

Both runs start from ``examples/longlora_tiny.yaml`` (the base model, PI 256 -> 2,048, tinyshakespeare documents of
2,048 tokens, same seed, steps and learning rate), train every weight, and differ only in the attention they train
with: dense causal SDPA, or ``use_attention(model, "dilated", segment_lengths=(512, 1024, 2048),
dilation_rates=(1, 2, 4))`` (LongNet's geometric patterns, scaled to a 2,048-token window). Every model is evaluated
under both attentions: the perplexity of ``--windows`` windows of 2,048 tokens of War and Peace, from a tenth into the
book, one forward each (never trained on).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers
import yaml
from eval_longlora import perplexity as window_perplexity  # the script's directory is on sys.path

from memlm import use_attention
from memlm.positions.scaling import extend_from_spec
from memlm.train import recipe as recipes

from machine import describe

DILATED = {"name": "dilated", "segment_lengths": [512, 1024, 2048], "dilation_rates": [1, 2, 4]}


def perplexity(model, ids: torch.Tensor, length: int, windows: int, attention: dict | None) -> float:
    """eval_longlora's windowed perplexity, with ``attention`` (a use_attention spec) selected while it runs."""
    if not attention:
        return window_perplexity(model, ids, length, windows)
    use_attention(model, attention["name"], **{k: v for k, v in attention.items() if k != "name"})
    try:
        return window_perplexity(model, ids, length, windows)
    finally:
        use_attention(model, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="examples/longlora_tiny.yaml")
    parser.add_argument("--text", default="../shared/data/war_and_peace.txt")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--output", default="benchmarks/results/dilated_finetune.json")
    args = parser.parse_args()
    print(describe())
    base = yaml.safe_load(Path(args.recipe).read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(base["model"]["path"])
    text = Path(args.text).read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text[len(text) // 10 :], add_special_tokens=False)["input_ids"])

    def evaluate(model) -> dict:
        return {"ppl_dense": perplexity(model, ids, 2048, args.windows, None),
                "ppl_dilated": perplexity(model, ids, 2048, args.windows, DILATED)}

    model = transformers.AutoModelForCausalLM.from_pretrained(base["model"]["path"], attn_implementation="sdpa")
    extend_from_spec(model.eval(), base["extend"])
    results = {"no fine-tune (PI only)": evaluate(model)}
    print("no fine-tune", results["no fine-tune (PI only)"], flush=True)
    for name, attention in (("fine-tuned with dense attention", None),
                            ("fine-tuned with dilated attention", DILATED)):
        spec = copy.deepcopy(base)
        spec["train"].update(trainable="all", steps=args.steps, progress=False)
        spec.pop("attention", None)
        if attention:
            spec["attention"] = attention
        with tempfile.TemporaryDirectory() as work:
            path = Path(work) / "recipe.yaml"
            path.write_text(yaml.safe_dump(spec))
            start = time.perf_counter()
            metrics = recipes.run(path, Path(work) / "run")
            seconds = time.perf_counter() - start
            model = transformers.AutoModelForCausalLM.from_pretrained(Path(work) / "run" / "model",
                                                                      attn_implementation="sdpa").eval()
        results[name] = {**evaluate(model), "train_loss": metrics["final_loss"], "train_seconds": round(seconds, 1)}
        print(name, results[name], flush=True)
    print("\n| model | ppl at 2,048, dense attention | ppl at 2,048, dilated attention | final train loss | train s |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ppl_dense']:,.1f} | {r['ppl_dilated']:,.1f} | {r.get('train_loss', float('nan')):.3f} | "
              f"{r.get('train_seconds', 0):.0f} |")
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
