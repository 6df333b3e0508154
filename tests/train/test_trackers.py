"""report_to: each tracker, offline, checked against the files it writes; names and missing packages."""

import glob
import importlib.util
import json
import struct
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.train import trackers
from tunelab.train.tracking import TASK_EVAL_DIR, Tracker

CONFIG = {"model_name_or_path": "tiny", "lora_rank": 8, "report_to": ["x"]}
ROWS = [{"step": 1, "epoch": 0.5, "loss": 2.5, "learning_rate": 1e-4},
        {"step": 2, "epoch": 1.0, "eval_loss": 2.25, "eval_slot_f1": 0.5}]
TABLE = [{"prompt": "hi", "prediction": "hello", "reference": {"slots": ["a"]}}]


def needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f"{package} is not installed (pip install 'tunelab[track]')")


def run_tracker(run_dir: Path, name: str) -> Path:
    """Two rows (a training and an evaluation one), a task table at the evaluation, the loss plot."""
    tracker = Tracker(run_dir, [name], total_steps=2, disable_progress=True, config=CONFIG, plot=True)
    (run_dir / TASK_EVAL_DIR).mkdir(parents=True)
    (run_dir / TASK_EVAL_DIR / "step-2.jsonl").write_text(json.dumps(TABLE[0]) + "\n")
    for row in ROWS:
        tracker.log(row)
    tracker.close()
    assert (run_dir / "training_loss.png").is_file()
    return run_dir


def test_scalars_name_training_and_evaluation_rows():
    assert trackers.scalars(ROWS[0]) == {"train/loss": 2.5, "train/learning_rate": 1e-4}
    assert trackers.scalars(ROWS[1]) == {"eval/loss": 2.25, "eval/slot_f1": 0.5}


@pytest.mark.parametrize("value, hint", [("wandb,tensorbord", "tensorboard"), ("mlfow", "mlflow"),
                                         ("swanlabs", "swanlab")])
def test_unknown_tracker_is_refused_with_the_nearest(value, hint):
    with pytest.raises(TunelabError) as err:
        load_config(None, {"report_to": value})
    assert f"report_to={hint}" in err.value.fix


def test_comma_string_and_none():
    assert load_config(None, ["report_to=wandb,mlflow"]).report_to == ["wandb", "mlflow"]
    assert load_config(None, {"report_to": "none"}).report_to == ["none"]
    with pytest.raises(TunelabError, match="none"):
        load_config(None, {"report_to": ["none", "wandb"]})


def test_missing_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "swanlab" else real(name))
    with pytest.raises(TunelabError) as err:
        trackers.check_installed(["tensorboard", "swanlab"])
    assert "swanlab" in err.value.what and "pip install 'tunelab[track]'" in err.value.fix


def test_tensorboard_gets_scalars_config_plot_and_table(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_tracker(tmp_path, "tensorboard")
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == [2.5]
    assert [(e.step, e.value) for e in events.Scalars("eval/slot_f1")] == [(2, 0.5)]
    assert "training_loss" in events.Tags()["images"]
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    assert "lora_rank" in texts["config/text_summary"]
    assert "hello" in texts[f"{TASK_EVAL_DIR}/step-2/text_summary"]


def wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (LevelDB log format: 7-byte header, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, buf, block = path.read_bytes(), 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


@needs("wandb")
def test_wandb_offline_writes_config_metrics_plot_and_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_tracker(tmp_path, "wandb")
    import wandb

    wandb.teardown()  # the W&B service writes the run file on its own time: let it finish
    (run,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    history, config = {}, {}
    for record in wandb_records(next(Path(run).glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item}
        elif kind == "run":
            config |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
    assert history["train/loss"] == 2.5 and history["eval/slot_f1"] == 0.5
    assert config["lora_rank"] == 8
    (table,) = glob.glob(f"{run}/files/media/table/{TASK_EVAL_DIR}/step-2_*.table.json")
    assert json.loads(Path(table).read_text())["data"][0][1] == "hello"
    assert glob.glob(f"{run}/files/media/images/training_loss_*.png")


@needs("mlflow")
def test_mlflow_file_store_gets_params_metrics_plot_and_table(tmp_path, monkeypatch):
    store = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_tracker(tmp_path / "run", "mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name(trackers.PROJECT).experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["lora_rank"] == "8"
    assert run.data.metrics == {"train/loss": 2.5, "train/learning_rate": 1e-4, "eval/loss": 2.25,
                                "eval/slot_f1": 0.5}
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert (artifacts / "training_loss.png").is_file()
    assert json.loads((artifacts / TASK_EVAL_DIR / "step-2.json").read_text())[0]["prediction"] == "hello"


@needs("mlflow")
def test_mlflow_refusing_its_file_store_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    with pytest.raises(TunelabError) as err:
        Tracker(tmp_path, ["mlflow"], total_steps=1, disable_progress=True)
    assert "MLFLOW_TRACKING_URI" in err.value.fix


@needs("swanlab")
def test_swanlab_local_mode_writes_metrics_under_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SWANLAB_MODE", "local")
    run_tracker(tmp_path, "swanlab")
    written = "".join(p.read_text(errors="ignore") for p in (tmp_path / "swanlog").rglob("*") if p.is_file())
    assert "train/loss" in written and "eval/slot_f1" in written and "lora_rank" in written
    (run,) = (tmp_path / "swanlog").glob("run-*")
    assert list((run / "media" / "image").glob("*.png"))
    assert "hello" in next((run / "media" / "text").glob("*.txt")).read_text()


@needs("trackio")
def test_trackio_writes_metrics_to_its_local_store(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    run_tracker(tmp_path / "run", "trackio")
    import sqlite3

    db = sqlite3.connect(tmp_path / "trackio" / f"{trackers.PROJECT}.db")
    logged = {}
    for step, metrics in db.execute("select step, metrics from metrics order by id"):
        logged |= {(step, k): v for k, v in json.loads(metrics).items()}
    assert logged[1, "train/loss"] == 2.5 and logged[2, "eval/slot_f1"] == 0.5
    assert logged[2, f"{TASK_EVAL_DIR}/step-2"]["_value"][0]["prediction"] == "hello"
    assert logged[2, "training_loss"]["_type"] == "trackio.image"
    (config,) = db.execute("select config from configs").fetchone()
    assert json.loads(config)["lora_rank"] == 8
