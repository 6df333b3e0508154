"""Reading run folders: which runs exist under a folder, their status, curves, config and predictions.

Only files are read (what `tunelab train` writes), so the board and `tunelab report A B` see
runs started anywhere: by hand, by a sweep, or from the board.

Status of a run folder:
- finished: the final weights (written after the last step) are newer than the log;
- running: a launch record (sweep.json, or the board's) names a live process, or, without one,
  the log changed in the last RECENT_SECONDS;
- failed: a launch record says the process exited with an error (its log tail says why);
- stopped: anything else with a log (interrupted, killed, or crashed outside a launcher).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunelab.errors import TunelabError
from tunelab.io import _alive as pid_alive
from tunelab.train.runlog import LOG_NAME, read_log

FINAL_WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
RECENT_SECONDS = 600  # an evaluation with generation can keep the log quiet for minutes
SWEEP_FILE = "sweep.json"


@dataclass
class Launch:
    """What a launcher (a sweep, the board) recorded about the process that trains a run."""
    pid: int | None = None
    returncode: int | None = None
    log: str | None = None  # the process's stdout + stderr

    def alive(self) -> bool:
        return self.returncode is None and self.pid is not None and pid_alive(self.pid)


@dataclass
class RunInfo:
    path: Path
    name: str
    status: str  # finished | running | failed | stopped | pending
    sweep: str | None = None  # the sweep folder's name, for runs of a sweep
    step: float | None = None  # last logged step
    max_steps: int | None = None
    updated: float | None = None  # mtime of the log
    final: dict = field(default_factory=dict)  # last value of each logged metric

    def to_json(self) -> dict:
        return {"id": self.name, "path": str(self.path), "status": self.status, "sweep": self.sweep,
                "step": self.step, "max_steps": self.max_steps, "updated": self.updated, "final": self.final}


def is_run(folder: Path) -> bool:
    return (folder / LOG_NAME).is_file() or ((folder / "config.yaml").is_file() and (folder / ".tunelab-run").is_file())


def run_status(run_dir: Path, launch: Launch | None = None) -> str:
    run_dir = Path(run_dir)
    log = run_dir / LOG_NAME
    if launch is not None and launch.alive():
        return "running"
    weights = [run_dir / n for n in FINAL_WEIGHTS if (run_dir / n).is_file()]
    if not log.is_file():
        # A launched process that is gone without writing a log failed before training.
        return "finished" if weights else "failed" if launch is not None else "pending"
    logged = log.stat().st_mtime
    if weights and max(w.stat().st_mtime for w in weights) >= logged - 1:
        return "finished"
    if launch is not None and launch.returncode:
        return "failed"
    if launch is None and time.time() - logged < RECENT_SECONDS:
        return "running"
    return "stopped"


def is_finished(run_dir: Path) -> bool:
    return run_status(run_dir) == "finished"


def read_rows(run_dir: Path) -> list[dict]:
    """The log's rows, the last row per (kind, step) kept (a resumed run logs some steps again)."""
    log = Path(run_dir) / LOG_NAME
    if not log.is_file():
        return []
    kept: dict[tuple[bool, float], dict] = {}
    for row in read_log(log):
        if isinstance(row, dict) and "step" in row:
            kept[(any(k.startswith("eval_") for k in row), row["step"])] = row
    return sorted(kept.values(), key=lambda r: (r["step"], any(k.startswith("eval_") for k in r)))


def final_metrics(rows: list[dict]) -> dict:
    """The last finite value of every numeric key (loss, eval_loss, eval_slot_f1, ...)."""
    out: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                out[key] = value
    return out


def read_config(run_dir: Path) -> dict:
    """The run's resolved config (config.yaml, written by `tunelab train`); {} when absent."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}
    return values if isinstance(values, dict) else {}


def config_diff(configs: dict[str, dict]) -> dict[str, dict]:
    """{key: {run: value}} for the keys whose values differ between the runs (output_dir aside:
    it always differs and says nothing about the experiment)."""
    keys = dict.fromkeys(k for c in configs.values() for k in c)
    diff = {}
    for key in keys:
        if key == "output_dir":
            continue
        values = {run: c.get(key) for run, c in configs.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            diff[key] = values
    return diff


def predictions(run_dir: Path) -> tuple[str, list[dict]] | None:
    """(where, rows) of the run's latest predictions: `tunelab eval`'s (RUN/eval/predictions.jsonl),
    else the last step's of the task metrics during training (RUN/task_eval/step-N.jsonl)."""
    run_dir = Path(run_dir)
    evaluated = run_dir / "eval" / "predictions.jsonl"
    if evaluated.is_file():
        return "eval/predictions.jsonl", read_log(evaluated)
    steps = {int(p.stem.split("-", 1)[1]): p for p in (run_dir / "task_eval").glob("step-*.jsonl")
             if p.stem.split("-", 1)[1].isdigit()}
    if steps:
        step = max(steps)
        return f"task_eval/step-{step}.jsonl", read_log(steps[step])
    return None


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or "perplexity" in metric


def best_value(rows: list[dict], metric: str) -> tuple[float | None, float | None]:
    """(best value, its step) of `metric` over the run's evaluations (train rows for `loss`)."""
    points = [(r[metric], r["step"]) for r in rows
              if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not points:
        return None, None
    pick = min if lower_is_better(metric) else max
    return pick(points, key=lambda p: p[0])


# --- finding runs --------------------------------------------------------------------

def read_sweep(folder: Path) -> dict | None:
    path = Path(folder) / SWEEP_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def sweep_launches(folder: Path, sweep: dict) -> dict[Path, Launch]:
    return {(Path(folder) / t["name"]).resolve(): Launch(t.get("pid"), t.get("returncode"), t.get("log"))
            for t in sweep.get("trials", [])}


def run_info(path: Path, name: str, launch: Launch | None = None, sweep: str | None = None) -> RunInfo:
    rows = read_rows(path)
    log = path / LOG_NAME
    max_steps = read_config(path).get("max_steps")
    return RunInfo(path=path, name=name, status=run_status(path, launch), sweep=sweep,
                   step=rows[-1]["step"] if rows else None,
                   max_steps=max_steps if isinstance(max_steps, int) and max_steps > 0 else None,
                   updated=log.stat().st_mtime if log.is_file() else None, final=final_metrics(rows))


def find_runs(root: Path, launches: dict[Path, Launch] | None = None, depth: int = 3) -> list[RunInfo]:
    """Every run folder under `root` (down to `depth` levels), runs of a sweep named SWEEP/TRIAL,
    newest first. `launches` adds the launch records of runs started elsewhere (the board's)."""
    root = Path(root)
    launches = dict(launches or {})
    found: list[RunInfo] = []

    def walk(folder: Path, level: int, sweep: str | None) -> None:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            data = read_sweep(child)
            if data is not None:
                launches.update(sweep_launches(child, data))
                walk(child, level + 1, child.name)
            elif is_run(child):
                name = str(child.relative_to(root))
                found.append(run_info(child, name, launches.get(child.resolve()), sweep))
            elif level < depth:
                walk(child, level + 1, sweep)

    if is_run(root):
        found.append(run_info(root, root.name, launches.get(root.resolve())))
    else:
        walk(root, 1, None)
    return sorted(found, key=lambda r: -(r.updated or 0))


def resolve_runs(paths: list[Path]) -> list[Path]:
    """Run folders from the command line: run folders as given, a sweep folder as its trials."""
    out = []
    for path in map(Path, paths):
        data = read_sweep(path)
        if not path.exists():
            raise TunelabError(f"run folder {path} does not exist", where="command line",
                               fix="give the output_dir of `tunelab train` runs, or a `tunelab sweep` folder")
        if data is not None:
            out += [path / t["name"] for t in data.get("trials", []) if (path / t["name"] / LOG_NAME).is_file()]
        elif (path / LOG_NAME).is_file():
            out.append(path)
        elif path.is_dir() and (runs := [r.path for r in find_runs(path)]):
            out += sorted(runs)
        else:
            raise TunelabError(f"{path} is neither a run folder (with {LOG_NAME}) nor a sweep folder (with "
                               f"{SWEEP_FILE})", where="command line",
                               fix="give the output_dir of `tunelab train` runs, or a `tunelab sweep` folder")
    return out
