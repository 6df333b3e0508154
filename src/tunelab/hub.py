"""The Hugging Face Hub, when the user allows it: the local cache first, a download only online.

Models (`Org/Name`) and datasets (`dataset: org/name`) resolve from the local HF cache
first, as transformers does; only when a repository is missing there and the user has not
set offline mode (`HF_HUB_OFFLINE=1` or `TRANSFORMERS_OFFLINE=1`, read at call time) is it
downloaded. Offline and missing is a clear error saying how to fetch it. tunelab itself
never changes these variables.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tunelab.errors import TunelabError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TRUE = ("1", "ON", "YES", "TRUE")


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def offline() -> bool:
    """The user's offline setting, read now (huggingface_hub reads it once, at its import)."""
    from huggingface_hub import constants

    from_env = any(os.environ.get(k, "").upper() in TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return from_env or constants.is_offline_mode()


def cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def cached_snapshot(repo_id: str, repo_type: str = "model") -> Path | None:
    """The repository's folder in the local cache, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, cache_dir=cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None


def missing_offline(repo_id: str, repo_type: str, where: str) -> TunelabError:
    """Offline mode is on and the repository is not in the cache: say where we looked and how to get it."""
    expected = cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}"
    flag = "" if repo_type == "model" else f" --repo-type {repo_type}"
    return TunelabError(
        f"{repo_type} {repo_id} is neither a local path nor in the local Hugging Face cache (searched {expected}) "
        f"and offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)",
        where=where,
        fix=f"unset HF_HUB_OFFLINE to download it; or on a connected machine run `hf download {repo_id}{flag}` "
            f"and copy {expected.name} into {cache_dir()} (or set HF_HUB_CACHE to where it is); or give a local path",
    )


def snapshot(repo_id: str, repo_type: str = "model", where: str = "model_name_or_path") -> Path:
    """The repository's local folder: from the cache, else downloaded (unless offline)."""
    folder = cached_snapshot(repo_id, repo_type)
    if folder is not None:
        return folder
    if offline():
        raise missing_offline(repo_id, repo_type, where)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, cache_dir=cache_dir()))
    except Exception as exc:  # network, authentication, a repository that does not exist
        raise TunelabError(f"could not download {repo_type} {repo_id} ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})", where=where,
                           fix="check the id and your connection (gated repositories need `hf auth login`), "
                               "or give a local path") from None
