"""Starting `tunelab train` as a child process (sweeps, the board's launch form).

A child process, not a call in this one: each run gets a fresh process (all memory back when it
ends, a crash stays its own), a sweep can put one on each GPU, and the board stays responsive.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def train_command(config: str | None, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "tunelab.cli", "train", *([config] if config else []), *overrides]


def start_train(config: str | None, overrides: list[str], log: Path, gpu: str | None = None,
                cwd: Path | None = None) -> subprocess.Popen:
    """`tunelab train CONFIG overrides...` with its output in `log`; `gpu`: the one CUDA device it sees."""
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    # The child imports the same tunelab as this process (an editable checkout included).
    source = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([source, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(train_command(config, overrides), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries ([] on a CPU machine)."""
    try:
        import torch

        count = torch.cuda.device_count()
    except ImportError:
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def log_tail(log: Path, lines: int = 30) -> str:
    """The end of a child's output (what an error says), or '' when there is none."""
    try:
        text = Path(log).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    # tqdm redraws with carriage returns: keep each line's last state.
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


def error_text(log: Path) -> str | None:
    """The TunelabError a child printed (`error: ...` and its fix line), if any."""
    tail = log_tail(log, 60).splitlines()
    starts = [i for i, line in enumerate(tail) if line.startswith("error: ")]
    if not starts:
        return None
    return "\n".join(tail[starts[-1]:]).removeprefix("error: ")
