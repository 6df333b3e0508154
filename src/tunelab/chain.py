"""Stage chains: one YAML, several training runs in a row (`tunelab train chain.yaml`).

    model_name_or_path: smollm2-135m-instruct     # keys shared by every stage
    output_dir: runs/chain                        # the parent folder
    eval_sets: {units: units}                     # a stage's name = its held-out validation rows
    stages:
      - {name: units, dataset: a.jsonl, val_size: 0.1}
      - {name: hotel, dataset: b.jsonl, replay: {data: units, fraction: 0.2}, from_previous: adapter}

Each stage is a normal run folder, PARENT/stage-I-NAME, configured by the shared keys, its
own keys on top and the command line's on top of both. Stage I > 1 starts from stage I-1:
its LoRA adapter (`from_previous: adapter`, the default after a LoRA stage; training goes on
in the same adapter) or its merged weights (`from_previous: merged`; after a full or freeze
stage its weights are used as they are). In `replay.data` and `eval_sets` a stage's name
stands for its folder (replay: its training rows; eval sets: its validation rows); a stage
never probes itself or later stages.

PARENT/chain.json records each stage's state, so running the same command again skips the
finished stages and resumes an interrupted one from its latest checkpoint. After each stage
PARENT/forgetting.md tabulates every eval set's numbers at the end of every stage, and
`tunelab report PARENT` draws the stages' curves end to end.

This module sits above every stage, like cli.py: it trains (train), merges (export) and
tabulates (evaluate).
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from tunelab.config import TunelabConfig, build_config, parse_overrides, read_yaml
from tunelab.errors import TunelabError
from tunelab.evaluate.chain_report import CHAIN_FILE
from tunelab.io import write_json_atomic

STAGE_KEYS = ("name", "from_previous")  # keys of a stage that are not config keys
FROM_PREVIOUS = ("adapter", "merged")


@dataclass
class Stage:
    index: int  # 1-based
    name: str
    folder: Path
    values: dict  # the stage's config values (shared < stage < command line), references resolved
    from_previous: str | None  # adapter | merged | None (auto: adapter after LoRA, else the weights)
    cfg: TunelabConfig  # validated; a later stage gets its starting weights at run time
    where: str  # FILE: stages[I] (NAME), for errors


def load_chain(path: str | Path, overrides: list[str] | None = None) -> tuple[Path, list[Stage]]:
    """The parent folder and every stage's validated config, before anything runs."""
    path = Path(path)
    shared = read_yaml(path)
    raw_stages = shared.pop("stages")
    if not isinstance(raw_stages, list) or not raw_stages or not all(isinstance(s, dict) for s in raw_stages):
        raise TunelabError("stages must be a non-empty list of mappings (each a stage's keys)", where=str(path),
                           fix="write stages:\n  - {name: sft, stage: sft, dataset: a.jsonl}\n  - {...}")
    command_line = parse_overrides(overrides or [])
    parent = Path(command_line.get("output_dir", shared.get("output_dir", "runs/chain")))
    names = _stage_names(raw_stages, path)
    stages = []
    for i, (raw, name) in enumerate(zip(raw_stages, names), start=1):
        where = f"{path}: stages[{i}] ({name})"
        stage_keys = {k: v for k, v in raw.items() if k not in STAGE_KEYS}
        for key in ("output_dir", *(("model_name_or_path", "adapter_name_or_path") if i > 1 else ())):
            if key in stage_keys:
                raise TunelabError(f"a stage sets {key}", where=where,
                                   fix="the chain decides it: output_dir is PARENT/stage-I-NAME and a later stage "
                                       "starts from the previous one (from_previous: adapter | merged)")
        folder = parent / f"stage-{i}-{name}"
        values = {**shared, **stage_keys, **{k: v for k, v in command_line.items() if k != "output_dir"},
                  "output_dir": str(folder)}
        values = _resolve_stage_names(values, names, folders=[parent / f"stage-{j}-{n}" for j, n in
                                                              enumerate(names, start=1)], index=i, where=where)
        from_previous = raw.get("from_previous")
        if from_previous is not None and (i == 1 or from_previous not in FROM_PREVIOUS):
            raise TunelabError(f"from_previous={from_previous!r}" + (" in the first stage" if i == 1 else ""),
                               where=where, fix="from_previous is adapter or merged, in stages after the first")
        stages.append(Stage(i, name, folder, values, from_previous, build_config(values, where=where), where))
    for prev, stage in itertools.pairwise(stages):
        _start_point(prev, stage)  # refuse impossible hand-overs before the first stage trains
    return parent, stages


def _stage_names(raw_stages: list[dict], path: Path) -> list[str]:
    names = []
    for i, raw in enumerate(raw_stages, start=1):
        name = str(raw.get("name") or raw.get("stage") or "sft")
        if name in names and not raw.get("name"):
            name = f"{name}{i}"  # sft, sft2: unnamed stages of one kind stay apart
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in names:
            raise TunelabError(f"stage name {name!r} is " + ("used twice" if name in names else "not a folder name"),
                               where=f"{path}: stages[{i}]", fix="give each stage a unique name of letters, "
                                                                 "digits, _ . -")
        names.append(name)
    return names


def _resolve_stage_names(values: dict, names: list[str], folders: list[Path], index: int, where: str) -> dict:
    """A stage's name in replay.data / eval_sets means its folder; a stage does not probe itself or later ones."""
    position = {name: j for j, name in enumerate(names, start=1)}
    values = dict(values)
    replay = values.get("replay")
    if isinstance(replay, dict) and replay.get("data") in position:
        j = position[replay["data"]]
        if j >= index:
            raise TunelabError(f"replay names stage {replay['data']}, which runs at or after this one", where=where,
                               fix="replay an earlier stage's data")
        values["replay"] = {**replay, "data": str(folders[j - 1])}
    if isinstance(values.get("eval_sets"), dict):
        values["eval_sets"] = {name: str(folders[position[ref] - 1]) if ref in position else ref
                               for name, ref in values["eval_sets"].items()
                               if not (ref in position and position[ref] >= index)}
    return values


def _start_point(prev: Stage, stage: Stage) -> dict:
    """The keys that make `stage` start from `prev`'s result (the merge itself happens at run time)."""
    lora = prev.cfg.finetuning_type == "lora"
    how = stage.from_previous or ("adapter" if lora else "merged")
    where = stage.where
    if how == "adapter":
        if not lora:
            raise TunelabError(f"from_previous=adapter, but stage {prev.name} trained {prev.cfg.finetuning_type} "
                               "weights, not a LoRA adapter", where=where, fix="drop from_previous (its weights are "
                                                                               "used as they are)")
        if stage.cfg.finetuning_type != "lora":
            raise TunelabError(f"from_previous=adapter continues {prev.name}'s LoRA adapter, but this stage trains "
                               f"finetuning_type={stage.cfg.finetuning_type}", where=where,
                               fix="set from_previous: merged (fold the adapter in first, then train)")
        return {"model_name_or_path": prev.cfg.model_name_or_path, "adapter_name_or_path": str(prev.folder)}
    if lora:
        return {"model_name_or_path": str(prev.folder / "merged"), "adapter_name_or_path": None}
    return {"model_name_or_path": str(prev.folder), "adapter_name_or_path": None}


# --- running ------------------------------------------------------------------------------

def run_chain(path: str | Path, overrides: list[str] | None = None, eval_callbacks=None) -> list[Path]:
    """Train every stage not yet done, in order; returns the stage folders.

    `eval_callbacks(cfg)` gives a stage's task-metric callbacks (the CLI lends evaluate's)."""
    from tunelab.evaluate.chain_report import write_forgetting
    from tunelab.train.checkpoint import list_checkpoints
    from tunelab.train.cli import run_training

    parent, stages = load_chain(path, overrides)
    if any(s.cfg.nproc_per_node > 1 for s in stages):
        raise TunelabError("chains run on one process for now", where=str(path),
                           fix="drop nproc_per_node, or run each stage with its own `tunelab train --nproc N`")
    parent.mkdir(parents=True, exist_ok=True)
    record = _read_record(parent, stages)
    for prev, stage in zip([None, *stages], stages):
        entry = record["stages"][stage.index - 1]
        if entry["status"] == "done":
            print(f"stage {stage.index} ({stage.name}): done, skipped ({stage.folder})", file=sys.stderr)
            continue
        values = dict(stage.values)
        if prev is not None:
            values.update(_start_point(prev, stage))
            if values["model_name_or_path"] == str(prev.folder / "merged"):
                _merge(prev)
        if entry["status"] == "running":  # interrupted: from its checkpoint, or anew if it saved none
            values.update({"resume_from_checkpoint": "latest"} if list_checkpoints(stage.folder)
                          else {"overwrite_output_dir": True})
        cfg = build_config(values, where=stage.where)
        entry.update(status="running", model_name_or_path=cfg.model_name_or_path,
                     adapter_name_or_path=cfg.adapter_name_or_path)
        write_json_atomic(parent / CHAIN_FILE, record)
        print(f"stage {stage.index} of {len(stages)} ({stage.name}, {cfg.stage}) -> {stage.folder}", file=sys.stderr)
        run_training(cfg, eval_callbacks(cfg) if eval_callbacks and cfg.eval_task else [])
        entry["status"] = "done"
        write_json_atomic(parent / CHAIN_FILE, record)
        table = write_forgetting(parent)
        if table:
            print(table, file=sys.stderr)
    return [s.folder for s in stages]


def _read_record(parent: Path, stages: list[Stage]) -> dict:
    """chain.json: each stage's state, kept across runs of the same chain (by folder)."""
    import json

    previous = {}
    if (parent / CHAIN_FILE).is_file():
        try:
            previous = {s["folder"]: s for s in json.loads((parent / CHAIN_FILE).read_text())["stages"]}
        except (ValueError, KeyError, TypeError):
            previous = {}
    return {"stages": [{"index": s.index, "name": s.name, "folder": str(s.folder), "stage": s.cfg.stage,
                        "from_previous": s.from_previous,
                        "status": previous.get(str(s.folder), {}).get("status", "pending")} for s in stages]}


def _merge(prev: Stage) -> None:
    """prev's adapter folded into its base, once (kept in PREV/merged for a resumed chain)."""
    from tunelab.export.merge import merge_adapter

    out = prev.folder / "merged"
    if (out / "config.json").is_file():
        return
    base = prev.cfg.model_name_or_path
    print(f"merging {prev.folder} into {base} -> {out}", file=sys.stderr)
    merge_adapter(base, prev.folder, out)
