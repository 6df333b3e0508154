"""A chain of stages read as one run (`tunelab report PARENT` where PARENT/chain.json exists).

- the curves end to end: each stage's steps continue the previous stage's, with a line at
  every stage boundary (PARENT/report/chain_loss.png);
- the forgetting table (PARENT/forgetting.md, .json): every eval set's numbers at the start
  and at the end of every stage. A set named after a stage is that stage's validation rows,
  so in its own stage it reads that stage's eval_loss / task metrics, and in later stages
  eval_NAME_loss / eval_NAME_METRIC (train/probes.py, evaluate/in_training.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tunelab.evaluate.report import _figure, _g
from tunelab.io import write_json_atomic, write_text_atomic
from tunelab.train.runlog import LOG_NAME, read_log, save_figure

CHAIN_FILE = "chain.json"


def read_stages(parent: Path) -> list[dict]:
    """chain.json's stages, each with its log rows (stages not started have none)."""
    stages = json.loads((parent / CHAIN_FILE).read_text(encoding="utf-8"))["stages"]
    for stage in stages:
        log = Path(stage["folder"]) / LOG_NAME
        stage["rows"] = read_log(log) if log.is_file() else []
    return stages


def _eval_sets(stages: list[dict]) -> list[str]:
    """The names of every eval set the stages logged (eval_NAME_loss)."""
    names = []
    for stage in stages:
        for row in stage["rows"]:
            for key in row:
                found = re.fullmatch(r"eval_(.+)_loss", key)
                if found and found.group(1) not in names:
                    names.append(found.group(1))
    return names


def _last(rows: list[dict], key: str):
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


def forgetting(stages: list[dict]) -> dict:
    """{set: {metric: [value at start, after stage 1, after stage 2, ...]}}."""
    table = {}
    for name in _eval_sets(stages):
        metrics = sorted({k[len(f"eval_{name}_"):] for s in stages for r in s["rows"] for k in r
                          if k.startswith(f"eval_{name}_")})
        table[name] = {}
        for metric in metrics:
            values = []
            for i, stage in enumerate(stages):
                own = stage["name"] == name  # the set is this stage's own validation split
                key = (f"eval_{metric}" if own else f"eval_{name}_{metric}")
                if i == 0:
                    first = [r for r in stage["rows"] if key in r]
                    values.append(first[0][key] if first and first[0]["step"] == 0 else None)
                values.append(_last(stage["rows"], key))
            table[name][metric] = values
    return table


def write_forgetting(parent: Path) -> str | None:
    """PARENT/forgetting.md and .json; returns the markdown (None when no stage probed a set)."""
    stages = read_stages(Path(parent))
    table = forgetting(stages)
    if not table:
        return None
    heads = ["start"] + [f"after {s['index']}-{s['name']}" for s in stages]
    lines = ["# Forgetting: each eval set at the end of each stage", "",
             "| eval set | metric | " + " | ".join(heads) + " |", "| --- | --- |" + " ---: |" * len(heads)]
    for name, metrics in table.items():
        for metric, values in metrics.items():
            cells = ["" if v is None else _g(v) for v in values]
            lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"
    write_text_atomic(Path(parent) / "forgetting.md", markdown)
    write_json_atomic(Path(parent) / "forgetting.json", {"columns": heads, "table": table})
    return markdown


def run_chain_report(parent: Path, out_dir: Path | None = None) -> str:
    """One plot of every stage's curves end to end, plus the forgetting table; returns a summary."""
    parent = Path(parent)
    out_dir = Path(out_dir) if out_dir is not None else parent / "report"
    stages = read_stages(parent)
    fig, ax = _figure()
    offset, lines = 0, []
    for stage in stages:
        rows = stage["rows"]
        if not rows:
            lines.append(f"stage {stage['index']} ({stage['name']}): {stage['status']}, nothing logged")
            continue
        train = [(offset + r["step"], r["loss"]) for r in rows if "loss" in r]
        evals = {key: [(offset + r["step"], r[key]) for r in rows if key in r]
                 for key in sorted({k for r in rows for k in r if re.fullmatch(r"eval_(.+_)?loss", k)})}
        if train:
            ax.plot(*zip(*train), color="tab:blue", alpha=0.6, label="train loss" if offset == 0 else None)
        for key, points in evals.items():
            ax.plot(*zip(*points), "o-", markersize=3, label=f"{stage['name']}: {key}")
        if offset:
            ax.axvline(offset, color="black", linestyle="--", linewidth=1)
        ax.annotate(f"{stage['index']}-{stage['name']}", (offset, 1.0), xycoords=("data", "axes fraction"),
                    va="top", fontsize=8)
        last = max(r["step"] for r in rows)
        lines.append(f"stage {stage['index']} ({stage['name']}): {stage['status']}, {last} steps, "
                     f"final train loss {_g(train[-1][1]) if train else '-'}")
        offset += last
    ax.set(xlabel="step (stages end to end)", ylabel="loss", title="Chain: loss by stage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, out_dir / "chain_loss.png")
    table = write_forgetting(parent)
    summary = "\n".join([f"{parent}: chain of {len(stages)} stage(s); plot in {out_dir / 'chain_loss.png'}", *lines])
    write_text_atomic(out_dir / "chain.md", f"# Chain report: {parent}\n\n" + "\n".join(f"- {x}" for x in lines)
                      + "\n\n![chain loss](chain_loss.png)\n\n" + (table or ""))
    return summary + ("\n" + table if table else "")
