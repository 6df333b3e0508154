"""`tunelab data mine-pairs`: preference pairs from a model's own mistakes.

Decode a data file (the training split) with a fine-tuned model, score each answer with
the task, and keep the wrong ones (`Task.mistake`: wrong slots, wrong role, malformed
JSON...) as `rejected` against the reference as `chosen`. Hand-made pairs are often too
easy (the base model already ranks them right); these are the errors the model makes.

Output: `preference` records the dpo / simpo / orpo / kto stages read, with the prompt as
a message list (hotel roles included) and two fields for the curious: `mistake` and
`source`.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field

from tunelab.data.formats import PREFERENCE_ROLES
from tunelab.data.templates import resolve_template
from tunelab.data.tools.common import check_output_path, write_records
from tunelab.data.types import Message
from tunelab.evaluate import runner
from tunelab.evaluate.tasks import EvalSample, Task, get_task
from tunelab.evaluate.tasks.hotel import split_role
from tunelab.model.adapters import load_adapter
from tunelab.model.generate import GenerationOptions
from tunelab.model.loader import load_model, load_tokenizer


@dataclass
class MineStats:
    rows: int = 0
    mistakes: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)  # wrong answers no pair can hold, by reason

    def summary(self) -> str:
        kept = sum(self.mistakes.values())
        parts = ", ".join(f"{n} {what}" for what, n in self.mistakes.most_common()) or "none"
        line = f"{kept} pairs from {self.rows} rows ({parts})"
        if self.skipped:
            line += "; left out: " + ", ".join(f"{n} {what}" for what, n in self.skipped.most_common())
        return line


def _turn(m: Message) -> dict:
    return {"role": m.role, "content": m.content}


def rejected_turn(task: Task, sample: EvalSample, prediction: str) -> Message | None:
    """The wrong answer as a turn. The hotel model writes its role on the first line, so its
    answer is (role, rest); elsewhere the answer has the reference's role."""
    if task.name != "hotel":
        return Message(sample.target.role, prediction)
    role, body = split_role(prediction)
    return Message(role, body) if role in ("search", "assistant") else None


def pair_records(task: Task, samples: list[EvalSample], rows: list[dict], stats: MineStats) -> list[dict]:
    """A preference record for each scored row the task calls a mistake."""
    records = []
    for sample, row in zip(samples, rows):
        stats.rows += 1
        mistake = task.mistake(row)
        if mistake is None:
            continue
        rejected = rejected_turn(task, sample, row["prediction"])
        if sample.tools:
            stats.skipped["with tool schemas (the preference format holds none)"] += 1
        elif rejected is None or not rejected.content.strip():
            stats.skipped["answers with no usable role or text"] += 1
        elif any(m.role not in PREFERENCE_ROLES for m in sample.prompt):
            stats.skipped["prompts with roles a preference record cannot hold"] += 1
        else:
            stats.mistakes[mistake] += 1
            records.append({"prompt": [_turn(m) for m in sample.prompt], "chosen": _turn(sample.target),
                            "rejected": _turn(rejected), "mistake": mistake, "source": sample.source})
    return records


def mine_pairs(model, tokenizer, task: Task, samples: list[EvalSample], template_src: str, options,
               batch_size: int = 8, progress: bool = True) -> tuple[list[dict], MineStats]:
    generated = runner.predict(model, tokenizer, samples, template_src, options, task=task.name,
                               batch_size=batch_size, progress=progress, desc="mining")
    runner.score(task, generated.rows, tuple(m for m in task.default_metrics if m != "ppl"))
    stats = MineStats()
    return pair_records(task, samples, generated.rows, stats), stats


def run_mine_pairs(args) -> int:
    """The `tunelab data mine-pairs` handler (lent to the data CLI by tunelab/cli.py)."""
    check_output_path(args.output)
    task = get_task(args.task)
    samples = task.load(args.src, args.format, args.limit)
    tokenizer = load_tokenizer(args.model)
    template_src = resolve_template(args.template or task.default_template or "auto", tokenizer)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.adapter:
        model = load_adapter(model, args.adapter).merge_and_unload()
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)
    records, stats = mine_pairs(model, tokenizer, task, samples, template_src, options, args.batch_size,
                                progress=not args.no_progress)
    write_records(args.output, records)
    print(f"{stats.summary()}; wrote {args.output}", file=sys.stderr)
    return 0
