"""The run log: `RUN_DIR/trainer_log.jsonl`, read, smoothed and drawn in one place.

The training loop writes one JSON object per logged step (training rows with `loss`,
evaluation rows with `eval_loss`); the loop's plot (`training_loss.png`, redrawn from the
log so a resumed run's plot covers the whole run) and `tunelab report` both read it here
and smooth and draw the loss with the same functions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tunelab.io import atomic_path

LOG_NAME = "trainer_log.jsonl"
PLOT_NAME = "training_loss.png"

# exp(709.78) is the largest finite double; beyond it perplexity is reported as inf.
_MAX_EXP_ARG = math.log(1.7976931348623157e308)


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy in nats); inf instead of an OverflowError, NaN stays NaN."""
    loss = float(loss)
    if math.isnan(loss):
        return math.nan
    return math.exp(loss) if loss < _MAX_EXP_ARG else math.inf


class LogRows(list):
    """The rows of a log, in file order, with the number of unreadable lines skipped."""

    skipped: int = 0


def read_log(path: Path) -> LogRows:
    """Every row of the log; a line cut short by a crash (or not an object) is skipped and counted."""
    rows = LogRows()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            rows.skipped += 1
    return rows


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint: they will be logged again."""
    if not path.exists():
        return
    kept = [r for r in read_log(path) if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


# --- smoothing -----------------------------------------------------------------------

def window_size(n: int) -> int:
    """Smoothing window: ~5 % of the points, at least 3 (noise) and at most 50 (lag)."""
    return int(min(50, max(3, n // 20)))


def ema(values, window: int) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): the first points are
    not pulled towards values[0]."""
    alpha, out, acc, norm = 2.0 / (window + 1), [], 0.0, 0.0
    for v in values:
        acc, norm = (1 - alpha) * acc + alpha * float(v), (1 - alpha) * norm + alpha
        out.append(acc / norm)
    return out


# --- drawing -------------------------------------------------------------------------

def new_figure(columns: int = 1):
    """Figure + Agg canvas, not pyplot: no global state, no display needed, thread-safe."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8 if columns == 1 else 14, 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, columns, i + 1) for i in range(columns)]


def save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def draw_loss(ax, steps, loss, eval_steps, eval_loss) -> None:
    """Train loss (raw and smoothed) and eval loss against the step; non-finite points left out."""
    train = [(s, v) for s, v in zip(steps, loss) if math.isfinite(v)]
    if train:
        xs, ys = zip(*train)
        ax.plot(xs, ys, color="tab:blue", alpha=0.25, linewidth=1, label="train loss")
        ax.plot(xs, ema(ys, window_size(len(ys))), color="tab:blue", label="train loss (smoothed)")
    evals = [(s, v) for s, v in zip(eval_steps, eval_loss) if math.isfinite(v)]
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", label="eval loss")
    ax.set(xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)


def plot_run(run_dir: Path) -> Path | None:
    """RUN_DIR/training_loss.png from the log: the loss, and for preference stages the rewards."""
    path = Path(run_dir) / LOG_NAME
    if not path.exists():
        return None
    rows = read_log(path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    # Preference stages add a second panel: the rewards say more than the loss does.
    prefs = any("rewards/chosen" in r for r in rows)
    fig, axes = new_figure(2 if prefs else 1)
    draw_loss(axes[0], [r["step"] for r in train], [r["loss"] for r in train],
              [r["step"] for r in evals], [r["eval_loss"] for r in evals])
    axes[0].set_title(Path(run_dir).name)
    axes[0].legend()
    if prefs:
        _draw_rewards(axes[1], rows)
    return save_figure(fig, Path(run_dir) / PLOT_NAME)


def _draw_rewards(ax, rows: list[dict]) -> None:
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
