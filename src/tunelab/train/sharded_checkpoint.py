"""Sharded checkpoints of FSDP runs through torch.distributed.checkpoint (DCP); the atomic
folder every rank writes into, which DeepSpeed's checkpoints share (train/deepspeed.py).

    checkpoint-STEP/
      dcp/                   trainable weights + optimizer state, one file per rank (DCP)
                             (DeepSpeed: deepspeed/, its engine's own checkpoint)
      scheduler.pt           rank 0
      rng_state_rankR.pt     every rank's RNG
      trainer_state.json     the loop's position (written last: marks the folder complete)
      adapter_model.safetensors ...  LoRA: the consolidated PEFT adapter, usable as is

Atomic as the single-process checkpoints are: every rank writes into one temporary
folder, and rank 0 renames it into place after a barrier. DCP stores tensors by name
with their global shapes, so a checkpoint written by N processes loads on M processes,
one included (then without any process group: `tunelab train` on one device resumes it).
Everything loaded here goes through `torch.load(weights_only=True)` or DCP.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.train.checkpoint import TrainerState, checkpoint_path, restore_rng_state, rng_state
from tunelab.train.distributed import Dist


def is_sharded(path: Path) -> bool:
    return (Path(path) / "dcp").is_dir()


def _trainable(model) -> dict:
    """The trainable weights by name (under FSDP their local shards, as DTensors). Not the
    `model.state_dict()` DCP's helpers would read: a quantized base (QLoRA) adds its quantization
    constants there (`weight.absmax`, ...) under names they cannot map back to parameters."""
    # The state_dict call runs FSDP2's pre-save hooks, which put every group's shards back in place:
    # the root and the last layer keep their weights gathered after a forward (an evaluation's).
    model.state_dict()
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _states(model, optimizer) -> dict:
    """What a checkpoint holds, keyed as DCP stores it: the trainable weights (which DCP loads in
    place) and the optimizer state. Frozen weights are the base model's, reloaded from its folder."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = {"model": _trainable(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return state


def save_sharded_checkpoint(run_dir: Path, model, optimizer, scheduler, state: TrainerState, dist: Dist,
                            extra_save=None) -> Path:
    """Write `run_dir/checkpoints/checkpoint-STEP` from every rank; returns its path.

    `extra_save(folder)` runs on every rank (it may gather weights) and writes on rank 0.
    """
    import torch.distributed.checkpoint as dcp

    def write_shards(folder: Path) -> None:
        dcp.save(_states(model, optimizer), checkpoint_id=str(folder / "dcp"))

    return save_rank_checkpoint(run_dir, scheduler, state, dist, write_shards, extra_save)


def save_rank_checkpoint(run_dir: Path, scheduler, state: TrainerState, dist: Dist, write_shards,
                         extra_save=None) -> Path:
    """The checkpoint every rank writes a part of (FSDP's DCP shards, DeepSpeed's ZeRO partitions):
    `write_shards(folder)` on every rank, then each rank's RNG, the scheduler and the loop state,
    all into one temporary folder that rank 0 renames into place once every rank is done."""
    final = checkpoint_path(run_dir, state.global_step)
    tmp = final.with_name(f".{final.name}.sharded-tmp")  # one name every rank agrees on
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    write_shards(tmp)
    torch.save(rng_state(all_devices=False), tmp / f"rng_state_rank{dist.rank}.pt")
    if extra_save is not None:
        extra_save(tmp)
    if dist.is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
    dist.barrier()  # every rank's shards are on disk before the folder is published
    if dist.is_main:
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()
    return final


def load_sharded_checkpoint(path: Path, model, optimizer, scheduler, dist: Dist) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG from a sharded checkpoint, on any number
    of processes; returns the loop state."""
    path = Path(path)
    absent = [n for n in ("dcp", "scheduler.pt", "trainer_state.json") if not (path / n).exists()]
    if absent:
        raise TunelabError(f"{path} is not a complete sharded checkpoint (missing {', '.join(absent)})",
                           fix="point resume_from_checkpoint at a checkpoints/checkpoint-N folder, or 'latest'")
    load_sharded_weights(path, model, optimizer)
    return load_rank_state(path, scheduler, dist)


def load_rank_state(path: Path, scheduler, dist: Dist) -> TrainerState:
    """The scheduler, this rank's RNG and the loop state of a checkpoint every rank wrote."""
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng_state_rank{dist.rank}.pt"
    # Another process count: ranks without their own file continue from rank 0's stream.
    restore_rng_state(torch.load(rng_file if rng_file.exists() else path / "rng_state_rank0.pt",
                                 weights_only=True))
    return TrainerState(**json.loads((path / "trainer_state.json").read_text(encoding="utf-8")))


def load_sharded_weights(path: Path, model, optimizer=None) -> None:
    """The trainable weights (and the optimizer state, if given) of a sharded checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    states = _states(model, optimizer)
    try:
        dcp.load(states, checkpoint_id=str(Path(path) / "dcp"))  # the weights: in place
    except Exception as exc:  # DCP reports a missing key or a shape mismatch as a generic error
        raise TunelabError(f"the sharded checkpoint {path} does not fit this model "
                           f"({str(exc).strip().splitlines()[-1][:300]})", where=str(path),
                           fix="resume with the same model and finetuning settings the run started with") from None
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, states["optim"], options=StateDictOptions(ignore_frozen_params=True))


def consolidated_state(model, dist: Dist, trainable_only: bool) -> dict | None:
    """The full (unsharded) weights on rank 0, in CPU memory; None on the other ranks.
    A collective call: every rank must make it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if trainable_only:
        state = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).cpu()
                 for name, p in _trainable(model).items()}
        return state if dist.is_main else None
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main:
        return None
    # Gathering unties tied weights (embeddings = LM head): keep each shared weight under its first
    # name only, as save_pretrained does for the model's own state.
    first = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            state.pop(name, None)
    return state

