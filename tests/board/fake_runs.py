"""Run folders as `tunelab train` leaves them, written directly (no training): the board and the
comparison only read files."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import yaml


def fake_run(folder: Path, *, lr: float = 1e-4, steps: int = 12, start: float = 3.0, rate: float = 0.1,
             eval_every: int = 4, finished: bool = True, predictions: list[tuple[str, str, str]] | None = None,
             extra: dict | None = None, age: float = 0.0) -> Path:
    """A run whose loss falls as start * exp(-rate * step); eval rows every `eval_every` steps.
    `predictions`: (prompt, reference, prediction) rows in eval/predictions.jsonl.
    `age`: seconds since the log was last written (an old unfinished run is 'stopped')."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_name_or_path": "smollm2-135m-instruct", "learning_rate": lr, "lora_rank": 8, "max_steps": steps,
              "output_dir": str(folder), "seed": 42, **(extra or {})}
    (folder / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (folder / ".tunelab-run").write_text("a tunelab run folder\n", encoding="utf-8")
    rows = []
    for step in range(1, steps + 1):
        rows.append({"step": step, "epoch": step / steps, "loss": start * math.exp(-rate * step),
                     "learning_rate": lr, "grad_norm": 1.0, "tokens_per_second": 100.0})
        if step % eval_every == 0:
            loss = start * math.exp(-rate * step) + 0.1
            rows.append({"step": step, "epoch": step / steps, "eval_loss": loss, "eval_perplexity": math.exp(loss)})
    log = folder / "trainer_log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if predictions:
        (folder / "eval").mkdir(exist_ok=True)
        (folder / "eval" / "predictions.jsonl").write_text("".join(
            json.dumps({"id": i, "prompt": p, "reference": r, "prediction": a}) + "\n"
            for i, (p, r, a) in enumerate(predictions)), encoding="utf-8")
    if age:
        old = time.time() - age
        os.utime(log, (old, old))
    if finished:
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


REPO = Path(__file__).resolve().parents[2]


def tiny_config_values(model_dir: Path, data_dir: Path, out: Path, **overrides) -> dict:
    """A config that trains the tiny random model in a few seconds on a CPU."""
    data = data_dir / "train.jsonl"
    lines = (REPO / "examples" / "data" / "quickstart.jsonl").read_text(encoding="utf-8").splitlines(True)[:12]
    data.write_text("".join(lines), encoding="utf-8")
    values = {"model_name_or_path": str(model_dir), "dataset": [str(data)], "cutoff_len": 96, "max_steps": 2,
              "per_device_train_batch_size": 2, "lora_rank": 4, "lora_alpha": 8, "logging_steps": 1, "val_size": 2,
              "eval_strategy": "steps", "eval_steps": 2, "save_steps": 100, "report_to": ["jsonl"],
              "disable_tqdm": True, "device": "cpu", "output_dir": str(out)}
    return {**values, **overrides}


def tiny_trained_run(model_dir: Path, data_dir: Path, out: Path) -> Path:
    """A real finished LoRA run of the tiny model (for chat and data preview)."""
    import torch

    from tunelab.config import load_config
    from tunelab.train.loop import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(None, tiny_config_values(model_dir, data_dir, out)))
    finally:
        torch.set_num_threads(threads)
    return out
