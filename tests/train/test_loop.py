"""The training recipe end to end on a tiny model: outputs, resume, early stopping, errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import interrupted_after_step
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.train import loop
from tunelab.train.runlog import read_log

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "data" / "quickstart.jsonl"


def small_dataset(tmp_path: Path, n: int = 16) -> Path:
    lines = QUICKSTART.read_text(encoding="utf-8").splitlines()[:n]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def config(tmp_path, model_dir, out="run", **overrides):
    values = dict(
        model_name_or_path=str(model_dir), dataset=[str(small_dataset(tmp_path))], cutoff_len=128,
        max_steps=8, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=5e-3,
        lora_rank=4, lora_alpha=8, lora_dropout=0.1, logging_steps=1, save_steps=4, output_dir=str(tmp_path / out),
        report_to=["jsonl"], disable_tqdm=True, device="cpu", val_size=4, eval_strategy="steps", eval_steps=4,
    )
    values.update(overrides)
    return load_config(None, values)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_log(run_dir / "trainer_log.jsonl") if "loss" in r]


def test_lora_run_writes_adapter_logs_plot_and_loss_falls(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir, max_steps=12, report_to=["tensorboard", "jsonl"], learning_rate=3e-2,
                 lora_alpha=16, lora_dropout=0.0)
    result = loop.train(cfg)
    run = Path(cfg.output_dir)
    for name in ("adapter_model.safetensors", "adapter_config.json", "config.yaml", "trainer_log.jsonl",
                 "training_loss.png", "tokenizer_config.json"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").iterdir())
    assert result.global_step == 12
    history = losses(run)
    assert len(history) == 12
    assert history[-1][1] < history[0][1] - 0.2  # a random model: loss starts near ln(vocab) = 11.9
    evals = [r for r in read_log(run / "trainer_log.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 12]  # step 0: the untuned model
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert all(abs(r["eval_perplexity"] - torch.tensor(r["eval_loss"]).exp().item()) < 1e-3 * r["eval_perplexity"]
               for r in evals)
    # The saved adapter loads with PEFT and changes the model's output.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, run).eval()
    assert not torch.allclose(tuned(ids).logits, before)


def test_run_clock_counts_a_nested_part_once(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    clock = loop.RunClock()
    now[0] += 5
    clock.add("set-up", 5)
    with clock.part("evaluation"):
        now[0] += 3
        with clock.part("checkpoints"):  # the best model's checkpoint, saved during an evaluation
            now[0] += 2
    clock.add("first step", 40)
    clock.add("steps", 10)
    assert clock.parts == {"set-up": 5, "evaluation": 3, "checkpoints": 2, "first step": 40, "steps": 10}
    assert clock.describe(steps=8) == ("10 s (set-up 5 s, first step 40 s, 7 more steps 10 s, evaluation 3 s, "
                                       "checkpoints 2 s)")


def test_closing_line_says_where_the_time_went(tmp_path, tiny_model_dir, capsys):
    loop.train(config(tmp_path, tiny_model_dir, max_steps=4))
    done = [line for line in capsys.readouterr().err.splitlines() if line.startswith("done: 4 steps in ")]
    assert len(done) == 1
    for part in ("set-up", "first step", "3 more steps", "evaluation", "checkpoints", "final save"):
        assert f"{part} " in done[0], part


def test_full_finetuning_saves_full_weights_and_learns(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir, finetuning_type="full", learning_rate=1e-2, max_steps=10,
                 eval_strategy="no", val_size=0, save_steps=100)
    loop.train(cfg)
    run = Path(cfg.output_dir)
    assert (run / "model.safetensors").exists() and (run / "config.json").exists()
    history = losses(run)
    assert history[-1][1] < history[0][1] - 2.0


def test_interrupted_then_resumed_run_logs_the_same_losses(tmp_path, tiny_model_dir, monkeypatch):
    straight = config(tmp_path, tiny_model_dir, out="straight")
    loop.train(straight)

    interrupted = config(tmp_path, tiny_model_dir, out="interrupted")
    with interrupted_after_step(monkeypatch, 5):
        loop.train(interrupted)
    assert (Path(interrupted.output_dir) / "checkpoints" / "checkpoint-5").is_dir()

    resumed = config(tmp_path, tiny_model_dir, out="interrupted", resume_from_checkpoint="latest")
    loop.train(resumed)
    a, b = losses(Path(straight.output_dir)), losses(Path(interrupted.output_dir))
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    for (_, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6)
    wa = load_file(Path(straight.output_dir) / "adapter_model.safetensors")
    wb = load_file(Path(interrupted.output_dir) / "adapter_model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_early_stopping_and_best_model(tmp_path, tiny_model_dir, monkeypatch):
    eval_losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: (next(eval_losses), {}))
    cfg = config(tmp_path, tiny_model_dir, max_steps=40, eval_steps=2, save_steps=100,
                 early_stopping_patience=2, load_best_model_at_end=True, save_total_limit=1, eval_on_start=False)
    result = loop.train(cfg)
    assert result.stopped_early and result.global_step == 8  # evals at 2, 4 (best), 6, 8 -> stop
    assert result.best_metric == 2.0
    best = load_file(Path(cfg.output_dir) / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    final = load_file(Path(cfg.output_dir) / "adapter_model.safetensors")
    assert all(torch.equal(best[k], final[k]) for k in best)


def test_packing_run_trains(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir, packing=True, max_steps=4, eval_strategy="no", val_size=0)
    assert loop.train(cfg).global_step == 4


def test_cli_train_with_overrides_and_clean_errors(tmp_path, tiny_model_dir, capsys):
    data = small_dataset(tmp_path)
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset: {data}\nmax_steps: 2\n"
                         f"output_dir: {tmp_path / 'cli'}\nreport_to: [jsonl]\ndevice: cpu\ncutoff_len: 128\n")
    assert main(["train", str(yaml_path), "lora_rank=2", "disable_tqdm=true"]) == 0
    saved = (tmp_path / "cli" / "config.yaml").read_text()
    assert "lora_rank: 2" in saved
    # Running again into the same folder is refused with the fix.
    assert main(["train", str(yaml_path), "disable_tqdm=true"]) == 2
    assert "resume_from_checkpoint=latest" in capsys.readouterr().err
    # A missing data file and a missing model: one clean message each, no traceback.
    assert main(["train", str(yaml_path), "dataset=nope.jsonl", "overwrite_output_dir=true"]) == 2
    err = capsys.readouterr().err
    assert "nope.jsonl" in err and "Traceback" not in err
    assert main(["train", str(yaml_path), f"model_name_or_path={tmp_path / 'no-model'}",
                 "overwrite_output_dir=true"]) == 2
    err = capsys.readouterr().err
    assert "no-model" in err and "Traceback" not in err
    # A cutoff smaller than every prompt.
    assert main(["train", str(yaml_path), "cutoff_len=8", "overwrite_output_dir=true"]) == 2
    assert "cutoff_len" in capsys.readouterr().err


def test_ctrl_c_inside_a_step_lands_after_it(tmp_path, tiny_model_dir, monkeypatch):
    """A SIGINT during the optimizer step is held until the step and its counters are done."""
    import os
    import signal

    real_step = loop.optimizer_step
    calls = []

    def step_with_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "optimizer_step", step_with_ctrl_c)
    cfg = config(tmp_path, tiny_model_dir, eval_strategy="no", val_size=0, save_steps=100)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg)
    state = json.loads((Path(cfg.output_dir) / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["batch_in_epoch"] == 3 * cfg.gradient_accumulation_steps
