"""Train memlm-tiny, the default model memlm ships (``memlm/tiny/``), from scratch on this CPU.

    python examples/train_tiny.py --text ../shared/data/tinyshakespeare.txt --output runs/tiny
    python examples/train_tiny.py ... --output memlm/tiny      # replace the shipped model

1. A byte-level BPE tokenizer is trained on the text, the filler sentences, the passkey phrases and
   every number of up to three digits (each becomes one token).
2. Plain text: a short language-model warm-up on chunks of the text (every token scored).
3. Passkey, local: short haystacks (one segment) with a 3-digit key; the model learns to find the
   number and copy it. Many short documents per step: one scored answer per document is little signal.
4. Passkey, memory: haystacks of several segments, trained with the Focused Transformer's CrossBatch
   memory: the memory layer attends, differentiably and in one softmax with its local keys, to every
   earlier context of its own document. Other documents are not used as negatives: every haystack
   says "The pass key is N", so another document's key could not be told apart.
5. Evaluation: passkey trials through ordinary sessions (the kNN index), at lengths never trained on.

Everything is seeded: rerunning gives the same model.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from memlm import attach
from memlm.eval.passkey import passkey_trials
from memlm.tiny import PASSKEY_DIGITS, memory_config, new_model, train_tokenizer
from memlm.train import TrainConfig, Trainer
from memlm.train.data import FILLER, Passkey, TextDocuments


def tokenizer_corpus(text: str, seed: int = 0) -> list[str]:
    """The text's lines, the filler sentences and passkey phrases (so they tokenize into few tokens)."""
    rng = random.Random(seed)
    phrases = [f"The pass key is {rng.randrange(10**4, 10**5)}. Remember it. What is the pass key?"
               for _ in range(200)]
    numbers = [str(n) for n in range(1000)] * 500  # every number of up to 3 digits becomes one token
    return text.splitlines() + list(FILLER) * 200 + phrases + numbers


def train(trainer: Trainer, name: str, every: int = 25) -> float:
    """Run the trainer to its end, printing the mean loss every ``every`` steps; returns the last mean."""
    start = time.perf_counter()
    while trainer.step < trainer.config.steps:
        trainer.train(every)
        loss = sum(trainer.history[-every:]) / len(trainer.history[-every:])
        print(f"{name} step {trainer.step}: loss {loss:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True, help="plain UTF-8 text for the tokenizer and the warm-up")
    parser.add_argument("--output", required=True, help="directory for the model, tokenizer and metrics")
    parser.add_argument("--text-steps", type=int, default=50, help="language-model steps on the text")
    parser.add_argument("--local-steps", type=int, default=500, help="passkey steps, one-segment haystacks")
    parser.add_argument("--memory-steps", type=int, default=1500, help="passkey steps, CrossBatch memory")
    parser.add_argument("--memory-segments", type=int, default=4, help="segments per memory-phase haystack")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-lengths", type=int, nargs="*", default=[1024, 4096], help="passkey evaluation")
    parser.add_argument("--eval-trials", type=int, default=40)
    args = parser.parse_args()
    output = Path(args.output)
    started = time.perf_counter()

    text = Path(args.text).read_text(encoding="utf-8")
    tokenizer = train_tokenizer(tokenizer_corpus(text, args.seed))
    mem_model = attach(new_model(tokenizer, args.seed), memory_config(), tokenizer=tokenizer)
    segment = mem_model.config.segment_length
    metrics: dict = {"parameters": sum(p.numel() for p in mem_model.model.parameters())}

    def phase(name: str, task, steps: int, batch_size: int, segments: int, seed: int, **extra) -> None:
        config = TrainConfig(steps=steps, batch_size=batch_size, document_tokens=segments * segment, trainable="all",
                             lr=args.lr, warmup_steps=min(50, steps), schedule="constant", seed=seed,
                             progress=False, **extra)
        if steps:
            metrics[f"{name}_loss"] = train(Trainer(mem_model, task, config), name)

    passkey = Passkey(tokenizer, digits=PASSKEY_DIGITS)
    # Each phase draws its documents from its own seed.
    phase("text", TextDocuments(args.text, tokenizer), args.text_steps, batch_size=32, segments=2, seed=args.seed + 1)
    phase("passkey_local", passkey, args.local_steps, batch_size=128, segments=1, seed=args.seed + 2)
    phase("passkey_memory", passkey, args.memory_steps, batch_size=32, segments=args.memory_segments,
          seed=args.seed + 3, crossbatch_positives=args.memory_segments, crossbatch_negatives=0)
    metrics["train_seconds"] = round(time.perf_counter() - started, 1)

    mem_model.model.eval()
    for length in args.eval_lengths:
        seeds = list(range(10**6, 10**6 + args.eval_trials))  # never used in training
        results = passkey_trials(mem_model, tokenizer, length=length, seeds=seeds, digits=PASSKEY_DIGITS)
        metrics[f"passkey_accuracy_{length}"] = sum(r.right for r in results) / len(results)
    print(json.dumps(metrics, indent=2))

    output.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(output)
    mem_model.save_pretrained(output)
    mem_model.detach().save_pretrained(output)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


if __name__ == "__main__":
    main()
