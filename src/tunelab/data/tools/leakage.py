"""`tunelab data check TRAIN --against TEST`: test rows the training data already holds.

A test row is flagged, most serious first, when
- `verbatim`: a training row is the same conversation (prompt and answer);
- `answer in train`: a training row continues the same dialogue past the test row, so the
  test answer is in the training text (the hotel set's rows are growing prefixes);
- `context in train`: a training row holds the test row's whole prompt (same dialogue so
  far, whatever comes next).
Rows are compared turn by turn (role and exact content, tools too), as dialogue folding
compares them. A score on leaked rows measures memory, not skill.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.data.fold import prefix_keys
from tunelab.data.tools.common import table, valid_items
from tunelab.data.types import Conversation

KINDS = ("verbatim", "answer in train", "context in train")


@dataclass
class Leak:
    where: str  # the test row
    kind: str
    train: str  # a training row that holds it


@dataclass
class LeakageReport:
    against: str
    test_rows: int = 0
    train_rows: int = 0
    leaks: list[Leak] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {kind: sum(leak.kind == kind for leak in self.leaks) for kind in KINDS}

    def summary(self, limit: int = 50) -> str:
        lines = [f"{leak.where}: {leak.kind} ({leak.train})" for leak in self.leaks[:limit]]
        if len(self.leaks) > limit:
            lines.append(f"... {len(self.leaks) - limit} more (--limit N shows more)")
        rows = [[kind, n, f"{100 * n / self.test_rows:.1f}%" if self.test_rows else "-"]
                for kind, n in self.counts().items()]
        head = table([f"leakage: {self.against} ({self.test_rows} rows) vs {self.train_rows} training rows",
                      "test rows", "share"], rows)
        return "\n".join(lines + ([""] if lines else []) + [head])

    def to_json(self) -> dict:
        return {"against": self.against, "test_rows": self.test_rows, "train_rows": self.train_rows,
                "counts": self.counts(), "leaks": [vars(leak) for leak in self.leaks]}


def _conversations(path, fmt: str) -> list[Conversation]:
    # Invalid rows are the regular check's business: they are reported there, skipped here.
    return [item for _, _, item in valid_items(path, fmt, skip_invalid=True) if isinstance(item, Conversation)]


def check_leakage(train_paths: list, against: str, fmt: str = "auto") -> LeakageReport:
    """Every test row of `against` that the training files hold (see the module docstring)."""
    full: dict[int, str] = {}  # key of a whole training row -> where it is
    prefixes: dict[int, str] = {}  # key of any proper prefix of a training row -> where
    train_rows = 0
    for path in train_paths:
        for conv in _conversations(path, fmt):
            train_rows += 1
            keys = prefix_keys(conv)
            full.setdefault(keys[-1], conv.source)
            for key in keys[:-1]:
                prefixes.setdefault(key, conv.source)
    report = LeakageReport(str(against), train_rows=train_rows)
    for conv in _conversations(against, fmt):
        report.test_rows += 1
        keys = prefix_keys(conv)
        where = conv.source
        if keys[-1] in full:
            report.leaks.append(Leak(where, "verbatim", full[keys[-1]]))
        elif keys[-1] in prefixes:
            report.leaks.append(Leak(where, "answer in train", prefixes[keys[-1]]))
        elif len(keys) > 1 and (keys[-2] in prefixes or keys[-2] in full):
            report.leaks.append(Leak(where, "context in train", prefixes.get(keys[-2]) or full[keys[-2]]))
    return report
