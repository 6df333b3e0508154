"""`tunelab report RUN_A RUN_B ...` (or a sweep folder): several runs side by side.

Writes into the output folder: curves.png (every run's loss, and the chosen metric when it is
not a loss, overlaid), compare.md and compare.json: the runs ranked by the metric, a config diff
with only the keys that differ, final metrics side by side, each run's curve diagnosis
(evaluate/report.py's reading, unchanged) and the same evaluation examples answered by each run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tunelab.board.runs import best_value, config_diff, lower_is_better, predictions, read_config, read_rows
from tunelab.evaluate.report import Finding, diagnose, find_log, read_curves
from tunelab.io import write_json_atomic, write_text_atomic
from tunelab.train.runlog import ema, save_figure, window_size

EXAMPLES = 3  # evaluation examples shown per comparison
SHOWN_METRICS = ("loss", "eval_loss", "eval_perplexity")  # always in the table, task metrics after them


@dataclass
class RunSummary:
    name: str
    path: Path
    best: float | None  # best value of the ranking metric
    best_step: float | None
    last: dict  # last value of every logged metric
    findings: list[Finding]


def run_names(paths: list[Path]) -> list[str]:
    """Short unique names: the folder name, with its parent's where two runs share one."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def summarize_runs(paths: list[Path], metric: str) -> list[RunSummary]:
    from tunelab.board.runs import final_metrics

    out = []
    for name, path in zip(run_names(paths), paths):
        rows = read_rows(path)
        best, step = best_value(rows, metric)
        out.append(RunSummary(name, path, best, step, final_metrics(rows), diagnose(read_curves(find_log(path)))))
    return out


def ranked(summaries: list[RunSummary], metric: str) -> list[RunSummary]:
    """Best first by the metric; runs that never logged it last."""
    sign = 1 if lower_is_better(metric) else -1
    return sorted(summaries, key=lambda s: (s.best is None, sign * (s.best if s.best is not None else 0)))


def plot_runs(paths: list[Path], names: list[str], metric: str, path: Path) -> Path:
    """Train loss (smoothed) and eval loss of every run in one colour each; the metric on a second
    panel when it is not a loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    extra = metric not in ("loss", "eval_loss")
    fig = Figure(figsize=(12 if extra else 8, 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if extra else 1, squeeze=False)[0]
    for i, (run, name) in enumerate(zip(paths, names)):
        color = f"C{i % 10}"
        c = read_curves(find_log(run))
        ok = np.isfinite(c.loss)
        if ok.any():
            axes[0].plot(c.steps[ok], ema(c.loss[ok], window_size(int(ok.sum()))), color=color, label=f"{name} train")
        ev = np.isfinite(c.eval_loss)
        if ev.any():
            axes[0].plot(c.eval_steps[ev], c.eval_loss[ev], "o--", color=color, label=f"{name} eval")
        if extra and metric in c.eval_metrics:
            values = c.eval_metrics[metric]
            good = np.isfinite(values)
            axes[1].plot(c.eval_steps[good], values[good], "o-", color=color, label=name)
    axes[0].set(xlabel="step", ylabel="loss", title="Loss (train smoothed, eval dashed)")
    if extra:
        axes[1].set(xlabel="step", ylabel=metric.removeprefix("eval_"), title=metric)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return save_figure(fig, path)


def common_examples(paths: list[Path], names: list[str], n: int = EXAMPLES) -> list[dict]:
    """The first `n` evaluation prompts every run answered: prompt, reference, each run's answer."""
    found = {name: predictions(path) for name, path in zip(names, paths)}
    answered = {name: {row.get("prompt"): row for row in rows} for name, (_, rows) in
                ((k, v) for k, v in found.items() if v is not None)}
    if len(answered) < 2 and len(paths) > 1:
        return []
    first = next(iter(answered.values()), {})
    shared = [p for p in first if p is not None and all(p in rows for rows in answered.values())]
    return [{"prompt": prompt, "reference": first[prompt].get("reference"),
             "answers": {name: rows[prompt].get("prediction") for name, rows in answered.items()}}
            for prompt in shared[:n]]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def render_markdown(summaries: list[RunSummary], metric: str, diff: dict, examples: list[dict],
                    plot: Path) -> str:
    names = [s.name for s in summaries]
    keys = [k for k in SHOWN_METRICS if any(k in s.last for s in summaries)]
    keys += sorted({k for s in summaries for k in s.last if k.startswith("eval_") and k not in keys
                    and not k.startswith("eval_rewards")})
    lines = [f"# Comparison of {len(summaries)} runs", "", (f"Ranked by the best {metric} "
             f"({'lower' if lower_is_better(metric) else 'higher'} is better)."), "",
             f"| rank | run | best {metric} | at step | " + " | ".join(f"last {k}" for k in keys) + " |",
             "| ---: | --- | ---: | ---: | " + " | ".join("---:" for _ in keys) + " |"]
    for i, s in enumerate(summaries, 1):
        lines.append(f"| {i} | {s.name} | {_fmt(s.best)} | {_fmt(s.best_step)} | "
                     + " | ".join(_fmt(s.last.get(k)) for k in keys) + " |")
    lines += ["", f"![curves]({plot.name})", "", "## Config differences", ""]
    if diff:
        lines += ["| key | " + " | ".join(names) + " |", "| --- | " + " | ".join("---" for _ in names) + " |"]
        lines += [f"| {key} | " + " | ".join(f"`{values.get(n)}`" for n in names) + " |" for key, values in diff.items()]
    else:
        lines.append("The runs' configs are the same (output_dir aside).")
    lines += ["", "## Curve diagnosis", ""]
    for s in summaries:
        lines.append(f"### {s.name}")
        lines += [f"- **[{f.severity}] {f.title}**: {f.detail}" for f in s.findings] + [""]
    if examples:
        lines += ["## The same examples, answered by each run", ""]
        for i, ex in enumerate(examples, 1):
            lines += [f"### Example {i}", "", "Prompt:", "", "```", str(ex["prompt"])[-1500:], "```", "",
                      f"Reference: {ex['reference']}", ""]
            lines += [f"- **{name}**: {answer}" for name, answer in ex["answers"].items()] + [""]
    return "\n".join(lines) + "\n"


def compare_runs(paths: list[Path], out_dir: Path, metric: str = "eval_loss") -> tuple[list[RunSummary], Path]:
    """Write curves.png, compare.md and compare.json into `out_dir`; the runs best first."""
    paths = [Path(p) for p in paths]
    summaries = ranked(summarize_runs(paths, metric), metric)
    order = [s.path for s in summaries]
    names = [s.name for s in summaries]
    plot = plot_runs(order, names, metric, Path(out_dir) / "curves.png")
    diff = config_diff({s.name: read_config(s.path) for s in summaries})
    examples = common_examples(order, names)
    report = out_dir / "compare.md"
    write_text_atomic(report, render_markdown(summaries, metric, diff, examples, plot))
    write_json_atomic(out_dir / "compare.json", {
        "metric": metric, "lower_is_better": lower_is_better(metric),
        "runs": [{"name": s.name, "path": str(s.path), "best": s.best, "best_step": s.best_step, "last": s.last,
                  "findings": [asdict(f) for f in s.findings]} for s in summaries],
        "config_diff": diff, "examples": examples, "plot": plot.name})
    return summaries, report


def format_ranking(summaries: list[RunSummary], metric: str, report: Path) -> str:
    """The terminal's view: one line per run, best first, and where the report is."""
    width = max(len(s.name) for s in summaries)
    lines = [(f"{len(summaries)} runs ranked by {metric} ({'lower' if lower_is_better(metric) else 'higher'} is "
             f"better); report in {report}")]
    for i, s in enumerate(summaries, 1):
        problems = [f.title for f in s.findings if f.severity != "info"]
        lines.append(f"  {i}. {s.name:<{width}}  {metric} {_fmt(s.best)}"
                     + (f" (step {_fmt(s.best_step)})" if s.best_step is not None else "")
                     + (f"  [{'; '.join(problems)}]" if problems else ""))
    return "\n".join(lines)
