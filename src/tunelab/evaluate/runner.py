"""`tunelab eval`: generate for every sample, score with the task, write the results.

The pipeline is split so each part can be reused and re-run on its own:
`predict` (model -> predictions rows), `score` (rows -> per-sample and summary scores,
no model: `--predictions FILE` takes this path alone), `write_results` (atomic files).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.data.collate import pad_id_for
from tunelab.data.templates import mark_trained
from tunelab.data.tokenize import encode_conversation, encode_prompt, stop_token_ids
from tunelab.data.types import IGNORE_INDEX
from tunelab.errors import TunelabError
from tunelab.evaluate.tasks import EvalSample, Task
from tunelab.io import write_json_atomic, write_jsonl_atomic, write_text_atomic
from tunelab.model.generate import GenerationOptions, auto_batch_size, generate_batch, left_pad, pad_positions

# Summary keys shown first in tables, in this order; other keys follow alphabetically.
HEADLINE = ("slot_precision", "slot_recall", "slot_f1", "bleu4", "corpus_bleu", "rouge1", "rouge2",
            "rougeL", "exact_match", "ppl", "ref_loss", "role_accuracy", "empty_predictions",
            "truncated_predictions", "samples", "search_rows", "assistant_rows", "slot_correct",
            "slot_predicted", "slot_expected")


def parse_metrics(task: Task, text: str | None) -> tuple[str, ...]:
    if not text:
        return task.default_metrics
    names = tuple(dict.fromkeys(m.strip().lower() for m in text.split(",") if m.strip()))
    unknown = [m for m in names if m not in task.metrics]
    if unknown or not names:
        raise TunelabError(f"unknown metric(s) {', '.join(unknown) or '(none given)'} for task {task.name}",
                           where="--metrics", fix=f"choose from {','.join(task.metrics)}")
    return names


# --- model side ------------------------------------------------------------------------

@dataclass
class Generated:
    rows: list[dict]
    seconds: float
    completion_tokens: int
    info: dict = field(default_factory=dict)

    @property
    def speed(self) -> dict:
        return {"seconds": round(self.seconds, 2),
                "samples_per_s": round(len(self.rows) / max(self.seconds, 1e-9), 3),
                "tokens_per_s": round(self.completion_tokens / max(self.seconds, 1e-9), 1), **self.info}


def encode_prompts(samples: Sequence[EvalSample], tokenizer, template_src: str) -> list[list[int]]:
    prompts = []
    for sample in samples:
        try:
            prompts.append(encode_prompt(sample.prompt, tokenizer, template_src, tools=sample.tools))
        except TunelabError as exc:
            raise TunelabError(exc.what, where=exc.where or sample.source, fix=exc.fix) from None
    return prompts


def describe_prompt(sample: EvalSample, tokenizer, template_src: str) -> str:
    """What `--show-prompt` prints for one sample: the prompt exactly as the model gets it
    (text and token ids) and the whole exchange with the tokens a training run on it
    would learn [[marked]] (the reference turn and its end-of-turn marker)."""
    prompt = encode_prompts([sample], tokenizer, template_src)[0]
    full = encode_conversation(sample.conversation(), tokenizer, template_src, 1 << 30, train_on="last")
    return (f"=== {sample.source}: prompt of {len(prompt)} tokens ===\n"
            f"{tokenizer.decode(prompt, skip_special_tokens=False)}\n"
            f"=== token ids ===\n{prompt}\n"
            f"=== with the reference, [[trained-on tokens]] marked ===\n"
            f"{mark_trained(full.input_ids, full.labels, tokenizer)}\n")


@torch.inference_mode()
def reference_losses(model, tokenizer, samples: Sequence[EvalSample], template_src: str,
                     batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each sample's reference turn under teacher forcing.

    Labels come from the training encoder (reference turn + its end marker), so this is
    exactly the loss training reports on that turn, per sample. Rows are left-padded so
    every reference ends at the right edge: only the last few positions need vocabulary
    logits (`logits_to_keep`), not the whole prompt (a 2k-token prompt x 150k vocabulary
    would be a gigabyte of logits per row).
    """
    limit = getattr(model.config, "max_position_embeddings", None) or 1 << 20
    encoded = [encode_conversation(s.conversation(), tokenizer, template_src, limit, train_on="last")
               for s in samples]
    device = next(model.parameters()).device
    pad = pad_id_for(tokenizer)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start:start + batch_size]]
        ids, mask = left_pad([e.input_ids for e in chunk], pad)
        labels, _ = left_pad([e.labels for e in chunk], IGNORE_INDEX)
        width, keep = ids.shape[1], 2
        for e in chunk:
            n = len(e.input_ids)
            first = next((j for j, label in enumerate(e.labels) if label != IGNORE_INDEX), n)
            keep = max(keep, n - first + 1)  # the position before the first label predicts it
        positions = pad_positions(mask)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device), logits_to_keep=keep).logits.float()
        targets = labels[:, width - keep + 1:].to(device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets,
                                                ignore_index=IGNORE_INDEX, reduction="none")
        for row, index in enumerate(order[start:start + batch_size]):
            out[index] = (float(nll[row].sum()), int((targets[row] != IGNORE_INDEX).sum()))
    return out


def predict(model, tokenizer, samples: Sequence[EvalSample], template_src: str, options: GenerationOptions,
            *, task: str, batch_size: int | None = None, with_ppl: bool = False, progress: bool = True,
            desc: str = "generating") -> Generated:
    """Prediction rows (prompt, reference, prediction, meta) for every sample, in order."""
    prompts = encode_prompts(samples, tokenizer, template_src)
    stops = stop_token_ids(tokenizer, template_src)
    if batch_size is None:
        batch_size = auto_batch_size(model, prompts, options.max_new_tokens)
    started = time.perf_counter()
    generations = generate_batch(model, tokenizer, prompts, options, stops, batch_size=batch_size,
                                 progress=progress, desc=desc)
    seconds = time.perf_counter() - started
    rows = [make_row(i, task, sample, tokenizer.decode(prompt, skip_special_tokens=False), gen.text,
                     gen.finish_reason, gen.prompt_tokens, gen.completion_tokens)
            for i, (sample, prompt, gen) in enumerate(zip(samples, prompts, generations))]
    if with_ppl:
        for row, (nll, count) in zip(rows, reference_losses(model, tokenizer, samples, template_src, batch_size)):
            row["ref_nll"], row["ref_tokens"] = nll, count
    completion = sum(g.completion_tokens for g in generations)
    return Generated(rows, seconds, completion, {"batch_size": batch_size, "samples": len(rows),
                                                 "prompt_tokens": sum(len(p) for p in prompts)})


def make_row(i: int, task: str, sample: EvalSample, prompt: str, prediction: str, finish_reason: str,
             prompt_tokens: int | None, completion_tokens: int | None) -> dict:
    """One predictions.jsonl row (local and remote generation write the same rows)."""
    return {"id": i, "task": task, "source": sample.source, "prompt": prompt, "reference": sample.reference,
            "prediction": prediction, "meta": sample.meta, "finish_reason": finish_reason,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}


# --- scoring (no model) ----------------------------------------------------------------

def score(task: Task, rows: list[dict], metrics: tuple[str, ...]) -> dict:
    """Fill each row's `scores` and return the summary (rows are updated in place)."""
    if "ppl" in metrics and any("ref_tokens" not in r for r in rows):
        raise TunelabError("the predictions hold no reference losses, so perplexity cannot be computed",
                           where="--metrics ppl",
                           fix="generate again with --metrics including ppl, or drop ppl from --metrics")
    for row in rows:
        row["scores"] = task.score_row(row, metrics)
    summary = task.aggregate(rows, metrics)
    summary["truncated_predictions"] = sum(r.get("finish_reason") == "length" for r in rows)
    return summary


def read_predictions(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"predictions file {path} does not exist", where="--predictions",
                           fix="give the predictions.jsonl an earlier `tunelab eval` wrote")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise TunelabError(f"not valid JSON ({exc.msg})", where=f"{path}:{number}",
                               fix="restore the file from a `tunelab eval` run") from None
        missing = [k for k in ("reference", "prediction") if not isinstance(row.get(k), str)]
        if missing:
            raise TunelabError(f"row has no {' / '.join(missing)} text", where=f"{path}:{number}",
                               fix="each row needs string `reference` and `prediction` fields")
        row.setdefault("meta", {})
        rows.append(row)
    if not rows:
        raise TunelabError("no predictions in the file", where=str(path), fix="run `tunelab eval` first")
    return rows


# --- output ----------------------------------------------------------------------------

def _ordered_keys(summaries: Sequence[dict]) -> list[str]:
    keys = dict.fromkeys(k for s in summaries for k, v in s.items() if isinstance(v, (int, float)))
    return [k for k in HEADLINE if k in keys] + sorted(k for k in keys if k not in HEADLINE)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, int):
        return str(int(value))
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.2f}"


def markdown_table(summary: dict) -> str:
    lines = ["| metric | value |", "| --- | ---: |"]
    lines += [f"| {k} | {_fmt(summary[k])} |" for k in _ordered_keys([summary])]
    lines += [f"| {k} | {v} |" for k, v in summary.items() if isinstance(v, str)]  # e.g. what bleu4 counts
    return "\n".join(lines) + "\n"


def comparison_table(base: dict, tuned: dict) -> str:
    lines = ["| metric | base | tuned | delta |", "| --- | ---: | ---: | ---: |"]
    for key in _ordered_keys([base, tuned]):
        b, t = base.get(key), tuned.get(key)
        delta = t - b if isinstance(b, (int, float)) and isinstance(t, (int, float)) else None
        sign = "+" if delta is not None and delta > 0 else ""
        lines.append(f"| {key} | {_fmt(b)} | {_fmt(t)} | {sign}{_fmt(delta)} |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, rows: list[dict], summary: dict, info: dict) -> None:
    """predictions.jsonl, scores.json and scores.md, each written atomically."""
    write_jsonl_atomic(out_dir / "predictions.jsonl", rows)
    write_json_atomic(out_dir / "scores.json", {"scores": summary, **info})
    write_text_atomic(out_dir / "scores.md", _header(info) + markdown_table(summary))


def write_comparison(out_dir: Path, base: dict, tuned: dict, info: dict) -> str:
    table = comparison_table(base, tuned)
    write_json_atomic(out_dir / "comparison.json", {"base": base, "tuned": tuned, **info})
    write_text_atomic(out_dir / "comparison.md", _header(info) + table)
    return table


def _header(info: dict) -> str:
    parts = [f"{k}: `{info[k]}`" for k in ("task", "model", "adapter", "data", "template") if info.get(k)]
    return ("# Evaluation\n\n" + "  \n".join(parts) + "\n\n") if parts else ""
