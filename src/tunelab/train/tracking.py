"""Where training metrics go: a JSONL log, the trackers of `report_to`, a loss plot, a progress bar.

`trainer_log.jsonl` is the source of truth (one object per logged step, training rows
with `loss`, evaluation rows with `eval_loss`); `tunelab report` reads it, and the
plot is redrawn from it, so a resumed run's plot covers the whole run. The trackers
(TensorBoard, W&B, SwanLab, MLflow, trackio: trackers.py) get copies of every row, the
config, the plot and the task-evaluation tables.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

LOG_NAME = "trainer_log.jsonl"
PLOT_NAME = "training_loss.png"
TASK_EVAL_DIR = "task_eval"  # evaluate/in_training.py keeps each evaluation's predictions here as step-N.jsonl


class Tracker:
    def __init__(self, run_dir: Path, report_to: list[str], total_steps: int, start_step: int = 0,
                 disable_progress: bool = False, config: dict | None = None, plot: bool = False):
        from tunelab.train import trackers

        self.run_dir = Path(run_dir)
        self.log_path = self.run_dir / LOG_NAME
        self.plot = plot
        self.step = start_step
        if start_step == 0:
            self.log_path.unlink(missing_ok=True)
        else:
            _truncate_log(self.log_path, start_step)
        self.backends = trackers.start(report_to, self.run_dir, config or {}, start_step)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                        disable=disable_progress, dynamic_ncols=True, file=sys.stderr)

    def log(self, row: dict) -> None:
        from tunelab.train.trackers import scalars

        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.step = row["step"]
        for backend in self.backends:
            backend.log_metrics(scalars(row), row["step"])
        shown = {k: row[k] for k in ("loss", "eval_loss", "tokens_per_second", "learning_rate") if k in row}
        if shown:
            self.bar.set_postfix({k.replace("tokens_per_second", "tok/s"): _short(v) for k, v in shown.items()})
        if "eval_loss" in row:
            extra = {k: row[k] for k in ("eval_perplexity", "eval_rewards/accuracies") if k in row}
            self.bar.write(f"step {row['step']}: eval_loss {row['eval_loss']:.4f}"
                           + "".join(f", {k.removeprefix('eval_')} {v:.3f}" for k, v in extra.items()))
            self._log_task_table(row["step"])

    def _log_task_table(self, step: int) -> None:
        """The task predictions this evaluation wrote (eval_task), as a table for the trackers."""
        path = self.run_dir / TASK_EVAL_DIR / f"step-{step}.jsonl"
        if self.backends and path.is_file():
            rows = read_log(path)
            for backend in self.backends:
                backend.log_table(f"{TASK_EVAL_DIR}/step-{step}", rows, step)

    def note(self, message: str) -> None:
        """A line for the run log (stderr), printed above the progress bar."""
        self.bar.write(message, file=sys.stderr)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def close(self) -> None:
        """Draw the loss plot (if asked), hand it to the trackers and close them."""
        self.bar.close()
        image = plot_loss(self.run_dir) if self.plot else None
        for backend in self.backends:
            if image is not None:
                backend.log_image("training_loss", image, self.step)
            backend.close()


def _short(v):
    return f"{v:.3g}" if isinstance(v, float) else v


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint: they will be logged again."""
    if not path.exists():
        return
    rows = read_log(path)
    kept = [r for r in rows if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def read_log(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
    return rows


def final_metrics(rows: list[dict]) -> dict:
    """The numbers a model card shows: steps, the last training loss, the last evaluation's metrics."""
    out: dict = {}
    if rows:
        out["global_step"] = max(r.get("step", 0) for r in rows)
    last_train = next((r for r in reversed(rows) if "loss" in r), None)
    last_eval = next((r for r in reversed(rows) if "eval_loss" in r), None)
    if last_train:
        out["train_loss"] = last_train["loss"]
    if last_eval:
        out |= {k: v for k, v in last_eval.items() if k.startswith("eval_") and isinstance(v, (int, float))}
    return out


def plot_loss(run_dir: Path) -> Path | None:
    """Draw training (and evaluation) loss against steps from the JSONL log."""
    path = Path(run_dir) / LOG_NAME
    if not path.exists():
        return None
    rows = read_log(path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Preference stages add a second panel: the rewards say more than the loss does.
    prefs = any("rewards/chosen" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if prefs else 1, figsize=(14 if prefs else 8, 4.5), dpi=110, squeeze=False)
    ax = axes[0][0]
    if prefs:
        _plot_rewards(axes[0][1], rows)
    if train:
        xs, ys = zip(*train)
        ax.plot(xs, ys, color="#9ab", linewidth=1, label="train loss")
        if len(ys) >= 20:  # fewer points: the raw curve is already readable
            ax.plot(xs, _ema(ys), color="#1f5f9f", linewidth=2, label="train loss (smoothed)")
    if evals:
        xs, ys = zip(*evals)
        ax.plot(xs, ys, "o-", color="#d2691e", linewidth=2, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{Path(run_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / PLOT_NAME
    tmp = out.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out


def _plot_rewards(ax, rows: list[dict]) -> None:
    """Chosen / rejected rewards and their margin; reward accuracy (train and eval) on a 0-1 axis."""
    colors = {"rewards/chosen": "#2e8b57", "rewards/rejected": "#b22222", "rewards/margins": "#1f5f9f"}
    for key, color in colors.items():
        points = [(r["step"], r[key]) for r in rows if key in r and "loss" in r]
        if points:
            ax.plot(*zip(*points), color=color, linewidth=1.5, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    accuracy = ax.twinx()
    for key, style, color in (("rewards/accuracies", "--", "#555"), ("eval_rewards/accuracies", "o-", "#d2691e")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            accuracy.plot(*zip(*points), style, color=color, linewidth=1.2, label=key)
    accuracy.set_ylim(0, 1.05)
    accuracy.set_ylabel("reward accuracy")
    more_handles, more_labels = accuracy.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, fontsize=8, loc="upper left")


def _ema(values) -> list[float]:
    """Bias-corrected exponential moving average over about a tenth of the points.

    The window scales with the number of logged points so a short run is not drawn as a
    lagging curve; bias correction keeps the first points from being pulled to values[0].
    """
    alpha = 2 / (max(3, len(values) // 10) + 1)
    out, acc = [], 0.0
    for n, v in enumerate(values, start=1):
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc / (1 - (1 - alpha) ** n))
    return out
