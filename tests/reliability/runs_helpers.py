"""Shared pieces of the reliability suite: a tiny-model training config and log readers.

Not named conftest.py: the other test folders import `conftest` (the top-level one) by name."""

from pathlib import Path

from tunelab.config import load_config
from tunelab.train.runlog import read_log

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "data" / "quickstart.jsonl"


def config_maker(tmp_path, tiny_model_dir):
    """`run_config(out, **overrides)`: a few-step LoRA run of the tiny random model on CPU."""
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(QUICKSTART.read_text(encoding="utf-8").splitlines()[:16]) + "\n", encoding="utf-8")

    def make(out="run", **overrides):
        values = dict(
            model_name_or_path=str(tiny_model_dir), dataset=[str(data)], cutoff_len=128, max_steps=8,
            per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=5e-3, lora_rank=4,
            lora_alpha=8, lora_dropout=0.1, logging_steps=1, save_steps=4, output_dir=str(tmp_path / out),
            report_to=["jsonl"], disable_tqdm=True, device="cpu", val_size=4, eval_strategy="steps", eval_steps=4,
        )
        values.update(overrides)
        return load_config(None, values)

    return make


def train_rows(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_log(Path(run_dir) / "trainer_log.jsonl") if "loss" in r]


def eval_steps(run_dir) -> list[int]:
    return [r["step"] for r in read_log(Path(run_dir) / "trainer_log.jsonl") if "eval_loss" in r]
