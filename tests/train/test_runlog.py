"""The run log module: reading a log cut by a crash, perplexity, smoothing, the training plot."""

from __future__ import annotations

import json
import math

import pytest

from tunelab.train.runlog import PLOT_NAME, ema, perplexity, plot_run, read_log, truncate_log


def test_perplexity_guards_overflow():
    assert perplexity(math.log(12.5)) == pytest.approx(12.5)
    assert perplexity(0.0) == 1.0
    assert perplexity(1e4) == math.inf
    assert math.isnan(perplexity(math.nan))


def test_read_log_skips_and_counts_cut_lines(tmp_path):
    log = tmp_path / "trainer_log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    rows = read_log(log)
    assert [r["step"] for r in rows] == [1, 2] and rows.skipped == 2
    truncate_log(log, 1)
    assert [r["step"] for r in read_log(log)] == [1]


def test_ema_is_debiased():
    assert ema([2.0, 2.0, 2.0], window=9) == pytest.approx([2.0, 2.0, 2.0])  # not pulled towards 0
    smooth = ema([0.0] * 5 + [10.0], window=3)
    assert 0 < smooth[-1] < 10


def test_plot_run_draws_train_eval_and_reward_panels(tmp_path):
    rows = [{"step": s, "loss": 2 - s / 20, "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s}
            for s in range(1, 25)] + [{"step": 10, "eval_loss": 1.8, "eval_rewards/accuracies": 0.7}]
    (tmp_path / "trainer_log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = plot_run(tmp_path)
    assert out == tmp_path / PLOT_NAME and out.read_bytes()[:4] == b"\x89PNG"
    assert plot_run(tmp_path / "nowhere") is None
