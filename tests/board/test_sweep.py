"""`tunelab sweep`: axes, grid and random trials, checks before training, one run folder per trial,
resuming, one trial per GPU, and the comparison at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fake_runs import fake_run, tiny_config_values

from tunelab.board import sweep
from tunelab.board.runs import read_sweep
from tunelab.errors import TunelabError

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"


def test_axes_sweep_commas_fix_single_values_and_split_list_keys_on_semicolons():
    axes, fixed = sweep.parse_axes(["learning_rate=1e-4,2e-4", "max_steps=10",
                                    "lora_target=q_proj,v_proj;all-linear", "dataset=a.jsonl,b.jsonl"])
    assert [(a.key, a.values) for a in axes] == [("learning_rate", ["1e-4", "2e-4"]),
                                                 ("lora_target", ["q_proj,v_proj", "all-linear"])]
    assert fixed == ["max_steps=10", "dataset=a.jsonl,b.jsonl"]  # a list key's commas are its list


@pytest.mark.parametrize("pair, words", [("learning_rate=1e-4,1e-4", "repeated"), ("lora_rank=8,", "empty"),
                                         ("learning_rate=1e-3:1e-4", "empty")])
def test_bad_axes_are_refused(pair, words):
    with pytest.raises(TunelabError, match=words):
        sweep.parse_axes([pair])


def test_grid_is_the_product_and_random_search_is_seeded_and_distinct():
    axes, _ = sweep.parse_axes(["learning_rate=1e-4,2e-4,5e-4", "lora_rank=8,16"])
    grid = sweep.plan_trials(axes, None, 0)
    assert len(grid) == 6 and {"learning_rate": "5e-4", "lora_rank": "16"} in grid
    drawn = sweep.plan_trials(axes, 4, seed=3)
    assert len(drawn) == 4 and len({json.dumps(d) for d in drawn}) == 4 and all(d in grid for d in drawn)
    assert drawn == sweep.plan_trials(axes, 4, seed=3) != sweep.plan_trials(axes, 4, seed=4)
    assert len(sweep.plan_trials(axes, 50, seed=0)) == 6  # never more than the grid holds


def test_ranges_need_random_search_and_draw_inside_them():
    axes, _ = sweep.parse_axes(["learning_rate=1e-5:1e-3", "lora_rank=4:32"])
    with pytest.raises(TunelabError, match="--samples"):
        sweep.plan_trials(axes, None, 0)
    drawn = sweep.plan_trials(axes, 20, seed=0)
    assert len(drawn) == 20
    assert all(1e-5 <= float(d["learning_rate"]) <= 1e-3 and 4 <= int(d["lora_rank"]) <= 32 for d in drawn)
    small = sum(float(d["learning_rate"]) < 1e-4 for d in drawn)
    assert 3 <= small <= 17  # log-uniform: about half below the geometric middle (1e-4)


def test_trial_names_are_readable_folder_names():
    assert sweep.trial_name({"learning_rate": "2e-4", "lora_rank": "8"}) == "learning_rate-2e-4_lora_rank-8"
    assert "/" not in sweep.trial_name({"lora_target": "q_proj,v_proj", "dataset": "data/x.jsonl"})


def test_a_bad_trial_fails_before_anything_trains(tmp_path):
    launched = []
    with pytest.raises(TunelabError) as caught:
        sweep.run_sweep(str(QUICKSTART), ["lora_rank=8,abc"], sweep_dir=tmp_path / "s",
                        launcher=lambda *a, **k: launched.append(a))
    assert "lora_rank" in caught.value.message() and "trial lora_rank-abc" in caught.value.message()
    assert not launched and not (tmp_path / "s").exists()


class FakeProcess:
    """What `start_train` returns, for a trial 'trained' by writing its run folder at once."""
    def __init__(self, returncode):
        self.pid, self.returncode = 4242, returncode

    def poll(self):
        return self.returncode


def fake_launcher(calls, fail=()):
    def launch(config, overrides, log, gpu=None):
        values = dict(o.split("=", 1) for o in overrides)
        calls.append({"overrides": overrides, "gpu": gpu})
        log.parent.mkdir(parents=True, exist_ok=True)
        if values["learning_rate"] in fail:
            log.write_text("error: config: the data set is missing\n  fix: give dataset=...\n", encoding="utf-8")
            return FakeProcess(2)
        # A higher learning rate falls faster here, so the ranking is known.
        fake_run(Path(values["output_dir"]), lr=float(values["learning_rate"]),
                 rate=float(values["learning_rate"]) * 1000, extra={"max_steps": int(values["max_steps"])})
        return FakeProcess(0)
    return launch


def test_sweep_trains_each_trial_in_its_own_folder_then_ranks_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "POLL_SECONDS", 0)
    monkeypatch.setattr(sweep, "visible_gpus", list)
    calls = []
    code = sweep.run_sweep(str(QUICKSTART), ["learning_rate=2e-4,5e-4", "max_steps=10"], sweep_dir=tmp_path / "s",
                           launcher=fake_launcher(calls))
    assert code == 0
    assert [c["gpu"] for c in calls] == [None, None]
    assert all("max_steps=10" in c["overrides"] and "overwrite_output_dir=true" in c["overrides"] for c in calls)
    record = read_sweep(tmp_path / "s")
    assert [(t["name"], t["status"], t["overrides"]) for t in record["trials"]] == [
        ("learning_rate-2e-4", "finished", {"learning_rate": "2e-4"}),
        ("learning_rate-5e-4", "finished", {"learning_rate": "5e-4"})]
    report = (tmp_path / "s" / "compare.md").read_text(encoding="utf-8")
    assert report.index("| 1 | learning_rate-5e-4") < report.index("| 2 | learning_rate-2e-4")
    assert (tmp_path / "s" / "curves.png").stat().st_size > 1000
    ranking = json.loads((tmp_path / "s" / "compare.json").read_text())["runs"]
    assert [r["name"] for r in ranking] == ["learning_rate-5e-4", "learning_rate-2e-4"]
    assert "1. learning_rate-5e-4" in capsys.readouterr().out

    # The same command again: nothing is trained twice; a new value becomes one new trial.
    calls.clear()
    assert sweep.run_sweep(str(QUICKSTART), ["learning_rate=2e-4,5e-4,1e-3", "max_steps=10"],
                           sweep_dir=tmp_path / "s", launcher=fake_launcher(calls)) == 0
    assert [dict(o.split("=", 1) for o in c["overrides"])["learning_rate"] for c in calls] == ["1e-3"]
    assert len(read_sweep(tmp_path / "s")["trials"]) == 3


def test_a_failed_trial_is_recorded_with_its_error_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "POLL_SECONDS", 0)
    monkeypatch.setattr(sweep, "visible_gpus", list)
    calls = []
    code = sweep.run_sweep(str(QUICKSTART), ["learning_rate=2e-4,5e-4", "max_steps=10"], sweep_dir=tmp_path / "s",
                           launcher=fake_launcher(calls, fail=("2e-4",)))
    assert code == 1 and len(calls) == 2
    trials = {t["name"]: t for t in read_sweep(tmp_path / "s")["trials"]}
    assert trials["learning_rate-2e-4"]["status"] == "failed"
    assert "the data set is missing" in trials["learning_rate-2e-4"]["error"]
    assert trials["learning_rate-5e-4"]["status"] == "finished"
    assert "run the same command again" in capsys.readouterr().err


def test_several_gpus_get_one_trial_each(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "POLL_SECONDS", 0)
    monkeypatch.setattr(sweep, "visible_gpus", lambda: ["2", "5"])
    calls = []
    sweep.run_sweep(str(QUICKSTART), ["learning_rate=1e-4,2e-4,5e-4", "max_steps=4"], sweep_dir=tmp_path / "s",
                    launcher=fake_launcher(calls))
    assert [c["gpu"] for c in calls][:2] == ["2", "5"] and {c["gpu"] for c in calls} == {"2", "5"}


def test_an_unfinished_trial_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "POLL_SECONDS", 0)
    monkeypatch.setattr(sweep, "visible_gpus", list)
    run = fake_run(tmp_path / "s" / "learning_rate-2e-4", finished=False, age=3600)
    ckpt = run / "checkpoints" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}", encoding="utf-8")
    (tmp_path / "s" / "sweep.json").write_text(json.dumps({"config": str(QUICKSTART), "fixed": ["max_steps=10"],
                                                           "trials": []}), encoding="utf-8")
    calls = []
    sweep.run_sweep(str(QUICKSTART), ["learning_rate=2e-4,5e-4", "max_steps=10"], sweep_dir=tmp_path / "s",
                    launcher=fake_launcher(calls))
    resumed = [c for c in calls if "learning_rate=2e-4" in c["overrides"]]
    assert "resume_from_checkpoint=latest" in resumed[0]["overrides"]


def test_a_sweep_folder_of_another_config_is_refused(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"config": "other.yaml", "fixed": [], "trials": []}))
    with pytest.raises(TunelabError, match="another config"):
        sweep.run_sweep(str(QUICKSTART), ["learning_rate=2e-4,5e-4"], sweep_dir=tmp_path, launcher=None)


@pytest.mark.slow
def test_sweep_trains_two_tiny_runs_end_to_end(tmp_path, tiny_model_dir, capsys):
    """The real thing: the sweep starts `tunelab train` twice (child processes) on a tiny model."""
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(tiny_config_values(tiny_model_dir, tmp_path, tmp_path / "runs" / "tiny")))
    assert sweep.run_sweep(str(config), ["learning_rate=1e-3,1e-2"]) == 0
    folder = tmp_path / "runs" / "tiny-sweep"
    for name in ("learning_rate-1e-3", "learning_rate-1e-2"):
        assert (folder / name / "adapter_model.safetensors").is_file()
        assert "done: 2 steps" in (folder / "logs" / f"{name}.log").read_text()
    assert "2 runs ranked by eval_loss" in capsys.readouterr().out
    # Again: both runs are finished, nothing is started.
    assert sweep.run_sweep(str(config), ["learning_rate=1e-3,1e-2"], launcher=None) == 0
    assert capsys.readouterr().err.count("finished earlier, skipped") == 2
