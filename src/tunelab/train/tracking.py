"""Where training metrics go: a JSONL log, TensorBoard, a progress bar.

`trainer_log.jsonl` is the source of truth (one object per logged step, training rows
with `loss`, evaluation rows with `eval_loss`); reading, smoothing and plotting it live in
`runlog.py`, shared with `tunelab report`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tunelab.train.runlog import LOG_NAME, truncate_log


class Tracker:
    def __init__(self, run_dir: Path, report_to: list[str], total_steps: int, start_step: int = 0,
                 disable_progress: bool = False):
        self.run_dir = Path(run_dir)
        self.log_path = self.run_dir / LOG_NAME
        self.writer = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # Resuming: TensorBoard drops the events the interrupted run wrote after the checkpoint
            # (they are logged again), so no step appears twice.
            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None)
        if start_step == 0:
            self.log_path.unlink(missing_ok=True)
        else:
            truncate_log(self.log_path, start_step)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                        disable=disable_progress, dynamic_ncols=True, file=sys.stderr)

    def log(self, row: dict) -> None:
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            prefix = "eval" if any(k.startswith("eval_") for k in row) else "train"
            for key, value in row.items():
                if key in ("step", "epoch") or not isinstance(value, (int, float)):
                    continue
                name = key.replace("eval_", "eval/") if prefix == "eval" else f"train/{key}"
                self.writer.add_scalar(name, value, row["step"])
            self.writer.flush()
        shown = {k: row[k] for k in ("loss", "eval_loss", "tokens_per_second", "learning_rate") if k in row}
        if shown:
            self.bar.set_postfix({k.replace("tokens_per_second", "tok/s"): _short(v) for k, v in shown.items()})
        if "eval_loss" in row:
            extra = {k: row[k] for k in ("eval_perplexity", "eval_rewards/accuracies") if k in row}
            self.bar.write(f"step {row['step']}: eval_loss {row['eval_loss']:.4f}"
                           + "".join(f", {k.removeprefix('eval_')} {v:.3f}" for k, v in extra.items()))

    def note(self, message: str) -> None:
        """A line for the run log (stderr), printed above the progress bar."""
        self.bar.write(message, file=sys.stderr)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _short(v):
    return f"{v:.3g}" if isinstance(v, float) else v
