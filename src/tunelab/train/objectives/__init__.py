"""Training stages as plug-ins: one objective class per stage, registered in `STAGES`.

The loop (`loop.py`) is the same for every stage; the stage's objective says what it
trains on and what a step computes:

    rows   = objective.load_data()                -> (train rows, eval rows)
    objective.setup(model, device)                 once, after the model is ready (a reference, a head)
    batch  = objective.collate(rows)               -> dict of tensors
    weight = objective.weight(batch)               -> what the loss is averaged over
    total, metrics = objective.loss(model, batch)  -> summed loss (+ summed extra metrics)

The loop divides the summed loss by the summed weight of the whole optimizer step, so
accumulation gives the loss of one big batch. Online stages (grpo, ppo) also have
`rollout(model, micro_rows)`: the loop hands them the step's prompts and trains on what
they return (sampled, scored completions). A stage with extra weights to keep (the reward
model's head) has `save(model, folder)`.

Each class declares what it reads, and `check_stage(cfg)` refuses the rest before a run
starts: `keys` (stage-specific keys; one another stage reads but this one does not must
keep its default) and `speed_paths` (of packing, padding_free, fused_loss: a path it cannot
take must not be forced on; left auto it stays off).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from tunelab.config import CHOICES, TunelabConfig
from tunelab.errors import TunelabError
from tunelab.train.objectives.preference import (
    DPOObjective,
    KTOObjective,
    ORPOObjective,
    PreferenceObjective,
    SimPOObjective,
)
from tunelab.train.objectives.rl import GRPOObjective, PPOObjective
from tunelab.train.objectives.rm import RMObjective
from tunelab.train.objectives.sft import PTObjective, SFTObjective

SPEED_PATHS = ("packing", "padding_free", "fused_loss")


class Objective(Protocol):
    stage: str
    keys: frozenset[str]  # the stage-specific config keys this stage reads
    speed_paths: frozenset[str]  # the SPEED_PATHS it can take
    perplexity: bool  # its validation loss is a per-token NLL (eval_perplexity is logged)
    trains_on_conversations: bool  # its validation split holds conversations task metrics can generate on
    sharded: bool  # runs under FSDP
    chat: bool  # its records are rendered with the chat template (pt: plain text)
    # optional: multi_process = False (one process only), rollout(model, micro_rows) and
    # updates_per_step (online stages), validate(model, rows), save(model, folder)

    def __init__(self, cfg: TunelabConfig, tokenizer): ...
    @staticmethod
    def first_sample(cfg: TunelabConfig, tokenizer, template) -> tuple[str, list[int], list[int]]: ...
    def load_data(self) -> tuple[list, list]: ...
    def setup(self, model, device) -> None: ...
    def collate(self, rows: list) -> dict: ...
    def weight(self, batch: dict) -> int: ...
    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]: ...


def _table(*classes) -> dict[str, type]:
    return {cls.stage: cls for cls in classes}


STAGES: dict[str, type] = _table(SFTObjective, PTObjective, DPOObjective, SimPOObjective, ORPOObjective,
                                 KTOObjective, RMObjective, GRPOObjective, PPOObjective)
assert set(STAGES) == set(CHOICES["stage"]), "config.CHOICES['stage'] and the objective table must agree"
# Keys some stage reads and others do not: each stage refuses those it does not read.
STAGE_KEYS = frozenset().union(*(cls.keys for cls in STAGES.values()))


def objective_class(stage: str) -> type:
    return STAGES[stage]


def check_stage(cfg: TunelabConfig) -> None:
    """Refuse a key the stage would ignore, and a speed path it cannot take."""
    cls = objective_class(cfg.stage)
    defaults = TunelabConfig()
    for key in sorted(STAGE_KEYS - cls.keys):
        if getattr(cfg, key) != getattr(defaults, key):
            readers = ", ".join(s for s, c in STAGES.items() if key in c.keys)
            raise TunelabError(f"stage={cfg.stage} does not use {key} (set to {getattr(cfg, key)!r}); "
                               f"only stage {readers} reads it", where="config",
                               fix=f"drop {key}, or train a stage that reads it ({readers})")
    for path in SPEED_PATHS:
        if path not in cls.speed_paths and getattr(cfg, path):
            raise TunelabError(f"{path}=true is not available for stage={cfg.stage}", where="config",
                               fix=f"set {path}=false (or leave it unset): {_why_not(cls, path)}")


def _why_not(cls: type, path: str) -> str:
    if path == "packing":
        return "a row of this stage is scored as a whole (a pair, a prompt and its completions)"
    return "this stage's forward reads per-sequence outputs the fast path does not build"


def restrict_speed(cfg: TunelabConfig, cls: type) -> TunelabConfig:
    """Auto speed paths the stage cannot take are off (check_stage refused them forced on)."""
    off = {p: False for p in ("padding_free", "fused_loss") if p not in cls.speed_paths and getattr(cfg, p) is None}
    return dataclasses.replace(cfg, **off) if off else cfg


__all__ = ["STAGES", "Objective", "PreferenceObjective", "SFTObjective", "check_stage", "objective_class",
           "restrict_speed"]
