"""Stage chains (tunelab/chain.py): one YAML, one parent folder, resumable, forgetting measured."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tunelab.chain import load_chain, run_chain
from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.evaluate.chain_report import forgetting
from tunelab.train.runlog import read_log

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "data" / "quickstart.jsonl"
pytestmark = pytest.mark.usefixtures("one_thread")


def write_chain(tmp_path: Path, stages: list[dict], **shared) -> Path:
    values = {"model_name_or_path": "smollm2-135m-instruct", "output_dir": str(tmp_path / "chain"),
              "dataset": str(QUICKSTART), **shared, "stages": stages}
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_stages_inherit_shared_keys_and_get_one_folder_each(tmp_path):
    path = write_chain(tmp_path, [{"name": "a", "cutoff_len": 64}, {"name": "b", "replay": {"data": "a", "fraction": 0.5}},
                                  {"stage": "dpo", "from_previous": "merged"}],
                       cutoff_len=128, eval_sets={"a": "a"})
    parent, stages = load_chain(path, ["learning_rate=1e-3"])
    assert parent == tmp_path / "chain"
    assert [s.folder.name for s in stages] == ["stage-1-a", "stage-2-b", "stage-3-dpo"]
    assert [s.cfg.cutoff_len for s in stages] == [64, 128, 128]
    assert all(s.cfg.learning_rate == 1e-3 for s in stages)  # the command line wins everywhere
    # A stage's name means its folder; a stage never probes itself.
    assert stages[0].cfg.eval_sets == {} and stages[1].cfg.eval_sets == {"a": str(parent / "stage-1-a")}
    assert stages[1].cfg.replay_spec.data == str(parent / "stage-1-a")


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a"}, {"name": "a"}], "used twice"),
    ([{"name": "a"}, {"output_dir": "x"}], "a stage sets output_dir"),
    ([{"name": "a"}, {"model_name_or_path": "other"}], "a stage sets model_name_or_path"),
    ([{"name": "a", "finetuning_type": "full"}, {"from_previous": "adapter"}], "not a LoRA adapter"),
    ([{"name": "a"}, {"finetuning_type": "full"}], "set from_previous: merged"),
    ([{"name": "a", "replay": {"data": "b", "fraction": 0.1}}, {"name": "b"}], "runs at or after this one"),
    ([{"name": "a", "lora_rnk": 4}], "did you mean 'lora_rank'"),
])
def test_a_bad_chain_is_refused_before_anything_trains(tmp_path, stages, message):
    with pytest.raises(TunelabError) as err:
        load_chain(write_chain(tmp_path, stages))
    assert message in err.value.message() and str(tmp_path / "chain.yaml") in err.value.message()
    assert not (tmp_path / "chain").exists()


def test_forgetting_table_reads_the_own_stage_then_the_probes():
    stages = [{"name": "a", "rows": [{"step": 0, "eval_loss": 3.0}, {"step": 4, "eval_loss": 1.0}]},
              {"name": "b", "rows": [{"step": 0, "eval_loss": 2.0, "eval_a_loss": 1.0},
                                     {"step": 4, "eval_loss": 1.5, "eval_a_loss": 1.4, "eval_a_slot_f1": 50.0}]}]
    table = forgetting(stages)
    assert table["a"]["loss"] == [3.0, 1.0, 1.4]  # start, after a (its own eval_loss), after b
    assert table["a"]["slot_f1"] == [None, None, 50.0]


def tiny_chain(tmp_path, model_dir) -> Path:
    return write_chain(tmp_path, [
        {"name": "first", "val_size": 4, "max_steps": 4},
        {"name": "second", "replay": {"data": "first", "samples": 3}, "val_size": 2, "max_steps": 4},
    ], model_name_or_path=str(model_dir), cutoff_len=96, max_samples=24, per_device_train_batch_size=2,
        lora_rank=4, lora_alpha=8, learning_rate=5e-3, logging_steps=1, save_steps=2, eval_strategy="steps",
        eval_steps=2, eval_sets={"first": "first"}, report_to=["jsonl"], disable_tqdm=True, device="cpu")


def test_chain_runs_hands_the_adapter_on_measures_forgetting_and_resumes(tmp_path, tiny_model_dir, capsys):
    path = tiny_chain(tmp_path, tiny_model_dir)
    assert main(["train", str(path)]) == 0
    parent = tmp_path / "chain"
    first, second = parent / "stage-1-first", parent / "stage-2-second"
    assert (first / "adapter_model.safetensors").exists() and (second / "adapter_model.safetensors").exists()
    assert yaml.safe_load((second / "config.yaml").read_text())["adapter_name_or_path"] == str(first)
    mixture = json.loads((second / "data_mixture.json").read_text())
    assert mixture["replay"]["taken"] == 3 and mixture["replay"]["path"].startswith(str(first))
    probes = [r for r in read_log(second / "trainer_log.jsonl") if "eval_first_loss" in r]
    assert [r["step"] for r in probes] == [0, 2, 4]
    # At step 0 stage 2 is stage 1's final model: the probe equals stage 1's last validation loss.
    last_own = [r["eval_loss"] for r in read_log(first / "trainer_log.jsonl") if "eval_loss" in r][-1]
    assert probes[0]["eval_first_loss"] == pytest.approx(last_own, rel=1e-4)
    table = json.loads((parent / "forgetting.json").read_text())
    assert table["columns"] == ["start", "after 1-first", "after 2-second"]
    assert table["table"]["first"]["loss"][2] == probes[-1]["eval_first_loss"]

    # Run again: both stages are done and skipped.
    capsys.readouterr()
    assert main(["train", str(path)]) == 0
    assert capsys.readouterr().err.count("done, skipped") == 2

    # An interrupted stage 2 (checkpoint at step 2, status running) resumes from that checkpoint.
    record = json.loads((parent / "chain.json").read_text())
    record["stages"][1]["status"] = "running"
    (parent / "chain.json").write_text(json.dumps(record))
    shutil.rmtree(second / "checkpoints" / "checkpoint-4")
    run_chain(path)
    assert "resumed from" in capsys.readouterr().err
    assert json.loads((parent / "chain.json").read_text())["stages"][1]["status"] == "done"

    # The report draws the stages end to end.
    assert main(["report", str(parent)]) == 0
    assert (parent / "report" / "chain_loss.png").stat().st_size > 0
    assert "stage 2 (second)" in capsys.readouterr().out


@pytest.mark.slow
def test_example_chain_runs_on_the_embedded_model(tmp_path):
    out = tmp_path / "chain"
    assert main(["train", str(REPO / "examples" / "chain.yaml"), f"output_dir={out}", "max_steps=2", "eval_steps=2",
                 "save_steps=2", "disable_tqdm=true", "report_to=jsonl", "device=cpu"]) == 0
    assert (out / "stage-2-long" / "merged" / "config.json").exists()  # stage 3 trained on the merged weights
    assert (out / "stage-3-dpo" / "adapter_model.safetensors").exists()
    table = json.loads((out / "forgetting.json").read_text())
    assert len(table["table"]["short"]["loss"]) == 4 and None not in table["table"]["short"]["loss"]


def test_a_chain_file_given_where_one_config_is_expected_says_how_to_run_it(tmp_path):
    from tunelab.config import load_config

    path = write_chain(tmp_path, [{"name": "a"}])
    with pytest.raises(TunelabError, match="chain of stages") as err:
        load_config(path)
    assert f"tunelab train {path}" in err.value.message()
