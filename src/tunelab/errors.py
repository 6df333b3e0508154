"""One error type for everything a user can get wrong.

The CLI prints a `TunelabError` as three short lines (where, what, fix) and exits
non-zero, never with a traceback: the user's mistake is not our crash.
"""

from __future__ import annotations


class TunelabError(Exception):
    """A problem the user can fix: says what is wrong, where, and how to fix it."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.message())

    def message(self) -> str:
        head = f"{self.where}: {self.what}" if self.where else self.what
        return f"{head}\n  fix: {self.fix}" if self.fix else head


def require_extra(modules: tuple[str, ...], extra: str, what: str) -> None:
    """Optional dependencies (pyproject's extras): say which extra to install instead of an ImportError."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise TunelabError(f"{what} needs {', '.join(missing)}, which is not installed", where="installation",
                           fix=f"pip install 'tunelab[{extra}]'")


def nearest(name: str, candidates) -> str | None:
    """The candidate closest to `name` (for 'did you mean' hints), or None."""
    import difflib

    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return found[0] if found else None
