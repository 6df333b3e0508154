"""End to end on the real embedded model: the README's quickstart config, shortened."""

from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.train.loop import train
from tunelab.train.runlog import read_log

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_config_lowers_validation_loss_of_smollm2(tmp_path):
    cfg = load_config(REPO / "examples" / "quickstart.yaml",
                      [f"output_dir={tmp_path / 'run'}", "max_steps=8", "eval_steps=8", "val_size=8",
                       "save_steps=100", "disable_tqdm=true", "report_to=jsonl", "device=cpu"])
    train(cfg)
    evals = [r for r in read_log(tmp_path / "run" / "trainer_log.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 8]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"] * 0.9  # untuned vs tuned, same held-out chats
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
