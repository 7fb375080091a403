"""A memlm session on a tiny random Llama: attach, feed a long text, generate, detach.

    python examples/session_demo.py [--text ../shared/data/tinyshakespeare.txt] [--tokens 20000]

Nothing is downloaded: the model is built from a config with random weights and the tokenizer is
trained on the text itself, so the generated text is noise; the point is the API and the mechanics
(segments, XL cache, kNN memory filling up). ``memlm demo`` will run a trained default model.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from memlm import MemoryConfig, attach


def train_tokenizer(text: str, vocab_size: int = 2048) -> transformers.PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(text.splitlines(), trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


def made_up_text(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocabulary = "the a river stone light garden letter morning winter harbour journey mirror voice".split()
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", help="a text file to feed (default: made-up text)")
    parser.add_argument("--tokens", type=int, default=20000, help="feed at most this many tokens")
    args = parser.parse_args()
    text = Path(args.text).read_text(encoding="utf-8") if args.text else made_up_text(30000)
    tokenizer = train_tokenizer(text[:200_000])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=2048,
    )).eval()
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, : args.tokens]

    # The README's example, on this tiny model.
    config = MemoryConfig(segment_length=512, xl_length=512, memory_layers=(-1,), top_k=32, memory_capacity=65536)
    mem_model = attach(model, config, tokenizer=tokenizer)
    with mem_model.session() as session:
        start = time.perf_counter()
        result = session.feed(ids, progress=True)
        seconds = time.perf_counter() - start
        answer = session.generate("the river", max_new_tokens=20)
        in_memory = int(session.state.knn.indexes[3].size[0])
    model = mem_model.detach()

    print(f"fed {result.tokens:,} tokens in {result.segments} segments, {result.tokens / seconds:,.0f} tokens/s")
    print(f"kNN memory of layer 3 holds {in_memory:,} entries; the XL cache holds the last {config.xl_length}")
    print(f"generated (random weights, so noise): {answer!r}")


if __name__ == "__main__":
    main()
