"""Experiment trackers behind `report_to`: one small protocol, one class per service, one table.

Each tracker gets the run's config when it starts, every logged row as scalars (`train/loss`,
`eval/loss`, ...), the loss plot when the run ends and the task-evaluation tables
(`task_eval/step-N.jsonl`). The JSONL log (tracking.py) stays the source of truth; trackers are
copies of it for people's dashboards. Their packages are optional (`pip install 'tunelab[track]'`)
and imported only when named. Each service keeps its own settings in its own environment
variables: `WANDB_MODE=offline`, `WANDB_PROJECT`, `SWANLAB_MODE=local`, `SWANLAB_PROJ_NAME`,
`MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_NAME`, `TRACKIO_PROJECT`...
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Protocol

from tunelab.config import REPORT_TO
from tunelab.errors import TunelabError

PROJECT = "tunelab"  # the project / experiment name when the service's own variable is unset


class Backend(Protocol):
    """What every tracker does. `config` is the run's config as a dict; names are `train/x`, `eval/x`."""

    def __init__(self, run_dir: Path, config: dict, start_step: int) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, name: str, path: Path, step: int) -> None: ...

    def log_table(self, name: str, rows: list[dict], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    package = "tensorboard"

    def __init__(self, run_dir: Path, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # Resuming: TensorBoard drops the events the interrupted run wrote after the checkpoint
        # (they are logged again), so no step appears twice.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("config", _markdown_table([{"key": k, "value": v} for k, v in config.items()]))

    def log_metrics(self, metrics, step):
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_image(self, name, path, step):
        import matplotlib.image

        self.writer.add_image(name, matplotlib.image.imread(path)[..., :3], step, dataformats="HWC")

    def log_table(self, name, rows, step):
        self.writer.add_text(name, _markdown_table(rows), step)

    def close(self):
        self.writer.close()


class _LogDicts:
    """Services logged with one `log({name: value}, step)` call and `Image` / `Table` types of their own
    (W&B, SwanLab, trackio); `lib` is the service's module."""

    lib = None

    def _log(self, data: dict, step: int) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics, step):
        self._log(metrics, step)

    def log_image(self, name, path, step):
        self._log({name: self.lib.Image(str(path))}, step)

    def log_table(self, name, rows, step):
        columns = _columns(rows)
        self._log({name: self.lib.Table(columns=columns, data=[[_cell(r.get(c)) for c in columns] for r in rows])},
                  step)


class Wandb(_LogDicts):
    package = "wandb"

    def __init__(self, run_dir: Path, config: dict, start_step: int):
        import wandb

        self.lib = wandb
        # The files go under RUN_DIR/wandb (offline runs too: `wandb sync RUN_DIR/wandb/offline-run-*`).
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=run_dir.name,
                              dir=str(run_dir), config=config, reinit="create_new")

    def _log(self, data, step):
        self.run.log(data, step=step)

    def close(self):
        self.run.finish()


class SwanLab(_LogDicts):
    package = "swanlab"

    def __init__(self, run_dir: Path, config: dict, start_step: int):
        import swanlab

        self.lib = swanlab
        # SWANLAB_MODE=local|offline keeps everything in RUN_DIR/swanlog; cloud needs `swanlab login`.
        self.run = swanlab.init(project=os.environ.get("SWANLAB_PROJ_NAME") or PROJECT,
                                experiment_name=run_dir.name, config=config, logdir=str(run_dir / "swanlog"))

    def _log(self, data, step):
        self.run.log(data, step=step)

    def log_table(self, name, rows, step):
        # SwanLab has no table type: the rows as text, one JSON object a line.
        self._log({name: self.lib.Text("\n".join(json.dumps(r, ensure_ascii=False, default=str) for r in rows))},
                  step)

    def close(self):
        self.run.finish()


class MLflow:
    package = "mlflow"

    def __init__(self, run_dir: Path, config: dict, start_step: int):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        # Without MLFLOW_TRACKING_URI: a file store inside the run folder (`mlflow ui --backend-store-uri`).
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
        try:
            self.client = MlflowClient(tracking_uri=uri)
            experiment = self.client.get_experiment_by_name(name)
        except MlflowException as exc:  # MLflow 3.x refuses file stores unless MLFLOW_ALLOW_FILE_STORE=true
            raise TunelabError(f"MLflow cannot open the tracking store {uri} ({str(exc).split('. ')[0]})",
                               where="report_to=mlflow",
                               fix="set MLFLOW_TRACKING_URI to your MLflow server or database (e.g. "
                                   "sqlite:///mlflow.db), or MLFLOW_ALLOW_FILE_STORE=true for a file store in "
                                   "the run folder") from None
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in config.items()]  # MLflow caps a value at 500 characters
        for i in range(0, len(params), 100):  # and a batch at 100 params
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_image(self, name, path, step):
        self.client.log_artifact(self.run_id, str(path))

    def log_table(self, name, rows, step):
        self.client.log_dict(self.run_id, rows, f"{name}.json")

    def close(self):
        self.client.set_terminated(self.run_id)


class Trackio(_LogDicts):
    package = "trackio"

    def __init__(self, run_dir: Path, config: dict, start_step: int):
        import trackio

        self.lib = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT") or PROJECT, name=run_dir.name,
                                config=config)

    def _log(self, data, step):
        self.lib.log(data, step=step)

    def close(self):
        self.lib.finish()


# report_to name -> tracker; "jsonl" (always written) and "none" have none.
TRACKERS: dict[str, type] = {"tensorboard": TensorBoard, "wandb": Wandb, "swanlab": SwanLab, "mlflow": MLflow,
                             "trackio": Trackio}
assert set(TRACKERS) | {"jsonl", "none"} == set(REPORT_TO), "config.REPORT_TO and TRACKERS must name the same"


def check_installed(report_to: list[str]) -> None:
    """Fail before the model loads when a named tracker's package is missing."""
    for name in report_to:
        tracker = TRACKERS.get(name)
        if tracker is not None and importlib.util.find_spec(tracker.package) is None:
            raise TunelabError(f"report_to={name} needs the {tracker.package} package, which is not installed",
                               where="config", fix=f"pip install 'tunelab[track]' (or pip install {tracker.package}),"
                                                   f" or drop {name} from report_to")


def start(report_to: list[str], run_dir: Path, config: dict, start_step: int) -> list[Backend]:
    check_installed(report_to)
    started: list[Backend] = []
    try:
        for name in report_to:
            if name in TRACKERS:
                started.append(TRACKERS[name](Path(run_dir), config, start_step))
    except BaseException:
        for backend in started:  # one service refused: the runs already opened elsewhere are closed
            backend.close()
        raise
    return started


def scalars(row: dict) -> dict[str, float]:
    """A log row as tracker scalars: `train/loss`, `train/learning_rate`; `eval/loss`, `eval/slot_f1`."""
    is_eval = any(k.startswith("eval_") for k in row)
    return {(k.replace("eval_", "eval/", 1) if is_eval else f"train/{k}"): v for k, v in row.items()
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _cell(value):
    return value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(
        value, ensure_ascii=False, default=str)


def _markdown_table(rows: list[dict]) -> str:
    columns = _columns(rows)

    def cell(v) -> str:
        return str(_cell(v)).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
