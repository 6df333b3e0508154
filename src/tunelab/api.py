"""The Python API: `from tunelab import train, evaluate, merge, load_config`.

    from tunelab import train, evaluate
    result = train("examples/quickstart.yaml", data=[{"messages": [...]}, ...], max_steps=50)
    result.metrics, result.run_dir      # the run folder holds what `tunelab train` writes
    model, tokenizer = result.model, result.tokenizer   # the trained model, loaded on first use
    scores = evaluate(result, data="test.jsonl")

Each function does what its command does (the same code: train.cli.run_training, `tunelab eval`,
export.merge), with keyword arguments instead of flags. This module sits above every stage,
like cli.py, so it may import all of them; `import tunelab` loads it only on first use.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import TunelabConfig, build_config, load_config
from tunelab.errors import TunelabError
from tunelab.io import write_jsonl_atomic

__all__ = ["train", "evaluate", "merge", "load_config", "TrainResult", "EvalResult"]

Data = str | os.PathLike | Iterable  # file(s) / hub ids, a list of dicts, a datasets.Dataset


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict  # global_step, train_loss, the last evaluation's eval_* (as in the model card)
    config: TunelabConfig
    global_step: int
    stopped_early: bool = False
    _loaded: tuple | None = field(default=None, repr=False)

    @property
    def model(self):
        """The trained model as saved (base + LoRA adapter, or the full weights), loaded on first use."""
        return self._load()[0]

    @property
    def tokenizer(self):
        """The saved tokenizer, with the chat template training used."""
        return self._load()[1]

    def _load(self) -> tuple:
        if self._loaded is None:
            from tunelab.model.adapters import adapter_tokenizer, load_adapter
            from tunelab.model.loader import load_model

            cfg = self.config
            if cfg.finetuning_type == "lora":
                model = load_adapter(load_model(cfg.model_name_or_path, device=cfg.device), self.run_dir)
                tokenizer = adapter_tokenizer(cfg.model_name_or_path, self.run_dir)
            else:
                model = load_model(self.run_dir, device=cfg.device)
                tokenizer = adapter_tokenizer(str(self.run_dir), None)
            self._loaded = (model.eval(), tokenizer)
        return self._loaded


@dataclass
class EvalResult:
    scores: dict  # metric -> value, as in scores.json
    output_dir: Path  # predictions.jsonl, scores.json / scores.md, the error breakdown

    @property
    def predictions(self) -> list[dict]:
        from tunelab.evaluate.runner import read_predictions

        return read_predictions(self.output_dir / "predictions.jsonl")


def train(config: str | os.PathLike | dict | TunelabConfig | None = None, data: Data | None = None, *,
          eval_data: Data | None = None, eval_callbacks: list | None = None, **overrides) -> TrainResult:
    """Train as `tunelab train` does and return the run.

    `config`: a YAML path, a dict of keys, or a TunelabConfig; `overrides`: any config key
    (`max_steps=50`). `data` / `eval_data`: file paths or hub ids, a list of dicts in any
    supported format, or a `datasets.Dataset`; records in memory are written to
    RUN_DIR/data/*.jsonl, so the run folder holds what it trained on (and can be resumed).
    `eval_task` gets its task-metric callback as on the command line.
    """
    cfg = _config(config, overrides)
    run_dir = Path(cfg.output_dir)
    if data is not None or eval_data is not None:
        from tunelab.train.checkpoint import resolve_resume
        from tunelab.train.loop import prepare_run_dir

        # Claim the folder first (the same checks as training), then put the records in it.
        prepare_run_dir(run_dir, cfg, resuming=resolve_resume(run_dir, cfg.resume_from_checkpoint) is not None)
        changes = {}
        if data is not None:
            changes["dataset"] = _data_paths(data, run_dir, "train")
        if eval_data is not None:
            changes["eval_dataset"] = _data_paths(eval_data, run_dir, "eval")
        cfg = dataclasses.replace(cfg, **changes)
    if eval_callbacks is None:
        from tunelab.evaluate.in_training import task_metric_callbacks

        eval_callbacks = task_metric_callbacks(cfg) if cfg.eval_task else []
    from tunelab.evaluate.tasks import lend_reward
    from tunelab.train.cli import run_training
    from tunelab.train.runlog import LOG_NAME, read_log
    from tunelab.train.tracking import final_metrics

    run = run_training(cfg, eval_callbacks, lend_reward)  # reward: TASK or judge, as the CLI lends it
    log = run.output_dir / LOG_NAME
    return TrainResult(Path(run.output_dir), final_metrics(read_log(log) if log.exists() else []), cfg,
                       run.global_step, run.stopped_early)


def evaluate(model: str | os.PathLike | TrainResult = "smollm2-135m-instruct", data: Data | None = None, *,
             adapter: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None,
             **options) -> EvalResult:
    """Generate on `data` and score it as `tunelab eval` does; returns the scores.

    `model`: a model name, or a training run (a TrainResult or a LoRA run folder: its base
    and adapter are used). `options`: the command's flags as keywords, e.g. task="hotel",
    metrics="bleu,rouge", limit=20, max_new_tokens=128, compare_base=True.
    """
    from tunelab.evaluate import cli as eval_cli

    model, adapter = _model_and_adapter(model, adapter)
    out = Path(output_dir) if output_dir else (Path(adapter) / "eval" if adapter else Path("eval_out"))
    data_file = _data_paths(data, out, "eval_data")[0] if data is not None else None
    argv = ["eval", "--model", str(model), "--output-dir", str(out)]
    argv += ["--adapter", str(adapter)] if adapter else []
    argv += ["--data", data_file] if data_file else []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (None, False):
            argv += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    parser = argparse.ArgumentParser(prog="tunelab")
    eval_cli.register(parser.add_subparsers())
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        raise TunelabError(f"evaluate() got options `tunelab eval` does not take: {sorted(options)}",
                           where="evaluate()", fix="see `tunelab eval --help` for the options (as keywords: "
                                                   "max_new_tokens=128, task='hotel')") from None
    eval_cli.run_eval(args)
    results = out / ("comparison.json" if args.compare_base else "scores.json")
    saved = json.loads(results.read_text(encoding="utf-8"))
    return EvalResult(saved.get("scores") or {k: saved[k] for k in ("base", "tuned")}, out)


def merge(adapter: str | os.PathLike | TrainResult, out_dir: str | os.PathLike, *, model: str | None = None,
          **options):
    """Fold a LoRA adapter into its base as `tunelab merge` does; `model` defaults to the base the
    adapter was trained on. Returns the MergeReport (`.summary()` says what was checked)."""
    from tunelab.export.merge import merge_adapter

    base, adapter_dir = _model_and_adapter(adapter, None)
    if adapter_dir is None:
        raise TunelabError(f"{adapter} is not a LoRA adapter folder", where="merge()",
                           fix="give a run trained with finetuning_type=lora, or its folder")
    return merge_adapter(model or base, adapter_dir, out_dir, **options)


# --- helpers -------------------------------------------------------------------------------

def _config(config, overrides: dict) -> TunelabConfig:
    if isinstance(config, TunelabConfig):
        return build_config({**config.to_dict(), **overrides}) if overrides else config
    if isinstance(config, dict):
        return build_config({**config, **overrides})
    if config is None or isinstance(config, (str, os.PathLike)):
        return load_config(config, overrides)
    raise TunelabError(f"config is a {type(config).__name__}", where="train()",
                       fix="give a YAML path, a dict of config keys, or a TunelabConfig")


def _data_paths(data: Data, folder: Path, name: str) -> list[str]:
    """File paths / hub ids as they are; records in memory written to FOLDER/data/NAME.jsonl."""
    if isinstance(data, (str, os.PathLike)):
        return [str(data)]
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, (str, os.PathLike)) for d in data):
        return [str(d) for d in data]
    if isinstance(data, dict) or not isinstance(data, Iterable):
        raise TunelabError(f"data is a {type(data).__name__}", where="data",
                           fix="give file paths, a list of dicts (records), or a datasets.Dataset")
    path = folder / "data" / f"{name}.jsonl"

    def rows():
        for i, row in enumerate(data, 1):
            if not isinstance(row, dict):
                raise TunelabError(f"record {i} is a {type(row).__name__}, not a dict", where=f"{name} data",
                                   fix="give each record as a dict, e.g. {'messages': [...]}")
            yield row

    if write_jsonl_atomic(path, rows()) == 0:
        raise TunelabError("the data holds no records", where=f"{name} data", fix="give at least one record")
    return [str(path)]


def _model_and_adapter(model, adapter) -> tuple[str, Any]:
    """(base model, adapter folder) of a model name, a TrainResult or a LoRA run / adapter folder."""
    from tunelab.model.adapters import read_base

    folder = model.run_dir if isinstance(model, TrainResult) else Path(str(model)).expanduser()
    if adapter is None and (folder / "adapter_config.json").is_file():
        recorded = read_base(folder) or {}
        if not recorded:
            recorded = {"base_model": json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
                        .get("base_model_name_or_path")}
        return recorded["base_model"], folder
    if isinstance(model, TrainResult):  # full fine-tuning: the run folder is the model
        return str(model.run_dir), adapter
    return str(model), adapter
