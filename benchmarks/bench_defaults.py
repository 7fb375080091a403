"""What an untrained memory does to a model it is attached to: perplexity on real text, memory on vs off.

    python benchmarks/bench_defaults.py --train ../shared/data/tinyshakespeare.txt \
        --eval ../shared/data/war_and_peace.txt [--steps 1500] [--tokens 32768]

First a plain language model is trained on the first 90% of the training text (a 4-layer Llama, hidden
128, byte-level BPE of 2,048 tokens, context 128; a few minutes on 2 cores; seeded, so every run trains
the same model), with no memory: a stand-in for the pretrained models users attach memlm to. Then two
texts stream through it (segment 64, XL cache 64): the held-out last 10% of the training text (the
model's own distribution) and the evaluation text (another author). Each with a kNN memory at its last
layer (capacity 65,536, top-k 32) under each fusion and initial gate; the script prints the mean
next-token loss, the perplexity and its ratio to the memory switched off.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import transformers
from bench_index import table

from memlm import MemoryConfig, attach
from memlm.tiny import train_tokenizer

from machine import describe


def train_base_lm(text: str, steps: int, context: int = 128, batch: int = 16, seed: int = 0):
    """A 4-layer Llama trained on ``text`` with plain next-token loss: (model, tokenizer, final loss)."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(text[i : i + 2000] for i in range(0, len(text), 2000))
    ids = torch.tensor(tokenizer(text)["input_ids"])
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
                                      num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512,
                                      tie_word_embeddings=True, bos_token_id=None,
                                      eos_token_id=tokenizer.eos_token_id)
    model = transformers.LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, 100, steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - context - 1, (batch,), generator=generator)
        rows = torch.stack([ids[s : s + context] for s in starts.tolist()])
        loss = model(rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer, float(loss.detach())


@torch.no_grad()
def streamed_loss(model, ids: torch.Tensor, config: MemoryConfig) -> float:
    mem_model = attach(model, config)
    try:
        with mem_model.session() as session:
            return float(session.feed(ids, labels=ids).loss)
    finally:
        mem_model.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True, help="training text (tinyshakespeare.txt)")
    parser.add_argument("--eval", type=Path, required=True, help="evaluation text (war_and_peace.txt)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of the base model")
    parser.add_argument("--tokens", type=int, default=32768, help="evaluation tokens streamed")
    args = parser.parse_args()
    print(describe())
    start = time.perf_counter()
    train_text = args.train.read_text(encoding="utf-8")
    split = int(0.9 * len(train_text))
    model, tokenizer, train_loss = train_base_lm(train_text[:split], args.steps)
    print(f"base LM: {sum(p.numel() for p in model.parameters()):,} parameters, {args.steps} steps, "
          f"final training loss {train_loss:.3f}, {time.perf_counter() - start:.0f} s")
    eval_text = args.eval.read_text(encoding="utf-8")
    texts = {f"held-out 10% of {args.train.name}": train_text[split:],
             args.eval.name: eval_text[len(eval_text) // 3 :][: 8 * args.tokens]}  # past the front matter
    local = {"segment_length": 64, "xl_length": 64}
    memory = {**local, "memory_layers": (-1,), "memory_capacity": 65536, "top_k": 32}
    variants = [
        ("memory off (XL cache 64 only)", MemoryConfig(**local, memory_layers=())),
        ("gate, gate_init 0 (memlm 0.1 default)", MemoryConfig(**memory, fusion="gate", gate_init=0.0)),
        ("gate, gate_init -4", MemoryConfig(**memory, fusion="gate", gate_init=-4.0)),
        ("gate, gate_init -8", MemoryConfig(**memory, fusion="gate", gate_init=-8.0)),
        ("joint (one softmax), memory_positions first", MemoryConfig(**memory, fusion="joint")),
        ("joint, memory_positions original", MemoryConfig(**memory, fusion="joint", memory_positions="original")),
        ("default MemoryConfig(memory_layers=(-1,))", MemoryConfig(**memory)),
    ]
    for name, text in texts.items():
        ids = torch.tensor([tokenizer(text)["input_ids"][: args.tokens]])
        rows, base = [], None
        for variant, config in variants:
            value = streamed_loss(model, ids, config)
            base = value if base is None else base
            rows.append([variant, f"{value:.4f}", f"{math.exp(value):,.1f}", f"{math.exp(value - base):.3f}"])
        table(f"A base LM trained without memory, untrained memory at its last layer: {ids.shape[1]:,} tokens of "
              f"{name}", ["memory", "loss", "perplexity", "vs memory off"], rows)


if __name__ == "__main__":
    main()
