"""Where training metrics go: a JSONL log, the trackers of `report_to`, a loss plot, a progress bar.

`trainer_log.jsonl` is the source of truth (one object per logged step, training rows
with `loss`, evaluation rows with `eval_loss`); reading, smoothing and plotting it live in
`runlog.py`, shared with `tunelab report`, so a resumed run's plot covers the whole run. The
trackers (TensorBoard, W&B, SwanLab, MLflow, trackio: trackers.py) get copies of every row,
the config, the plot and the task-evaluation tables.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tunelab.train.runlog import LOG_NAME, plot_run, read_log, truncate_log

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
            truncate_log(self.log_path, start_step)
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
        image = plot_run(self.run_dir) if self.plot else None
        for backend in self.backends:
            if image is not None:
                backend.log_image("training_loss", image, self.step)
            backend.close()


def _short(v):
    return f"{v:.3g}" if isinstance(v, float) else v


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
