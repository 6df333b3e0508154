"""`tunelab report A B` (several runs, or a sweep folder) and the run-folder readings under it."""

from __future__ import annotations

import json
import os
import time

from fake_runs import fake_run

from tunelab.board import runs as R
from tunelab.cli import main


def test_status_from_the_run_folder_files(tmp_path):
    assert R.run_status(fake_run(tmp_path / "done")) == "finished"
    assert R.run_status(fake_run(tmp_path / "live", finished=False)) == "running"  # log written just now
    assert R.run_status(fake_run(tmp_path / "old", finished=False, age=3 * R.RECENT_SECONDS)) == "stopped"
    # Retrained with overwrite_output_dir: the old final weights are older than the new log.
    again = fake_run(tmp_path / "again")
    old = time.time() - 100
    os.utime(again / "adapter_model.safetensors", (old, old))
    assert R.run_status(again) == "running"
    # A launcher's record wins over the file times.
    assert R.run_status(fake_run(tmp_path / "crashed", finished=False), R.Launch(pid=1, returncode=2)) == "failed"


def test_config_diff_keeps_only_keys_that_differ():
    diff = R.config_diff({"a": {"learning_rate": 1e-4, "lora_rank": 8, "output_dir": "runs/a", "lora_target": ["x"]},
                          "b": {"learning_rate": 5e-4, "lora_rank": 8, "output_dir": "runs/b", "lora_target": ["x"]}})
    assert diff == {"learning_rate": {"a": 1e-4, "b": 5e-4}}


def test_find_runs_groups_the_trials_of_a_sweep(tmp_path):
    fake_run(tmp_path / "solo")
    fake_run(tmp_path / "s" / "learning_rate-1e-4")
    (tmp_path / "s" / "sweep.json").write_text(json.dumps(
        {"trials": [{"name": "learning_rate-1e-4", "pid": None, "returncode": 1}]}), encoding="utf-8")
    found = {r.name: r for r in R.find_runs(tmp_path)}
    assert set(found) == {"solo", "s/learning_rate-1e-4"}
    assert found["s/learning_rate-1e-4"].sweep == "s" and found["solo"].sweep is None


def test_report_of_two_runs_compares_them(tmp_path, capsys):
    """`tunelab report A B` was refused (one RUN_DIR only); now it writes the comparison."""
    a = fake_run(tmp_path / "a", lr=1e-4, rate=0.05, predictions=[("Book a room", "Which dates?", "ok"),
                                                                   ("Hello", "Hi!", "Hello.")])
    b = fake_run(tmp_path / "b", lr=5e-4, rate=0.2, predictions=[("Book a room", "Which dates?", "For when?"),
                                                                  ("Hello", "Hi!", "Hi!")])
    assert main(["report", str(a), str(b)]) == 0
    out = tmp_path / "compare"
    text = (out / "compare.md").read_text(encoding="utf-8")
    assert text.index("| 1 | b ") < text.index("| 2 | a ")  # b's eval loss is lower
    assert "| learning_rate | `0.0005` | `0.0001` |" in text  # columns in rank order
    assert "lora_rank" not in text.split("## Config differences")[1].split("##")[0]  # the same in both
    assert text.count("Healthy run") == 2  # evaluate/report.py's diagnosis of each run
    examples = text.split("## The same examples")[1]
    assert "Book a room" in examples and "**a**: ok" in examples and "**b**: For when?" in examples
    assert (out / "curves.png").stat().st_size > 1000
    assert "2 runs ranked by eval_loss" in capsys.readouterr().out


def test_report_of_a_sweep_folder_and_ranking_by_a_task_metric(tmp_path, capsys):
    for name, f1 in (("x", 0.2), ("y", 0.7)):
        run = fake_run(tmp_path / "s" / name)
        log = run / "trainer_log.jsonl"
        log.write_text(log.read_text() + json.dumps({"step": 12, "eval_loss": 1.0, "eval_slot_f1": f1}) + "\n")
    (tmp_path / "s" / "sweep.json").write_text(json.dumps({"trials": [{"name": "x"}, {"name": "y"}]}))
    assert main(["report", str(tmp_path / "s"), "--metric", "eval_slot_f1"]) == 0
    ranking = json.loads((tmp_path / "s" / "compare.json").read_text())
    assert [r["name"] for r in ranking["runs"]] == ["y", "x"] and ranking["lower_is_better"] is False


def test_report_of_one_run_is_unchanged(tmp_path, capsys):
    run = fake_run(tmp_path / "a")
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "report.md").is_file() and not (tmp_path / "compare").exists()


def test_report_of_folders_without_runs_says_what_to_give(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), str(tmp_path / "empty")]) == 2
    assert "neither a run folder" in capsys.readouterr().err


def test_predictions_come_from_tunelab_eval_else_the_last_task_eval_step(tmp_path):
    run = fake_run(tmp_path / "r")
    assert R.predictions(run) is None
    (run / "task_eval").mkdir()
    for step in (8, 24):
        (run / "task_eval" / f"step-{step}.jsonl").write_text(json.dumps({"prompt": "p", "prediction": str(step)}) + "\n")
    assert R.predictions(run) == ("task_eval/step-24.jsonl", [{"prompt": "p", "prediction": "24"}])
    fake_run(tmp_path / "r", predictions=[("p", "ref", "evaluated")])
    where, rows = R.predictions(run)
    assert where == "eval/predictions.jsonl" and rows[0]["prediction"] == "evaluated"
