"""Which block-scoring rule finds the asked fact: the rank of the needle's block when the question selects.

    python benchmarks/block_ranks.py [--haystack ../shared/data/war_and_peace.txt] [--length 8192] [--trials 4]
                                     [--task passkey --distractors 4 | --task niah_multikey] [--dtype float32]

For each trial (the haystacks of ``memlm eval --depths random``'s cell) a haystack is streamed through the model's
default memory (block retrieval, ``memlm.models``), then the question is fed once with the memory recording its
queries (``BlockMemory.queries``). At every memory layer and key/value head the live blocks are ranked by each
rule's votes (``BlockMemory.query_votes``: Quest's ``minmax`` bound, InfLLM's ``representatives``, the ``exact``
attention mass), and the rank of the block holding the asked value (its first token) is kept. Prints, per rule, how
often that block is among the 2 / 4 / 8 best of a layer and head, its median rank, how often the document's first block
(the model's attention sink, when memory holds it) ranks first, and the layer.head pairs that rank it among the 4
best in every trial (a probe of the heads that retrieve; the first 12 listed). The row ``exact, pooled`` ranks by
the lift of each token's exact votes summed over the heads and over the layers from ``--pooled-from`` up to each
layer (the selection ``pooled_selection_from`` makes), one rank per layer.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch

from memlm.eval.runner import cell_seed
from memlm.eval.tasks import Haystack, make_sample
from memlm.memory.block_memory import lift
from memlm.models import load_model

RULES = ("minmax", "representatives", "exact")


def needle_token(tokenizer, context: str, offset: int) -> int:
    """The index of the token holding character ``offset`` of ``context`` (as a session tokenizes it)."""
    spans = tokenizer(context, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    return next(i for i, (_, end) in enumerate(spans) if end > offset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--haystack", help="a text whose sentences make the haystack (default: the filler)")
    parser.add_argument("--task", default="passkey", choices=("passkey", "niah_multikey", "niah_multikey_uuids"))
    parser.add_argument("--distractors", type=int, default=4, help="passkey: distractor numbers")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--pooled-from", type=int, default=10, help="the first layer of the pooled row")
    args = parser.parse_args()
    from machine import describe

    mem_model, tokenizer = load_model(args.model, dtype=args.dtype)
    haystack = Haystack.from_file(args.haystack) if args.haystack else Haystack()
    options = {"distractors": args.distractors} if args.task == "passkey" else {}
    ranks: dict[str, list[int]] = defaultdict(list)  # rule -> the needle block's rank at every layer, head, trial
    top4: dict[str, dict[tuple[int, int], int]] = defaultdict(lambda: defaultdict(int))
    first_block_first: dict[str, list[bool]] = defaultdict(list)  # rule -> at every layer, head, trial
    blocks = []
    for trial in range(args.trials):
        sample = make_sample(args.task, tokenizer, haystack, args.length, None,
                             cell_seed(args.task, args.length, None, trial), **options)  # memlm eval's haystacks
        # the block that must come back: the one holding the asked value's first token (a needle cut by a block
        # boundary has its words in one block and its value in the next)
        needle = needle_token(tokenizer, sample.context, sample.context.index(sample.references[0], sample.needles[0]))
        with torch.no_grad(), mem_model.session() as session:
            session.feed(sample.context)  # as memlm eval asks: the text's held-back tail is fed with the question
            memory = session.state.memory
            memory.queries = []
            session.feed(" " + sample.question, final=True)
            pool, heads = 0, mem_model.model.config
            tokens = memory.queries[0][1].shape[2] * heads.num_key_value_heads // heads.num_attention_heads
            for layer, queries in memory.queries:
                live = memory.blocks[layer].live_blocks
                block = (needle - memory.memory_start) // memory.block_size - live.start
                if not 0 <= block < len(live):
                    continue  # the needle is still in the local context
                for rule in RULES:
                    query_votes = memory.query_votes(layer, queries, 1 / queries.shape[-1] ** 0.5, rule)
                    votes = query_votes.sum(dim=2)[0]  # [hkv, blocks]
                    order = votes.argsort(dim=-1, descending=True)
                    for head, rank in enumerate((order == block).float().argmax(dim=-1).tolist()):
                        ranks[rule].append(rank)
                        top4[rule][(layer, head)] += rank < 4
                    if live.start == 0:
                        first_block_first[rule] += (order[:, 0] == 0).tolist()
                if layer >= args.pooled_from:
                    # each token's exact votes (the last rule), summed over the heads
                    pool = pool + query_votes.unflatten(2, (-1, tokens)).sum(dim=(1, 2))
                    order = lift(pool)[0].argsort(descending=True)
                    ranks["exact, pooled"].append(int((order == block).nonzero()))
                    if live.start == 0:
                        first_block_first["exact, pooled"].append(bool(order[0] == 0))
            blocks.append(len(live))
    print(f"{describe()}; {args.model}, {args.dtype}; {args.task} (distractors: {options.get('distractors', 0)}) in "
          f"{args.haystack or 'filler'}, {args.length:,} tokens, {args.trials} trials, {statistics.fmean(blocks):.0f} "
          "blocks of memory\n")
    print("| rule | needle's block in the 2 best | in the 4 best | in the 8 best | median rank | "
          "document's first block first | layer/heads with the needle's in the 4 best every trial |")
    print("|---|---|---|---|---|---|---|")
    for rule in (*RULES, "exact, pooled"):
        found = ranks[rule]
        within = " | ".join(f"{sum(r < k for r in found) / len(found):.0%}" for k in (2, 4, 8))
        always = sorted(key for key, hits in top4[rule].items() if hits == args.trials)
        heads = ", ".join(f"{layer}.{head}" for layer, head in always[:12]) + (", ..." if len(always) > 12 else "")
        heads = f"{len(always)}: {heads}" if rule in RULES else f"- (layers {args.pooled_from} up: a rank per layer)"
        first = first_block_first[rule]
        sink = f"{sum(first) / len(first):.0%}" if first else "- (evicted)"
        print(f"| {rule} | {within} | {statistics.median(found):.0f} | {sink} | {heads} |")


if __name__ == "__main__":
    main()
