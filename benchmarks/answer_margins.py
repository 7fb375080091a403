"""How sure the answer is of the asked value: its teacher-forced margin over the other candidates, per block count.

    python benchmarks/answer_margins.py [--task niah_multikey | --task passkey [--distractors 4]] [--haystack FILE]
                                        [--length 16384] [--trials 0,1,2,3] [--top-blocks 8,4,2,1] [--per-token]

Accuracy says whether the answer was right; this says by how much, on the same haystacks (``memlm eval``'s trials:
their seeds are ``cell_seed``'s). Each haystack is streamed once through the model's default memory (block
retrieval, ``memlm.models``); then, in a branch per block count, the question is fed (selecting that many blocks
per layer and key/value head) and each candidate (the asked value and every other needle's: another key's value,
or a door code) is teacher-forced token by token, one-token forwards as generation makes them (holding the
question's blocks unless ``--per-token``). Prints, per haystack and block count, the asked value's log-probability
margin over the best other candidate (positive: the model prefers the asked one; none for a lone pass key) and its
own log-probability. Changing ``top_blocks`` after the stream changes what the question and the answer read, not
what the document's segments read while it was streamed.
"""

from __future__ import annotations

import argparse

import torch

from memlm.eval.runner import cell_seed
from memlm.eval.tasks import Haystack, make_sample
from memlm.models import load_model


def answer_logprob(session, question_logits: torch.Tensor, answer: list[int], skip: int) -> float:
    """log p(answer | stream, question), one token per forward, the first ``skip`` tokens (shared by every
    candidate) not counted."""
    logits, total = question_logits, 0.0
    for j, token in enumerate(answer):
        if j >= skip:
            total += torch.log_softmax(logits.float(), dim=-1)[token].item()
        if j < len(answer) - 1:
            logits = session.feed(torch.tensor([[token]]), return_logits=True).logits[0, -1]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="niah_multikey", choices=("passkey", "niah_multikey"))
    parser.add_argument("--haystack", help="a text whose sentences make the haystack (default: the filler)")
    parser.add_argument("--distractors", type=int, default=0, help="passkey: distractor numbers (door codes)")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--trials", default="0,1,2,3", help="comma-separated trial numbers of memlm eval's cell")
    parser.add_argument("--top-blocks", default="8,4,2,1", help="comma-separated block counts")
    parser.add_argument("--per-token", action="store_true", help="each answer token selects for itself")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    from machine import describe

    mem_model, tokenizer = load_model(args.model, dtype=args.dtype)
    haystack = Haystack.from_file(args.haystack) if args.haystack else Haystack()
    options = {"distractors": args.distractors} if args.task == "passkey" else {}  # as memlm eval's
    # multikey answers ": 1234567" after "... mentioned in the provided text is", the pass key " 12345"
    prefix, skip = (": ", 1) if args.task == "niah_multikey" else (" ", 0)
    counts = [int(n) for n in args.top_blocks.split(",")]
    answer = "each answer token selecting for itself" if args.per_token else "the answer holding the question's blocks"
    print(f"{describe()}; {args.model}, {args.dtype}; {args.task} in {args.haystack or 'filler'}, {args.length:,} "
          f"tokens; {answer}\n")
    print("| trial | " + " | ".join(f"{n} blocks: margin (log p)" for n in counts) + " |")
    print("|---" * (len(counts) + 1) + "|")
    for trial in (int(t) for t in args.trials.split(",")):
        sample = make_sample(args.task, tokenizer, haystack, args.length, None,
                             cell_seed(args.task, args.length, None, trial), **options)
        candidates = [*sample.references[:1], *sample.distractors]
        cells = []
        with torch.no_grad(), mem_model.session() as session:
            session.feed(sample.context)  # as memlm eval: the text's tail is tokenized with the question
            for top_blocks in counts:
                with session.branch():
                    memory = session.state.memory
                    memory.top_blocks, memory.hold = top_blocks, not args.per_token
                    logits = session.feed(" " + sample.question, return_logits=True, final=True).logits[0, -1]
                    logprobs = []
                    for candidate in candidates:
                        with session.branch():
                            answer = tokenizer(prefix + candidate, add_special_tokens=False)["input_ids"]
                            logprobs.append(answer_logprob(session, logits, answer, skip))
                margin = f"{logprobs[0] - max(logprobs[1:]):+.1f}" if len(logprobs) > 1 else "-"  # a lone key
                cells.append(f"{margin} ({logprobs[0]:.1f})")
        print(f"| {trial} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
