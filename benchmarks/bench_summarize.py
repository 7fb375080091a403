"""A whole book through Unlimiformer retrieval: encoding speed, decoding speed, peak memory.

    python benchmarks/bench_summarize.py            # all of War and Peace (~1M tokens here), a few minutes
    python benchmarks/bench_summarize.py --quick    # the first 100,000 tokens

Model: a tiny random BART (d_model 128, 2 + 2 layers, 4 heads, 1,024 positions) with a byte-level BPE
tokenizer (8,192 entries) trained on the book by this script; nothing is downloaded. Encoding runs in
windows of 1,024 tokens that advance by 512. Decoding is greedy without stops, with the cache:

* Unlimiformer over the whole book, top-k 32 per head and query (every decoder layer retrieves);
* the plain model over an input that fits (the first 1,024 tokens), full cross-attention, for scale;
* Unlimiformer over that same 1,024-token input, top-k 32.

Peak RSS is the process's maximum resident set (ru_maxrss), model and book included.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
import transformers
from bench_index import table
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from memlm.summarize.unlimiformer import Unlimiformer, UnlimiformerConfig

from machine import describe

BOOK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "war_and_peace.txt"
STEPS = 32


def tokenize(text: str) -> list[int]:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(vocab_size=8192, show_progress=False))
    return tokenizer.encode(text).ids


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steps_per_second(decode) -> float:
    start = time.perf_counter()
    decode()
    return STEPS / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--book", type=Path, default=BOOK)
    args = parser.parse_args()
    print(describe())
    ids = tokenize(args.book.read_text(encoding="utf-8"))
    if args.quick:
        ids = ids[:100_000]
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=8192, d_model=128, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=512,
                                     decoder_ffn_dim=512, max_position_embeddings=1024)
    model = transformers.BartForConditionalGeneration(config).eval()
    book = torch.tensor([ids])
    unlimiformer = Unlimiformer(model, UnlimiformerConfig(top_k=32))
    rss_before = peak_rss_mb()

    start = time.perf_counter()
    encoded = unlimiformer.encode(book, progress=True)
    encode_s = time.perf_counter() - start
    whole = steps_per_second(lambda: unlimiformer.generate(encoded, max_new_tokens=STEPS, eos_token_id=[]))
    fits = book[:, :1024]
    greedy = transformers.GenerationConfig(decoder_start_token_id=2, max_new_tokens=STEPS, do_sample=False)
    with torch.no_grad():
        model.generate(input_ids=fits, generation_config=greedy)  # warm-up
        plain = steps_per_second(lambda: model.generate(input_ids=fits, generation_config=greedy))
    fits_encoded = unlimiformer.encode(fits)
    small = steps_per_second(lambda: unlimiformer.generate(fits_encoded, max_new_tokens=STEPS, eos_token_id=[]))

    rows = [
        ["encode the whole book", f"{len(ids):,}", f"{len(ids) / encode_s:,.0f} tokens/s", f"{encode_s:.1f} s"],
        ["decode, Unlimiformer top-k 32, whole book", f"{len(ids):,}", f"{whole:.1f} steps/s", ""],
        ["decode, plain model, full attention", "1,024", f"{plain:.1f} steps/s", ""],
        ["decode, Unlimiformer top-k 32", "1,024", f"{small:.1f} steps/s", ""],
    ]
    table(f"{args.book.name} through a tiny random BART ({torch.get_num_threads()} threads; decode: {STEPS} greedy "
          "steps from an input encoded beforehand)",
          ["run", "input tokens", "speed", "time"], rows)
    print(f"\npeak RSS {peak_rss_mb():,.0f} MB (before encoding {rss_before:,.0f} MB; target < 4,096 MB)")


if __name__ == "__main__":
    main()
