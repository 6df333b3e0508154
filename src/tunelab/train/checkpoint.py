"""Checkpoints that resume exactly and never corrupt the last good one.

A checkpoint folder holds the trainable weights, the optimizer, the scheduler, every
RNG state and the loop's position (epoch, batch within the epoch). It is written to
a temporary folder and renamed into place, so a crash mid-save leaves the previous
checkpoint untouched.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError
from tunelab.io import atomic_path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    """Where the loop is; saved with every checkpoint."""

    global_step: int = 0
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    tokens_seen: int = 0
    best_metric: float | None = None
    best_checkpoint: str | None = None
    evals_without_improvement: int = 0
    log_history: list[dict] = field(default_factory=list)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise TunelabError(f"checkpoint holds weights this model lacks (e.g. {missing[0]})",
                           fix="resume with the same model and finetuning settings the run started with")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"checkpoint-{step}"


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: TrainerState, extra_save=None) -> Path:
    """Write `run_dir/checkpoints/checkpoint-STEP` atomically and return its path.

    `extra_save(folder)` may add user-facing files (e.g. the PEFT adapter) to the folder.
    """
    final = checkpoint_path(run_dir, state.global_step)
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
        if extra_save is not None:
            extra_save(tmp)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG from a checkpoint; return the loop state."""
    path = Path(path)
    needed = ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_state.json"]
    absent = [n for n in needed if not (path / n).exists()]
    if absent:
        raise TunelabError(f"{path} is not a complete tunelab checkpoint (missing {', '.join(absent)})",
                           fix="point resume_from_checkpoint at a checkpoints/checkpoint-N folder, or 'latest'")
    load_trainable_state(model, load_file(path / "trainable.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    restore_rng_state(torch.load(path / "rng_state.pt", weights_only=False))
    return TrainerState(**json.loads((path / "trainer_state.json").read_text(encoding="utf-8")))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (half-written temp folders are ignored)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))
             and (p / "trainer_state.json").exists()]
    return [p for _, p in sorted(found)]


def resolve_resume(run_dir: Path, resume_from: str | None) -> Path | None:
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise TunelabError(f"resume_from_checkpoint=latest but {run_dir}/checkpoints holds no checkpoint",
                               fix="drop resume_from_checkpoint to start fresh, or check output_dir")
        return found[-1]
    path = Path(resume_from)
    if not path.is_dir():
        raise TunelabError(f"checkpoint folder {path} does not exist",
                           fix=f"use resume_from_checkpoint=latest or one of {run_dir}/checkpoints/checkpoint-N")
    return path


def rotate_checkpoints(run_dir: Path, limit: int | None, keep: str | None = None) -> None:
    """Delete the oldest checkpoints beyond `limit`; never the newest, nor `keep` (the best)."""
    if not limit or limit <= 0:
        return
    found = list_checkpoints(run_dir)
    removable = [p for p in found[:-1] if keep is None or p.resolve() != Path(keep).resolve()]
    excess = len(found) - limit
    for path in removable[:max(excess, 0)]:
        shutil.rmtree(path, ignore_errors=True)
