"""Streaming tokenization (memlm.runtime.text.TextStream) against one-shot tokenization of the whole text.

    python benchmarks/bench_text.py --text ../shared/data/war_and_peace.txt \
        --train ../shared/data/tinyshakespeare.txt [--plot text.png] [--json text.json]

Three tokenizer families, trained here on the training text (nothing is trained on the evaluation
text): GPT-2 byte-level BPE, the Llama-3 pre-tokenizer regex with a BOS, SentencePiece-style
``Metaspace`` with a BOS. Every run is a fresh process: tokens/s (median of 3, the modes
interleaved), and the peak memory above the process's baseline after imports and loading (VmHWM),
at 1/4, 1 and 4 times the text (the text repeated). The stream reads the file in 64 KiB chunks and
counts its tokens, as a session feeding them would; one-shot reads the text and tokenizes it whole.
The table's runs also check that the stream's tokens equal the one-shot tokens (a hash of the ids).
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from array import array

from machine import describe

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
FAMILIES = ("gpt2", "llama3", "metaspace")
CHUNK = 1 << 16


def train(kind: str, text: str, path: str) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer, alphabet = Tokenizer(models.BPE()), pre_tokenizers.ByteLevel.alphabet()
    if kind == "gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
    elif kind == "llama3":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tokenizer.decoder = decoders.ByteLevel()
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        tokenizer.decoder, alphabet = decoders.Metaspace(), []
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<s>", "<eos>"], initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(text.splitlines(), trainer=trainer)
    if kind != "gpt2":
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer.save(path)


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:  # VmHWM restarts from the current RSS
        refs.write("5")


def worker(tokenizer_path: str, text_path: str, mode: str, times: float) -> dict:
    """One measurement in this (fresh) process."""
    import transformers

    from memlm.runtime.text import TextStream

    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer_path, bos_token="<s>")
    size = os.path.getsize(text_path)
    limit = int(size * times)
    reset_peak()
    base = peak_rss_mib()
    start = time.perf_counter()
    if mode == "one-shot":
        with open(text_path, "rb") as file:
            data = file.read()
        text = (data * int(times + 1))[:limit].decode("utf-8", errors="ignore")
        del data
        ids = tokenizer(text)["input_ids"]
        tokens, digest = len(ids), hashlib.blake2b(array("q", ids).tobytes()).hexdigest()
    else:
        stream, tokens, read, digest = TextStream(tokenizer), 0, 0, hashlib.blake2b()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")  # as one-shot decodes the whole
        while read < limit:
            with open(text_path, "rb") as file:
                while read < limit and (data := file.read(min(CHUNK, limit - read))):
                    read += len(data)
                    for piece in stream.push(decoder.decode(data)):
                        tokens += len(piece.ids)
                        digest.update(array("q", piece.ids).tobytes())
        for piece in stream.push(decoder.decode(b"", final=True)) + stream.flush():
            tokens += len(piece.ids)
            digest.update(array("q", piece.ids).tobytes())
        digest = digest.hexdigest()
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "sha": digest, "seconds": seconds, "peak_mib": peak_rss_mib() - base}


def measure(tokenizer_path: str, text_path: str, mode: str, times: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", tokenizer_path, text_path, mode, str(times)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", default="../shared/data/war_and_peace.txt")
    parser.add_argument("--train", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--plot", default=None, help="write a plot of peak memory against text length")
    parser.add_argument("--json", default=None, help="write the measurements as JSON")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        path, text, mode, times = args.worker
        print(json.dumps(worker(path, text, mode, float(times))))
        return
    print(describe())
    with open(args.train, encoding="utf-8") as file:
        training = file.read()
    directory = tempfile.mkdtemp(prefix="bench_text_")
    paths = {kind: os.path.join(directory, f"{kind}.json") for kind in FAMILIES}
    for kind, path in paths.items():
        train(kind, training, path)

    print(f"text: {args.text} ({os.path.getsize(args.text):,} bytes); tokenizers trained on {args.train}\n")
    print("| family | tokens | one-shot tok/s | streaming tok/s | streaming / one-shot |")
    print("|---|---|---|---|---|")
    rates = {}
    for kind in FAMILIES:
        runs = {"one-shot": [], "streaming": []}
        for _ in range(3):
            for mode in runs:
                runs[mode].append(measure(paths[kind], args.text, mode, 1.0))
        counts = {(run["tokens"], run["sha"]) for mode in runs for run in runs[mode]}
        assert len(counts) == 1, f"{kind}: streaming and one-shot tokens differ: {counts}"
        ((tokens, _),) = counts
        rate = {mode: tokens / statistics.median(r["seconds"] for r in runs[mode]) for mode in runs}
        rates[kind] = {"tokens": tokens, **rate}
        print(f"| {kind} | {tokens:,} | {rate['one-shot']:,.0f} | {rate['streaming']:,.0f} | "
              f"{rate['streaming'] / rate['one-shot']:.2f} |")

    lengths = (0.25, 1.0, 4.0)
    print("\npeak memory above baseline (MiB), fresh process per cell\n")
    print("| family | mode | " + " | ".join(f"{t:g}x text" for t in lengths) + " |")
    print("|---|---|" + "---|" * len(lengths))
    peaks = {}
    for kind in FAMILIES:
        for mode in ("one-shot", "streaming"):
            peaks[kind, mode] = [measure(paths[kind], args.text, mode, t)["peak_mib"] for t in lengths]
            print(f"| {kind} | {mode} | " + " | ".join(f"{p:,.0f}" for p in peaks[kind, mode]) + " |")
    if args.json:
        with open(args.json, "w") as file:
            peak_mib = {f"{kind} {mode}": values for (kind, mode), values in peaks.items()}
            json.dump({"text": args.text, "lengths": lengths, "rates": rates, "peak_mib": peak_mib}, file, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        size = os.path.getsize(args.text) / 1e6
        for (kind, mode), values in peaks.items():
            plt.plot([t * size for t in lengths], values, marker="o", linestyle="-" if mode == "streaming" else "--",
                     label=f"{kind} {mode}")
        plt.xlabel("text (MB)")
        plt.ylabel("peak memory above baseline (MiB)")
        plt.legend()
        plt.savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
