"""Training throughput of the memory trainer on this machine: memory off vs each way of training memory.

    python benchmarks/bench_train.py           # a small Llama (4 layers, hidden 256), ~2 minutes on 2 cores
    python benchmarks/bench_train.py --quick   # fewer steps

Every run trains the whole model with AdamW on text-like documents (associative-recall filler, so
nothing is downloaded) of 512 tokens in segments of 128 with a 128-token XL cache, batch 8, float32:

* memory off: XL cache only;
* gate (Memorizing Transformers): a kNN memory layer (exact torch index, top_k 32), stop-gradient;
* joint + CrossBatch (Focused Transformer): a differentiable memory of 1 own context + 3 negatives;
* RMT: 8 memory tokens, backpropagation through 4 segments.

Tokens/s counts document tokens (not RMT tokens); the ratio is against memory off, measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers
from bench_index import table

from memlm import MemoryConfig, attach
from memlm.train import TrainConfig, Trainer
from memlm.train.data import AssociativeRecall

from machine import describe

SEGMENT, DOCUMENT, BATCH = 128, 512, 8
RUNS = {
    "memory off (XL only)": (MemoryConfig(segment_length=SEGMENT, xl_length=SEGMENT, memory_layers=()), {}),
    "gate, kNN memory (Memorizing)": (
        MemoryConfig(segment_length=SEGMENT, xl_length=SEGMENT, memory_layers=(-2,), top_k=32), {}),
    "joint + CrossBatch (FoT)": (
        MemoryConfig(segment_length=SEGMENT, xl_length=SEGMENT, memory_layers=(-2,), fusion="joint"),
        {"crossbatch_positives": 1, "crossbatch_negatives": 3}),
    "RMT (8 tokens, BPTT 4)": (
        MemoryConfig(segment_length=SEGMENT, xl_length=SEGMENT, memory_layers=(), rmt_tokens=8, rmt_bptt_depth=4),
        {}),
}


def model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)
    return transformers.LlamaForCausalLM(config)


def tokens_per_second(memory: MemoryConfig, extra: dict, steps: int) -> float:
    task = AssociativeRecall(vocab_size=4096, pairs=32, keys=512, values=512)
    config = TrainConfig(steps=steps + 1, batch_size=BATCH, document_tokens=DOCUMENT, trainable="all", lr=1e-4,
                         progress=False, **extra)
    trainer = Trainer(attach(model(), memory), task, config)
    trainer.train_step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return steps * BATCH * DOCUMENT / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(describe())
    steps = 3 if args.quick else 8
    rates = {name: tokens_per_second(memory, extra, steps) for name, (memory, extra) in RUNS.items()}
    base = rates["memory off (XL only)"]
    rows = [[name, f"{rate:,.0f}", f"{rate / base:.2f}"] for name, rate in rates.items()]
    table(f"Training throughput ({torch.get_num_threads()} threads; Llama 4 x 256, documents of {DOCUMENT} tokens in "
          f"segments of {SEGMENT}, batch {BATCH}, {steps} steps after one warm-up)",
          ["run", "tokens/s", "vs memory off"], rows)


if __name__ == "__main__":
    main()
