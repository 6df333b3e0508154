"""`tunelab sweep CONFIG.yaml learning_rate=1e-4,2e-4 lora_rank=8,16 [--samples N]`: a parameter study.

1. The overrides become axes: `key=a,b,c` is swept, `key=v` is fixed for every trial; a list key
   (dataset, lora_target, ...) takes alternatives separated by `;` (`lora_target="q_proj,v_proj;all-linear"`);
   with --samples, `key=lo:hi` draws from a range (log-uniform for positive floats).
2. Trials: the whole grid, or --samples N of it drawn with --seed. Every trial's config is checked
   before the first one trains, so a typo fails in a second, not after an hour.
3. Each trial is a normal run folder SWEEP/NAME, trained by `tunelab train` in a child process,
   one at a time, or one per GPU when several are visible. SWEEP/sweep.json records the trials,
   their overrides, status and exit codes; SWEEP/logs/NAME.log their output.
4. Running the same command again skips finished trials and resumes the others from their last
   checkpoint; new values added to an axis become new trials.
5. The end: SWEEP/compare.md, compare.json and curves.png (board/compare.py), ranked by --metric.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tunelab.board.launch import error_text, start_train, visible_gpus
from tunelab.board.runs import SWEEP_FILE, is_finished, read_sweep
from tunelab.config import TunelabConfig, load_config
from tunelab.errors import TunelabError
from tunelab.io import write_json_atomic

POLL_SECONDS = 2.0


@dataclass
class Axis:
    key: str
    values: list[str]  # the values as written (passed on as key=value)
    low: float | None = None  # a range lo:hi (random search only)
    high: float | None = None

    def draw(self, rng: random.Random) -> str:
        if self.low is None:
            return rng.choice(self.values)
        if all(float(x).is_integer() for x in (self.low, self.high)) and "." not in "".join(self.values):
            return str(rng.randint(int(self.low), int(self.high)))
        if self.low > 0:  # learning rates, dropout: orders of magnitude matter, not the linear distance
            return f"{math.exp(rng.uniform(math.log(self.low), math.log(self.high))):.3g}"
        return f"{rng.uniform(self.low, self.high):.3g}"


def list_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(TunelabConfig)
            if f.default_factory is not dataclasses.MISSING and isinstance(f.default_factory(), list)}


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_axes(overrides: list[str]) -> tuple[list[Axis], list[str]]:
    """(swept axes, fixed key=value overrides)."""
    axes, fixed, lists = [], [], list_keys()
    for pair in overrides:
        if "=" not in pair:
            raise TunelabError(f"{pair!r} is not key=value", where="command line",
                               fix="write sweeps as key=v1,v2 (e.g. learning_rate=1e-4,2e-4) and fixed values as key=v")
        key, raw = (s.strip() for s in pair.split("=", 1))
        values = [v.strip() for v in raw.split(";" if key in lists else ",")]
        bounds = raw.split(":")
        if len(values) == 1 and len(bounds) == 2 and None not in (lo := _number(bounds[0]), hi := _number(bounds[1])):
            if not lo < hi:
                raise TunelabError(f"the range {raw} of {key} is empty", where=pair, fix="write key=low:high, low < high")
            axes.append(Axis(key, bounds, lo, hi))
        elif len(values) > 1:
            if "" in values or len(set(values)) < len(values):
                raise TunelabError(f"{key} lists an empty or repeated value ({raw})", where=pair,
                                   fix=f"write distinct values: {key}=v1,v2")
            axes.append(Axis(key, values))
        else:
            fixed.append(f"{key}={raw}")
    keys = [a.key for a in axes] + [f.split("=", 1)[0] for f in fixed]
    twice = {k for k in keys if keys.count(k) > 1}
    if twice:
        raise TunelabError(f"{', '.join(sorted(twice))} given twice", where="command line", fix="give each key once")
    return axes, fixed


def plan_trials(axes: list[Axis], samples: int | None, seed: int) -> list[dict[str, str]]:
    """The assignments to train: the grid, or `samples` of it (ranges: `samples` draws)."""
    if not axes:
        raise TunelabError("nothing to sweep: no key has several values", where="command line",
                           fix="e.g. tunelab sweep cfg.yaml learning_rate=1e-4,2e-4 lora_rank=8,16")
    ranged = [a.key for a in axes if a.low is not None]
    if samples is None:
        if ranged:
            raise TunelabError(f"{', '.join(ranged)}: a range lo:hi needs random search", where="command line",
                               fix="add --samples N (N trials drawn from the ranges), or list the values: key=v1,v2")
        return [dict(zip([a.key for a in axes], combo)) for combo in itertools.product(*(a.values for a in axes))]
    if samples < 1:
        raise TunelabError(f"--samples must be >= 1, got {samples}", where="--samples", fix="e.g. --samples 8")
    rng = random.Random(seed)
    if not ranged:  # distinct points of the grid
        grid = list(itertools.product(*(a.values for a in axes)))
        return [dict(zip([a.key for a in axes], combo)) for combo in rng.sample(grid, min(samples, len(grid)))]
    drawn: list[dict[str, str]] = []
    for _ in range(samples * 20):  # draws from a range almost never repeat; a tiny grid might
        point = {a.key: a.draw(rng) for a in axes}
        if point not in drawn:
            drawn.append(point)
        if len(drawn) == samples:
            break
    return drawn


def trial_name(assignment: dict[str, str]) -> str:
    """learning_rate-2e-4_lora_rank-8: readable, and safe as a folder name."""
    return "_".join(re.sub(r"[^A-Za-z0-9._+-]+", "+", f"{k}-{v}").strip("+") for k, v in assignment.items())


def check_trials(config: str | None, fixed: list[str], trials: list[dict[str, str]], metric: str) -> TunelabConfig:
    """Every trial's config through our own checks before anything trains; the first trial's config."""
    configs = []
    for trial in trials:
        try:
            configs.append(load_config(config, fixed + [f"{k}={v}" for k, v in trial.items()]))
        except TunelabError as exc:
            raise TunelabError(exc.what, where=f"{exc.where} (trial {trial_name(trial)})", fix=exc.fix) from None
    first = configs[0]
    if metric != "loss" and not metric.startswith("eval_"):
        raise TunelabError(f"--metric {metric} is not a logged metric name", where="--metric",
                           fix="use loss, eval_loss, eval_perplexity or a task metric such as eval_slot_f1")
    if metric.startswith("eval_") and first.eval_strategy == "no":
        raise TunelabError(f"--metric {metric} needs evaluations, but eval_strategy is no", where="--metric",
                           fix="set eval_strategy=steps with val_size=0.1 (or eval_dataset), or use --metric loss")
    return first


def default_sweep_dir(cfg: TunelabConfig) -> Path:
    return Path(cfg.output_dir.rstrip("/") + "-sweep")


def load_record(sweep_dir: Path, config: str | None, fixed: list[str]) -> dict:
    """sweep.json of an earlier run of this sweep (same config and fixed overrides), or a new one."""
    record = read_sweep(sweep_dir)
    if record is None:
        if sweep_dir.is_dir() and any(sweep_dir.iterdir()):
            raise TunelabError(f"{sweep_dir} already holds files and no {SWEEP_FILE}", where="-o",
                               fix="pick a new or empty folder for the sweep (-o SWEEP_DIR)")
        return {"config": config, "fixed": fixed, "trials": []}
    if (record.get("config"), record.get("fixed")) != (config, fixed):
        raise TunelabError(f"{sweep_dir} holds a sweep of another config ({record.get('config')} "
                           f"{' '.join(record.get('fixed') or [])})", where=str(sweep_dir / SWEEP_FILE),
                           fix="resume it with the same config and fixed key=value overrides, or pick another -o")
    return record


def run_sweep(config: str | None, overrides: list[str], *, samples: int | None = None, seed: int = 0,
              metric: str = "eval_loss", sweep_dir: Path | None = None, launcher=start_train) -> int:
    axes, fixed = parse_axes(overrides)
    trials = plan_trials(axes, samples, seed)
    first = check_trials(config, fixed, trials, metric)
    sweep_dir = Path(sweep_dir) if sweep_dir else default_sweep_dir(first)
    record = load_record(sweep_dir, config, fixed)
    record.update(metric=metric, samples=samples, seed=seed,
                  axes={a.key: (f"{a.low}:{a.high}" if a.low is not None else a.values) for a in axes})
    known = {t["name"] for t in record["trials"]}
    for trial in trials:
        if trial_name(trial) not in known:
            record["trials"].append({"name": trial_name(trial), "overrides": trial, "status": "pending"})
    def save() -> None:
        write_json_atomic(sweep_dir / SWEEP_FILE, record)

    sweep_dir.mkdir(parents=True, exist_ok=True)
    save()

    todo = []
    for trial in record["trials"]:
        if is_finished(sweep_dir / trial["name"]):
            trial["status"] = "finished"
            print(f"{trial['name']}: finished earlier, skipped", file=sys.stderr)
        else:
            todo.append(trial)
    save()
    gpus = visible_gpus()
    slots = gpus if len(gpus) > 1 and first.nproc_per_node <= 1 else [None]
    print(f"sweep {sweep_dir}: {len(record['trials'])} trials, {len(todo)} to train"
          + (f", one per GPU on {len(slots)} GPUs" if slots[0] is not None else ", one after another"), file=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # a scheduler's stop: as Ctrl-C
    try:
        _train_all(todo, slots, config, fixed, sweep_dir, save, launcher)
    finally:
        signal.signal(signal.SIGTERM, previous)
        save()
    return _finish(record, sweep_dir, metric)


def _trial_overrides(trial: dict, fixed: list[str], run_dir: Path) -> list[str]:
    from tunelab.train.checkpoint import list_checkpoints

    resume = ["resume_from_checkpoint=latest"] if list_checkpoints(run_dir) else ["overwrite_output_dir=true"]
    return fixed + [f"{k}={v}" for k, v in trial["overrides"].items()] + [f"output_dir={run_dir}"] + resume


def _train_all(todo: list[dict], slots: list, config, fixed, sweep_dir: Path, save, launcher) -> None:
    """Keep every slot (GPU, or the one CPU/GPU) busy until every trial has run."""
    running: dict = {}  # slot -> (trial, process)
    queue = list(todo)
    try:
        while queue or running:
            for slot in [s for s in slots if s not in running]:
                if not queue:
                    break
                trial = queue.pop(0)
                run_dir = sweep_dir / trial["name"]
                log = sweep_dir / "logs" / f"{trial['name']}.log"
                process = launcher(config, _trial_overrides(trial, fixed, run_dir), log, gpu=slot)
                trial.update(status="running", pid=process.pid, returncode=None, log=str(log),
                             gpu=slot, started=time.time())
                running[slot] = (trial, process)
                save()
                print(f"{trial['name']}: training (pid {process.pid}{f', GPU {slot}' if slot else ''}; "
                      f"log {log})", file=sys.stderr)
            time.sleep(POLL_SECONDS if running else 0)
            for slot, (trial, process) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[slot]
                _ended(trial, process.returncode, sweep_dir)
                save()
    except KeyboardInterrupt:
        # Each child checkpoints on SIGTERM as on Ctrl-C (train/loop.py), and SIGTERM reaches it even
        # where a shell started us with SIGINT ignored; the same command later resumes them.
        print("interrupted: the running trials save a checkpoint and stop", file=sys.stderr)
        for trial, process in running.values():
            process.send_signal(signal.SIGTERM)
        for trial, process in running.values():
            _ended(trial, process.wait(), sweep_dir)
        raise


def _raise_interrupt(*_):
    raise KeyboardInterrupt


def _ended(trial: dict, returncode: int, sweep_dir: Path) -> None:
    minutes = (time.time() - trial.get("started", time.time())) / 60
    finished = returncode == 0 and is_finished(sweep_dir / trial["name"])
    trial.update(returncode=returncode, status="finished" if finished else "failed", ended=time.time())
    if finished:
        print(f"{trial['name']}: finished in {minutes:.1f} min", file=sys.stderr)
    else:
        why = error_text(Path(trial["log"])) or f"exit code {returncode}; see {trial['log']}"
        trial["error"] = why
        print(f"{trial['name']}: failed after {minutes:.1f} min: {why}", file=sys.stderr)


def _finish(record: dict, sweep_dir: Path, metric: str) -> int:
    from tunelab.board.compare import compare_runs, format_ranking
    from tunelab.train.runlog import LOG_NAME

    done = [sweep_dir / t["name"] for t in record["trials"] if (sweep_dir / t["name"] / LOG_NAME).is_file()]
    failed = [t["name"] for t in record["trials"] if t["status"] != "finished"]
    if done:
        summaries, report = compare_runs(done, sweep_dir, metric)
        print(format_ranking(summaries, metric, report))
    if failed:
        print(f"{len(failed)} trial(s) did not finish: {', '.join(failed)}; run the same command again to "
              "resume them", file=sys.stderr)
        return 1
    return 0


def run(args) -> int:
    from tunelab.train.cli import split_args

    config, overrides = split_args(args.args)
    return run_sweep(config, overrides, samples=args.samples, seed=args.seed, metric=args.metric,
                     sweep_dir=Path(args.output_dir) if args.output_dir else None)

