"""`tunelab data check | convert | dedup | split | stats | mine-pairs`: look at and fix
fine-tuning data before training on it (mine-pairs: preference pairs from a model's
mistakes). Every subcommand reads any supported format (see docs/data.md)."""

from __future__ import annotations

import json
import sys

from tunelab.config import TunelabConfig
from tunelab.data.formats import FORMATS
from tunelab.errors import TunelabError

DEFAULT_CUTOFF = TunelabConfig.cutoff_len  # what a default training run truncates at


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="check, convert, deduplicate, split and profile data files",
                                 description=__doc__)
    tools = data.add_subparsers(dest="data_command", metavar="TOOL", required=True)
    formats = ("auto",) + FORMATS

    def common(p, *, inputs: str = "one"):
        if inputs == "many":
            p.add_argument("paths", nargs="+", metavar="FILE", help=".jsonl, .json, .parquet or .csv")
        else:
            p.add_argument("src", metavar="FILE", help=".jsonl, .json, .parquet or .csv")
        p.add_argument("--format", default="auto", choices=formats, help="record format (default: detected)")

    def tokens(p, *, required: bool = False):
        p.add_argument("--model", required=required, help="model whose tokenizer counts tokens (name or folder)")
        p.add_argument("--template", default="auto",
                       help="chat template: auto (the tokenizer's), a built-in name (chatml, hotel, ...) or a .jinja")
        p.add_argument("--cutoff-len", type=int, default=DEFAULT_CUTOFF,
                       help=f"sequence length training truncates at (default {DEFAULT_CUTOFF}, as in training)")

    p = tools.add_parser("check", help="report every problem; exit 1 if any record is unusable")
    common(p, inputs="many")
    tokens(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--limit", type=int, default=50, help="problems listed per file (default 50; counts stay exact)")
    p.add_argument("--against", metavar="TEST",
                   help="also list the rows of this test file that the checked files already hold "
                        "(verbatim, or by dialogue prefix): scores on them measure memory")
    p.set_defaults(func=cmd_check)

    p = tools.add_parser("convert", help="rewrite a file in another format")
    common(p)
    p.add_argument("dst", metavar="OUT", help="output .jsonl or .json")
    p.add_argument("--to", required=True, choices=FORMATS, help="target format")
    p.add_argument("--skip-invalid", action="store_true", help="leave out records that cannot be converted")
    p.set_defaults(func=cmd_convert)

    p = tools.add_parser("dedup", help="remove exact and near-duplicate records")
    common(p)
    p.add_argument("dst", metavar="OUT", help="output .jsonl or .json")
    p.add_argument("--near", type=float, default=0.9,
                   help="Jaccard similarity of character n-grams counted as a near duplicate (0: exact only)")
    p.add_argument("--compare", choices=("auto", "record", "exchange"), default="auto",
                   help="near-duplicates by whole record, or by the last exchange only (the turn before the "
                        "answer + the answer), for rows that share dialogue prefixes like the hotel set; auto "
                        "(default): exchange when 10%% of the rows are earlier turns of a longer row, and says so")
    p.add_argument("--ngram", type=int, default=5, help="characters per n-gram (default 5)")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    p.add_argument("--report", help="also write every removed group to this JSON file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--skip-invalid", action="store_true", help="drop invalid records instead of stopping")
    p.set_defaults(func=cmd_dedup)

    p = tools.add_parser("split", help="train/validation/test files, dialogues never split apart")
    common(p)
    p.add_argument("outdir", metavar="OUTDIR", help="folder for train.jsonl, validation.jsonl, test.jsonl")
    p.add_argument("--ratios", default="0.7,0.15,0.15", help="train,validation,test (or train,test) shares")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--group-by", help="field that identifies a dialogue (default: the first user turn)")
    p.add_argument("--stratify", help="label field to balance across splits (hotel: response_role)")
    p.add_argument("--skip-invalid", action="store_true", help="drop invalid records instead of stopping")
    p.set_defaults(func=cmd_split)

    p = tools.add_parser("stats", help="counts, lengths per role, truncation, labels, prompt diversity")
    common(p)
    tokens(p)
    p.add_argument("--label", help="field whose distribution to show (hotel: response_role by default)")
    p.add_argument("--plot", metavar="PNG", help="write histograms to this PNG file")
    p.add_argument("--top", type=int, default=10, help="repeated instruction openings to list")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--skip-invalid", action="store_true", help="leave out invalid records")
    p.set_defaults(func=cmd_stats)

    p = tools.add_parser("mine-pairs", help="preference pairs from a fine-tuned model's own mistakes",
                         description="Decode FILE (your training split) with the model, score every answer with "
                                     "the task and write each wrong one (wrong slots, wrong role, malformed JSON, ...) "
                                     "as `rejected` against the reference as `chosen`: a preference file for "
                                     "stage=dpo / kto.",
                         epilog="example: tunelab data mine-pairs train.jsonl pairs.jsonl --adapter runs/hotel_sft "
                                "--task hotel")
    common(p)
    p.add_argument("output", metavar="OUT", help="preference .jsonl or .json to write")
    p.add_argument("--model", default=TunelabConfig.model_name_or_path, help="base model (alias, folder, hub id)")
    p.add_argument("--adapter", help="the fine-tuned LoRA adapter (a run folder)")
    p.add_argument("--task", default="generic", help="how answers are judged: hotel or generic (default)")
    p.add_argument("--template", help="chat template (default: the task's, else the model's own)")
    p.add_argument("--limit", type=int, help="decode only the first N rows")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_mine_pairs)


def cmd_mine_pairs(args) -> int:
    # The work needs a model and a task scorer (later stages): tunelab/cli.py lends it.
    if not getattr(args, "mine_pairs", None):
        raise TunelabError("mine-pairs needs the model and evaluate stages", where="tunelab data mine-pairs",
                           fix="run it through the `tunelab` command (tunelab.cli.main)")
    return args.mine_pairs(args)


def _counter(args):
    """A TokenCounter when --model is given; the template is resolved now so a missing
    chat template is one clear error, not one per record."""
    if not args.model:
        return None
    from tunelab.data.tools.tokens import TokenCounter

    # Loading a tokenizer (aliases, model folders, the hub cache) is the model stage's: tunelab/cli.py lends it.
    if not getattr(args, "load_tokenizer", None):
        raise TunelabError("--model needs the model stage's tokenizer loader", where="tunelab data",
                           fix="run it through the `tunelab` command (tunelab.cli.main)")
    counter = TokenCounter(args.load_tokenizer(args.model), args.template, args.cutoff_len)
    counter.template_src()
    return counter


def cmd_check(args) -> int:
    from tunelab.data.tools.check import check_file

    counter = _counter(args)
    reports = [check_file(path, args.format, counter=counter) for path in args.paths]
    leakage = None
    if args.against:
        from tunelab.data.tools.leakage import check_leakage

        leakage = check_leakage(args.paths, args.against, args.format)
    if args.json:
        out = [r.to_json() for r in reports]
        print(json.dumps({"files": out, "leakage": leakage.to_json()} if leakage else out,
                         ensure_ascii=False, indent=2))
    else:
        for report in reports:
            for problem in report.problems[: args.limit]:
                print(f"{problem.severity}: {problem.line()}")
            hidden = report.errors + report.warnings - min(args.limit, len(report.problems))
            if hidden > 0:
                print(f"... {hidden} more problems (--limit N shows more, --json up to 1000)")
            print(("\n" if report.problems else "") + report.summary() + "\n")
        if leakage:
            print(leakage.summary(args.limit) + "\n")
    return 1 if any(r.errors for r in reports) else 0


def cmd_convert(args) -> int:
    from tunelab.data.tools.convert import convert_file

    written, skipped = convert_file(args.src, args.dst, args.to, args.format, skip_invalid=args.skip_invalid)
    note = f" ({skipped} records that could not be converted left out)" if skipped else ""
    print(f"wrote {written} {args.to} records to {args.dst}{note}")
    return 0


def cmd_dedup(args) -> int:
    from tunelab.data.tools.dedup import dedup_file
    from tunelab.io import write_json_atomic

    result = dedup_file(args.src, args.dst, args.format, near=args.near or None, ngram=args.ngram,
                        num_perm=args.num_perm, skip_invalid=args.skip_invalid, compare=args.compare)
    if args.report:
        write_json_atomic(args.report, result.to_json())
    print(json.dumps(result.to_json(), ensure_ascii=False, indent=2) if args.json else result.summary())
    return 0


def cmd_split(args) -> int:
    from tunelab.data.tools.split import split_file

    result = split_file(args.src, args.outdir, args.ratios, seed=args.seed, fmt=args.format,
                        group_by=args.group_by, stratify=args.stratify, skip_invalid=args.skip_invalid)
    print(result.summary(args.stratify))
    print(f"\nwrote {', '.join(f'{args.outdir}/{n}.jsonl' for n in result.names)}"
          + (f" ({result.skipped_invalid} invalid records left out)" if result.skipped_invalid else ""))
    return 0


def cmd_stats(args) -> int:
    from tunelab.data.tools.stats import plot, profile_file

    stats = profile_file(args.src, args.format, counter=_counter(args), label_field=args.label,
                         skip_invalid=args.skip_invalid)
    print(json.dumps(stats.to_json(args.top), ensure_ascii=False, indent=2) if args.json else stats.summary(args.top))
    if args.plot:
        plot(stats, args.plot)
        print(f"\nwrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0
