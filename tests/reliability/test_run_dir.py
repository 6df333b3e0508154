"""Nothing lost: output folders, damaged checkpoints, temporary files, fsync before publishing."""

import os
from pathlib import Path

import pytest
import torch

from tunelab import io
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.train import checkpoint as ckpt
from tunelab.train.loop import RUN_MARKER, prepare_run_dir


def test_empty_output_dir_is_refused():
    with pytest.raises(TunelabError, match="output_dir"):
        load_config(None, {"output_dir": ""})


def test_a_folder_of_other_files_is_never_written_into_or_cleared(tmp_path):
    folder = tmp_path / "project"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "README.md").write_text("mine")
    (folder / "checkpoints" / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        cfg = load_config(None, {"output_dir": str(folder), "overwrite_output_dir": overwrite})
        with pytest.raises(TunelabError, match="not a tunelab run") as info:
            prepare_run_dir(folder, cfg, resuming=False)
        assert "README.md" in str(info.value)
    assert (folder / "README.md").read_text() == "mine" and (folder / "checkpoints" / "keep.txt").exists()
    assert not (folder / RUN_MARKER).exists()


def test_overwrite_output_dir_replaces_a_folder_tunelab_created(tmp_path):
    folder = tmp_path / "run"
    cfg = load_config(None, {"output_dir": str(folder)})
    prepare_run_dir(folder, cfg, resuming=False)  # new folder: marked as a run
    assert (folder / RUN_MARKER).is_file()
    (folder / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (folder / "trainer_log.jsonl").write_text("{}\n")
    with pytest.raises(TunelabError, match="already holds a run"):
        prepare_run_dir(folder, cfg, resuming=False)
    prepare_run_dir(folder, load_config(None, {"output_dir": str(folder), "overwrite_output_dir": True}), False)
    assert not (folder / "checkpoints").exists()


def test_stale_temporary_folders_of_a_killed_run_are_cleaned(tmp_path):
    folder = tmp_path / "run"
    cfg = load_config(None, {"output_dir": str(folder)})
    prepare_run_dir(folder, cfg, resuming=False)
    dead = _dead_pid()
    stale = [folder / f".weights.tmp{dead}.abcd1234", folder / "checkpoints" / f".checkpoint-8.tmp{dead}.x1y2z3w4"]
    live = folder / "checkpoints" / f".checkpoint-9.tmp{os.getpid()}.q1w2e3r4"  # a writer still at work
    for p in [*stale, live]:
        p.mkdir(parents=True)
        (p / "optimizer.pt").write_bytes(b"x" * 1000)
    prepare_run_dir(folder, cfg, resuming=True)
    assert not any(p.exists() for p in stale) and live.exists()


def test_a_killed_data_write_is_cleaned_and_a_folder_moved_aside_is_put_back(tmp_path):
    (tmp_path / ".merged.tunelab-old").mkdir()
    (tmp_path / ".merged.tunelab-old" / "model.safetensors").write_text("old model")
    half_split = tmp_path / f".splits.tmp{_dead_pid()}.a1b2c3d4"  # `data split` killed mid-write
    (half_split / "splits").mkdir(parents=True)
    io.write_text_atomic(tmp_path / "other.txt", "x")  # any later write in the folder repairs it
    assert (tmp_path / "merged" / "model.safetensors").read_text() == "old model"
    assert not half_split.exists()


def test_files_and_folders_are_fsynced_before_the_rename_that_publishes_them(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    with io.atomic_path(tmp_path / "out") as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(b"w")
    rename = events.index(("replace", str(tmp_path / "out")))
    synced_before = [p for kind, p in events[:rename] if kind == "fsync"]
    assert any(p.endswith("/out/weights.bin") for p in synced_before)
    assert any(p.endswith("/out") for p in synced_before)  # the folder's own entries
    assert ("fsync", str(tmp_path)) in events[rename:]  # the rename itself reaches the disk


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _checkpoints(run_dir: Path, steps):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return [ckpt.save_checkpoint(run_dir, model, optimizer, scheduler, ckpt.TrainerState(global_step=s))
            for s in steps]


@pytest.mark.parametrize("damage", ["truncated optimizer", "empty state", "missing rng", "truncated weights"])
def test_resume_latest_falls_back_past_a_damaged_checkpoint_with_a_warning(tmp_path, capsys, damage):
    older, newest = _checkpoints(tmp_path, [4, 8])
    if damage == "truncated optimizer":
        data = (newest / "optimizer.pt").read_bytes()
        (newest / "optimizer.pt").write_bytes(data[: len(data) // 2])
    elif damage == "empty state":
        (newest / "trainer_state.json").write_text("")
    elif damage == "missing rng":
        (newest / "rng_state.pt").unlink()
    else:
        data = (newest / "trainable.safetensors").read_bytes()
        (newest / "trainable.safetensors").write_bytes(data[:-4])
    assert ckpt.resolve_resume(tmp_path, "latest") == older
    assert f"skipping {newest}" in capsys.readouterr().err
    with pytest.raises(TunelabError, match="not a usable tunelab checkpoint"):  # named explicitly: refused
        ckpt.load_checkpoint(newest, torch.nn.Linear(4, 2), *_opt_sched())


def test_resume_latest_with_only_damaged_checkpoints_says_so(tmp_path):
    (only,) = _checkpoints(tmp_path, [4])
    (only / "trainer_state.json").write_text("{")
    with pytest.raises(TunelabError, match="no intact checkpoint"):
        ckpt.resolve_resume(tmp_path, "latest")


def _opt_sched():
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
