"""Checkpoints that resume exactly, never corrupt the last good one, and never run code.

A checkpoint folder holds the trainable weights, the optimizer, the scheduler, every
RNG state and the loop's position (epoch, batch within the epoch). It is written to
a temporary folder, fsynced and renamed into place, so a crash mid-save leaves the
previous checkpoint untouched.

Every `.pt` file is read with `torch.load(weights_only=True)`: tensors and plain
containers only, so a shared checkpoint cannot execute code when it is resumed. The
RNG states are stored as tensors and lists for that reason (no numpy objects).
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import sys
import zipfile
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
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (streaming: the blocks
    # already trained on are batch_in_epoch x per_device_train_batch_size; a resume skips them)
    tokens_seen: int = 0
    best_metric: float | None = None
    best_checkpoint: str | None = None
    evals_without_improvement: int = 0
    log_history: list[dict] = field(default_factory=list)
    log_window: dict = field(default_factory=dict)  # sums of the logging window still open (exact resume)


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


def rng_state(all_devices: bool = True) -> dict:
    """Every RNG state as tensors, ints and lists: loadable with weights_only=True.

    `all_devices=False`: the current CUDA device's state only (one process a GPU: asking for every
    device's would create a CUDA context on each GPU of the host)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all() if all_devices else torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.tolist() if isinstance(mt, torch.Tensor) else mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # ndarray: an older checkpoint
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if isinstance(state["cuda"], torch.Tensor):  # the current device's (rng_state(all_devices=False))
            torch.cuda.set_rng_state(state["cuda"])
        else:
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


CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_state.json")
SHARDED_MARKERS = {"dcp": "dcp/.metadata", "deepspeed": "deepspeed/tunelab.json"}  # folder -> the file it needs
RESUME_FIX = "resume from another checkpoints/checkpoint-N folder, or 'latest' (the newest intact one)"


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG from a checkpoint; return the loop state."""
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem:
        raise TunelabError(f"{path} is not a usable tunelab checkpoint: {problem}", fix=RESUME_FIX)
    state = _read_state(path / "trainer_state.json")
    load_trainable_state(model, load_file(path / "trainable.safetensors"))
    optimizer.load_state_dict(_safe_torch_load(path / "optimizer.pt"))
    scheduler.load_state_dict(_safe_torch_load(path / "scheduler.pt"))
    restore_rng_state(_safe_torch_load(path / "rng_state.pt", allow=_NUMPY_ARRAYS))
    return state


# Checkpoints of older tunelab versions pickled numpy's RNG state as an ndarray: allow
# rebuilding plain arrays (data, no code) so they still resume.
_NUMPY_ARRAYS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np._core.multiarray._reconstruct]


def _safe_torch_load(path: Path, allow: list | None = None):
    """torch.load of tensors and plain containers only: a pickled object is refused, never run."""
    try:
        with torch.serialization.safe_globals(allow or []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
        raise TunelabError(f"{path.name} holds objects other than tensors and plain data, which tunelab "
                           f"refuses to unpickle (they could run code): {first}", where=str(path.parent),
                           fix="resume only from checkpoints tunelab wrote; "
                               "start over without resume_from_checkpoint if you do not trust this one") from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise TunelabError(f"{path.name} cannot be read ({exc})", where=str(path.parent), fix=RESUME_FIX) from None


def _read_state(path: Path) -> TrainerState:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        return TrainerState(**values)
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise TunelabError(f"{path.name} is damaged ({exc})", where=str(path.parent), fix=RESUME_FIX) from None


def checkpoint_problem(path: Path) -> str | None:
    """What makes `path` unusable as a checkpoint (missing or truncated files), or None.

    Cheap structural checks only (no unpickling): every file is present, the state JSON
    parses, the safetensors header matches the file size, the `.pt` zip archives pass
    their CRC checks. A torn write or a truncated copy fails one of them.
    """
    path = Path(path)
    if not path.is_dir():
        return "the folder does not exist"
    # FSDP (train/sharded_checkpoint.py) and DeepSpeed (train/deepspeed.py) have their own layouts.
    sharded = next((marker for folder, marker in SHARDED_MARKERS.items() if (path / folder).is_dir()), None)
    required = (sharded, "scheduler.pt", "trainer_state.json") if sharded else CHECKPOINT_FILES
    absent = [n for n in required if not (path / n).is_file()]
    if absent:
        return f"missing {', '.join(absent)}"
    try:
        _read_state(path / "trainer_state.json")
    except TunelabError as exc:
        return exc.what
    if sharded:
        return None
    if not _safetensors_intact(path / "trainable.safetensors"):
        return "trainable.safetensors is truncated or damaged"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt"):
        try:
            with zipfile.ZipFile(path / name) as archive:
                if archive.testzip() is not None:
                    return f"{name} is damaged"
        except (zipfile.BadZipFile, OSError, EOFError):
            return f"{name} is truncated or damaged"
    return None


def _safetensors_intact(path: Path) -> bool:
    """The header parses and the data it describes fits the file exactly."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return False
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return 8 + n + end == size
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


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
        for path in reversed(found):  # newest first; a damaged one (e.g. a torn copy) is passed over
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            print(f"warning: skipping {path}: {problem}", file=sys.stderr)
        raise TunelabError(f"no intact checkpoint in {run_dir}/checkpoints (all {len(found)} are damaged)",
                           fix="drop resume_from_checkpoint to start fresh")
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
