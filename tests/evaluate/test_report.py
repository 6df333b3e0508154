"""`tunelab report`: each diagnosis on a synthetic trainer_log.jsonl, and the files written."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tunelab.errors import TunelabError
from tunelab.evaluate.report import diagnose, format_findings, read_curves, run_report

STEPS = np.arange(5, 305, 5)  # 60 logged steps
EVAL_STEPS = np.arange(50, 350, 50)
BAD = {"diverged", "loss_spikes", "overfitting", "memorizing", "not_converged"}


def write_log(run_dir, loss, eval_loss=None, steps=STEPS, eval_steps=EVAL_STEPS, lr=2e-4, extra_lines=()):
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (step, value) in enumerate(zip(steps, loss)):
        rate = lr * 0.5 * (1 + math.cos(math.pi * step / steps[-1]))
        row = {"step": int(step), "epoch": step / 100, "loss": float(value), "learning_rate": rate,
               "grad_norm": 1.0, "tokens_per_second": 1000.0}
        rows.append(row if i else {"step": int(step), "loss": float(value)})  # early rows miss keys
    if eval_loss is not None:
        rows += [{"step": int(s), "epoch": s / 100, "eval_loss": float(v), "eval_perplexity": math.exp(v)}
                 for s, v in zip(eval_steps, eval_loss)]
    rows.sort(key=lambda r: r["step"])
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    (run_dir / "trainer_log.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def noise(scale=0.02, seed=0, n=len(STEPS)):
    return np.random.default_rng(seed).normal(0, scale, n)


def healthy_loss():
    return 0.6 + 1.8 * np.exp(-STEPS / 40) + noise()


def healthy_eval():
    return 0.7 + 1.8 * np.exp(-EVAL_STEPS / 40)


def codes(run_dir) -> dict[str, object]:
    return {f.code: f for f in diagnose(read_curves(run_dir / "trainer_log.jsonl"))}


def test_healthy_converged_run_reports_no_problem(tmp_path):
    found = codes(write_log(tmp_path / "run", healthy_loss(), healthy_eval()))
    assert not BAD & found.keys()
    assert "healthy" in found and found["healthy"].severity == "info"


def test_noisy_healthy_runs_stay_quiet(tmp_path):
    for seed in range(5):  # small-batch noise must not look like spikes or a trend
        loss = 0.6 + 1.8 * np.exp(-STEPS / 40) + noise(0.06, seed)
        found = codes(write_log(tmp_path / f"run{seed}", loss, healthy_eval()))
        assert not BAD & found.keys(), (seed, found.keys())


def test_per_step_logging_with_small_batch_noise_stays_quiet(tmp_path):
    steps = np.arange(1, 1001)  # logged every step: each loss is one small batch, +-30 % is normal
    loss = (0.6 + 1.8 * np.exp(-steps / 100)) * np.random.default_rng(1).lognormal(0, 0.3, len(steps))
    found = codes(write_log(tmp_path / "run", loss, steps=steps))
    assert not BAD & found.keys(), found.keys()
    spikes = [300, 600, 900]
    loss[spikes] = 8 * (0.6 + 1.8 * np.exp(-steps[spikes] / 100))  # a blow-up stands out even in that noise
    assert codes(write_log(tmp_path / "spiky", loss, steps=steps))["loss_spikes"].evidence["steps"] == [301, 601, 901]


def test_loss_still_falling_is_not_converged(tmp_path):
    loss = 0.5 + 2.0 * np.exp(-STEPS / 300) + noise(0.01)
    found = codes(write_log(tmp_path / "run", loss, 0.6 + 2.0 * np.exp(-EVAL_STEPS / 300)))
    finding = found["not_converged"]
    assert finding.severity == "warning" and "healthy" not in found
    assert 0.08 < finding.evidence["relative_drop"] < 0.15  # 1.40 -> 1.24 over steps 245-300
    assert "eval loss is also still at its best" in finding.detail


def test_loss_falling_at_an_even_pace_has_not_flattened(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # no step keys at all: rows are taken in order; the loss falls 0.01 per row throughout
    (run / "trainer_log.jsonl").write_text("\n".join(json.dumps({"loss": 2.0 - 0.01 * i}) for i in range(30)))
    finding = codes(run)["not_converged"]
    assert finding.evidence["relative_drop"] < 0.05  # only ~3 % of its value ...
    assert finding.evidence["share_of_improvement"] > 0.15  # ... but a fifth of the run's progress
    assert finding.evidence["tail_start_step"] == 25  # steps 1..30 in row order


def test_eval_rising_while_train_falls_is_overfitting_from_the_eval_minimum(tmp_path):
    eval_loss = [1.2, 0.9, 0.85, 0.9, 0.97, 1.05]  # minimum at step 150
    found = codes(write_log(tmp_path / "run", healthy_loss(), eval_loss))
    finding = found["overfitting"]
    assert finding.evidence["best_step"] == 150 and finding.evidence["last_eval_loss"] == 1.05
    assert "step 150" in finding.title and "0.85" in finding.detail and "+23.5%" in finding.detail


def test_eval_noise_after_the_minimum_is_not_overfitting(tmp_path):
    eval_loss = [1.2, 0.9, 0.85, 0.855, 0.852, 0.86]  # +1.2 %: within noise
    assert "overfitting" not in codes(write_log(tmp_path / "run", healthy_loss(), eval_loss))


def test_loss_near_zero_early_is_memorizing(tmp_path):
    loss = 2.0 * np.exp(-STEPS / 10) + 0.001
    found = codes(write_log(tmp_path / "run", loss, [1.1, 1.2, 1.3, 1.4, 1.5, 1.6]))
    finding = found["memorizing"]
    assert finding.evidence["step"] <= 60 and "fewer epochs" in finding.advice
    assert "learned the training answers" in finding.detail
    assert "not_converged" not in found  # a loss near 0 is not "still falling"


def test_loss_spikes_point_at_the_learning_rate(tmp_path):
    loss = healthy_loss()
    loss[[30, 40, 50]] *= 3
    found = codes(write_log(tmp_path / "run", loss, healthy_eval()))
    finding = found["loss_spikes"]
    assert finding.severity == "warning" and finding.evidence["steps"] == [155, 205, 255]
    assert "learning rate" in finding.detail and "learning_rate" in finding.advice
    assert "healthy" not in found


def test_nan_loss_is_divergence(tmp_path):
    loss = healthy_loss()
    loss[40:] = np.nan
    found = codes(write_log(tmp_path / "run", loss, healthy_eval()))
    finding = found["diverged"]
    assert finding.severity == "critical" and finding.evidence["step"] == 205
    assert finding.evidence["non_finite"] == 20 and "learning rate" in finding.detail


def test_rising_loss_is_divergence(tmp_path):
    loss = 1.0 + STEPS / 150 + noise()
    found = codes(write_log(tmp_path / "run", loss))
    assert found["diverged"].severity == "critical" and "ended higher" in found["diverged"].title


def test_report_files_and_terminal_text(tmp_path):
    eval_loss = [1.2, 0.9, 0.85, 0.9, 0.97, 1.05]
    run = write_log(tmp_path / "run", healthy_loss(), eval_loss,
                    extra_lines=[json.dumps({"step": 300, "loss": 0.61}), '{"step": 305, "lo'])  # resume + cut line
    result = run_report(run)
    assert result.out_dir == run / "report"
    names = sorted(p.name for p in result.out_dir.iterdir())
    assert names == ["learning_rate.png", "loss.png", "perplexity.png", "report.json", "report.md"]
    for plot in result.plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    saved = json.loads((result.out_dir / "report.json").read_text())
    assert [f["code"] for f in saved["findings"]] == [f.code for f in result.findings]
    assert saved["summary"]["skipped_lines"] == 1 and saved["summary"]["last_loss"] == 0.61
    assert saved["summary"]["best_eval_step"] == 150
    text = format_findings(result)
    assert "Over-fitting since step 150" in text and "1 unreadable line" in text
    assert "Over-fitting since step 150" in (result.out_dir / "report.md").read_text()


def test_a_run_without_a_log_is_a_clear_error(tmp_path):
    run = write_log(tmp_path / "run", healthy_loss())
    (run / "checkpoint-100").mkdir()
    with pytest.raises(TunelabError, match="no trainer_log.jsonl") as caught:
        run_report(run / "checkpoint-100")
    assert f"tunelab report {run}" in caught.value.fix
    with pytest.raises(TunelabError, match="does not exist"):
        run_report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "trainer_log.jsonl").write_text("\n")
    with pytest.raises(TunelabError, match="no training or evaluation rows"):
        run_report(tmp_path / "empty")


def test_task_metrics_in_the_log_get_a_table_a_plot_and_a_terminal_line(tmp_path):
    run = write_log(tmp_path / "run", healthy_loss(), healthy_eval())
    log = run / "trainer_log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    f1 = iter([10.0, 50.0, 70.0, 65.0, 60.0, 62.0])
    for row in rows:
        if "eval_loss" in row:
            row["eval_slot_f1"] = next(f1)
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = run_report(run)
    assert result.eval_metrics["slot_f1"] == {"first": 10.0, "best": 70.0, "best_step": 150.0, "last": 62.0}
    assert (result.out_dir / "eval_metrics.png").stat().st_size > 0
    assert "| slot_f1 | 10 | 70 | 150 | 62 |" in (result.out_dir / "report.md").read_text()
    assert json.loads((result.out_dir / "report.json").read_text())["eval_metrics"]["slot_f1"]["best"] == 70.0
    assert "slot_f1: 10 -> 62 (best 70 at step 150)" in format_findings(result)


def test_a_run_too_short_for_trends_still_says_what_it_shows(tmp_path):
    # The quickstart logs 6 losses: no trend can be read, but the numbers can.
    run = write_log(tmp_path / "run", [2.0, 1.8, 1.7, 1.5, 1.45, 1.4], [1.9, 1.6], steps=np.arange(1, 7),
                    eval_steps=[3, 6])
    finding = codes(run)["too_short"]
    assert "train loss 2 at step 1 -> 1.4 at step 6 (-30.0%)" in finding.detail
    assert "eval loss 1.9 at step 3 -> 1.6 at step 6" in finding.detail


def test_throughput_is_the_median_so_a_window_holding_an_evaluation_does_not_drag_it(tmp_path):
    run = write_log(tmp_path / "run", healthy_loss(), healthy_eval())
    log = run / "trainer_log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    for row in rows[1:]:
        if "loss" in row and row["step"] % 50 == 5:  # the window right after each evaluation
            row["tokens_per_second"] = 10.0
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert run_report(run).summary["median_tokens_per_second"] == 1000.0


def test_report_help_names_the_folder_it_writes_to(capsys):
    from tunelab.cli import main

    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "(default: RUN_DIR/report)" in " ".join(capsys.readouterr().out.split())


def test_perplexity_is_derived_only_where_the_loss_is_a_token_cross_entropy(tmp_path):
    """A log with eval_loss alone (a Trainer's) gets exp(eval_loss) as its perplexity; a tunelab
    GRPO or DPO run's eval_loss (a negative reward, a preference loss) gets none."""
    def eval_only(run):
        run.mkdir()
        (run / "trainer_log.jsonl").write_text("\n".join(json.dumps(r) for r in (
            {"step": 1, "loss": 0.5}, {"step": 2, "eval_loss": -0.4}, {"step": 4, "eval_loss": -0.5})) + "\n")
        return run / "trainer_log.jsonl"

    plain = read_curves(eval_only(tmp_path / "trainer"))
    assert np.allclose(plain.eval_ppl, np.exp([-0.4, -0.5]))
    grpo_log = eval_only(tmp_path / "grpo")
    (tmp_path / "grpo" / "config.yaml").write_text("stage: grpo\nreward: hotel\n")
    assert np.isnan(read_curves(grpo_log).eval_ppl).all()
    (tmp_path / "grpo" / "config.yaml").write_text("stage: sft\n")
    assert np.allclose(read_curves(grpo_log).eval_ppl, np.exp([-0.4, -0.5]))
