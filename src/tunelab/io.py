"""Atomic, durable file writes: a crash or power cut never leaves a half-written output.

Everything is written under a hidden temporary name beside its destination, fsynced,
renamed into place, and the folder fsynced, so readers see the old or the new, never half.
Temporary names carry the writer's process id: a later write to the same folder removes
the ones a killed process left behind (`.checkpoint-N.tmp123.x`, `.weights.tmp123.x`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

_TEMP_RE = re.compile(r"^\..+\.tmp(\d+)\.[^.]+$")
_ASIDE = ".tunelab-old"  # suffix of a folder moved aside while its replacement is renamed in


_cleaned: set[Path] = set()  # folders already swept by this process (a cache folder may hold many files)


def temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new hidden temporary folder in `parent` for work on `name`, after removing stale ones."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    if parent.resolve() not in _cleaned:
        clean_stale_temps(parent)
        _cleaned.add(parent.resolve())
    return Path(tempfile.mkdtemp(prefix=f".{name}.tmp{os.getpid()}.", dir=parent))


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary folders in `folder` whose writing process is gone (killed); return them.

    Also puts back a folder a kill left moved aside (`.NAME.tunelab-old`) mid-replacement.
    """
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
        elif entry.name.startswith(".") and entry.name.endswith(_ASIDE) and entry.is_dir():
            original = entry.with_name(entry.name[1:-len(_ASIDE)])
            if not original.exists():
                os.replace(entry, original)  # killed between the two renames of a folder replacement
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process: leave its files alone
    return True


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush a file, or every file and folder under `path`, to disk."""
    path = Path(path)
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                _fsync(Path(root) / name)
            _fsync(Path(root))
    elif path.exists():
        _fsync(path)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. a folder on a platform that cannot open one
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (and folders on some platforms) refuse fsync: best effort
    finally:
        os.close(fd)


def publish(src: Path, dst: Path) -> None:
    """Rename a fully written (and fsynced) `src` onto `dst`, then fsync the folder's entry."""
    os.replace(src, dst)
    _fsync(Path(dst).parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; fsync it and rename it onto `path` only on success.

    Works for files and folders alike: whatever the caller writes at the yielded
    path replaces `path` in one rename, so readers see the old or the new, never half.
    """
    path = Path(path)
    tmp = temp_dir(path.parent, path.name) / path.name
    try:
        yield tmp
        fsync_tree(tmp)
        if path.is_dir() and not path.is_symlink():
            # os.replace cannot put a folder over a non-empty folder: move the old aside first.
            old = path.with_name(f".{path.name}{_ASIDE}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            publish(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            publish(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows) -> int:
    """Write an iterable of JSON-able rows, one per line; returns the row count."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
