"""Task metrics during training: logged, selectable as the best-model metric, wired through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.train import loop
from tunelab.train.runlog import read_log

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "data" / "quickstart.jsonl"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only spin on a shared CPU


def _args(tmp_path, model_dir, **overrides):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(QUICKSTART.read_text(encoding="utf-8").splitlines()[:16]) + "\n", encoding="utf-8")
    values = dict(model_name_or_path=model_dir, dataset=data, cutoff_len=128, max_steps=4,
                  per_device_train_batch_size=2, learning_rate=5e-3, lora_rank=4, logging_steps=1, save_steps=100,
                  output_dir=tmp_path / "run", report_to="jsonl", disable_tqdm="true", device="cpu", val_size=4,
                  eval_strategy="steps", eval_steps=2)
    values.update(overrides)
    return [f"{k}={v}" for k, v in values.items()]


def test_cli_train_logs_task_metrics_and_keeps_the_predictions(tmp_path, tiny_model_dir):
    args = _args(tmp_path, tiny_model_dir, eval_task="generic", eval_metrics="bleu,em",
                 eval_generate_samples=3, eval_max_new_tokens=6, metric_for_best_model="bleu4",
                 load_best_model_at_end="true")
    assert main(["train", *args]) == 0
    evals = [r for r in read_log(tmp_path / "run" / "trainer_log.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for row in evals:
        assert 0 <= row["eval_bleu4"] <= 100 and "eval_exact_match" in row and "eval_samples" not in row
    rows = [json.loads(line) for line in (tmp_path / "run" / "task_eval" / "step-4.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("prediction" in r and "reference" in r for r in rows)
    # The report tables the task metric and breaks down the predictions of its best step.
    assert main(["report", str(tmp_path / "run")]) == 0
    best = max(evals, key=lambda r: r["eval_bleu4"])["step"]  # the first best: ties keep the earlier step
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "| bleu4 |" in report and f"## Task evaluation at step {best}" in report and "Worst all rows" in report


def test_task_metric_selects_the_best_checkpoint_higher_is_better(tmp_path, tiny_model_dir):
    from tunelab.config import load_config

    scores = iter([10.0, 40.0, 30.0, 20.0, 25.0])
    callback = lambda model, tokenizer, step: {"slot_f1": next(scores)}  # noqa: E731
    cfg = load_config(None, dict(a.split("=", 1) for a in _args(
        tmp_path, tiny_model_dir, max_steps=40, eval_on_start="false", metric_for_best_model="slot_f1",
        load_best_model_at_end="true", early_stopping_patience=2, save_total_limit=1)))
    result = loop.train(cfg, eval_callbacks=[callback])
    assert result.stopped_early and result.global_step == 8  # 40 at step 4, then two evals without gain
    assert result.best_metric == 40.0
    best = load_file(Path(cfg.output_dir) / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    final = load_file(Path(cfg.output_dir) / "adapter_model.safetensors")
    assert all(torch.equal(best[k], final[k]) for k in best)


def test_eval_task_without_a_callback_is_a_clear_error(tmp_path, tiny_model_dir):
    from tunelab.config import load_config

    cfg = load_config(None, dict(a.split("=", 1) for a in _args(tmp_path, tiny_model_dir, eval_task="hotel")))
    with pytest.raises(TunelabError, match="eval_callbacks"):
        loop.train(cfg)


def test_unknown_task_metric_and_task_are_refused(tmp_path, tiny_model_dir, capsys):
    assert main(["train", *_args(tmp_path, tiny_model_dir, eval_task="hotle")]) == 2
    assert "did you mean --task hotel" in capsys.readouterr().err
    assert main(["train", *_args(tmp_path, tiny_model_dir, eval_task="generic", eval_metrics="slots")]) == 2
    assert "choose from" in capsys.readouterr().err


def test_the_train_stage_still_never_imports_evaluate():
    code = ("import sys, tunelab.train.loop, tunelab.train.cli, tunelab.train.objectives.preference; "
            "print(sorted(m for m in sys.modules if m.startswith('tunelab.evaluate')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO / "src"), "PATH": ""}).stdout
    assert out.strip() == "[]"


def test_generation_switches_a_padding_free_model_to_sdpa_and_back(qwen2_tokenizer):
    from conftest import tiny_llama
    from tunelab.evaluate.in_training import plain_attention
    from tunelab.model.generate import generate_batch
    from tunelab.train.fast.varlen import ATTN_NAME, use_varlen_attention

    model = tiny_llama(qwen2_tokenizer)
    use_varlen_attention(model)
    with plain_attention(model):
        assert model.config._attn_implementation == "sdpa"
        (generated,) = generate_batch(model, qwen2_tokenizer, [[1, 2, 3]], progress=False)
    assert generated.completion_tokens > 0
    assert model.config._attn_implementation == ATTN_NAME


def test_preference_stages_generate_on_eval_task_dataset(hotel_dir, qwen2_tokenizer):
    from tunelab.config import load_config
    from tunelab.evaluate.in_training import TaskMetrics

    common = dict(stage="dpo", dataset="pairs.jsonl", eval_task="hotel", eval_strategy="steps", val_size=0.1,
                  eval_generate_samples=5, template="hotel")
    with pytest.raises(TunelabError, match="eval_task_dataset"):
        TaskMetrics(load_config(None, common))
    metrics = TaskMetrics(load_config(None, common | {"eval_task_dataset": str(hotel_dir / "test.jsonl")}))
    metrics._prepare(qwen2_tokenizer)
    assert len(metrics.samples) == 5 and all(s.source.startswith(str(hotel_dir)) for s in metrics.samples)


def test_generation_during_training_runs_uncompiled_layers_and_restores_them():
    """A KV cache changes shape every token: compiled layers would recompile until dynamo gives up
    (seen on an H100: `recompile_limit` hit at the first in-training evaluation)."""
    import sys

    sys.path.insert(0, str(REPO / "tests" / "train"))
    from test_fast_loss import _model

    from tunelab.evaluate.in_training import plain_attention
    from tunelab.train.fast import compile_decoder_layers

    model = _model("qwen2")
    compile_decoder_layers(model, backend="eager")
    layers = model.get_base_model().get_decoder().layers
    compiled = [layer._compiled_call_impl for layer in layers]
    assert all(c is not None for c in compiled)
    with plain_attention(model):
        assert all(layer._compiled_call_impl is None for layer in layers)
    assert [layer._compiled_call_impl for layer in layers] == compiled
