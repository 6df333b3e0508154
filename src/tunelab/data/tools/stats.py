"""`tunelab data stats`: what a data set holds, in one streaming pass.

Counts, turns per record, dialogues (records sharing a first user turn), lengths per role
(tokens of the chosen model, else characters), the truncation rate at cutoff_len, the
distribution of a label field, and the most repeated instruction openings (a low share
of distinct openings means templated, low-diversity prompts).
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from tunelab.data.tools.common import first_user_turn, item_messages, label_of, percent, table, valid_items
from tunelab.data.tools.dedup import normalise
from tunelab.data.tools.tokens import TokenCounter
from tunelab.errors import TunelabError
from tunelab.io import atomic_path


def describe(values) -> list:
    """[count, min, median, p95, max] of a sequence of lengths."""
    if not len(values):
        return [0, "-", "-", "-", "-"]
    v = np.asarray(values)
    return [len(v), int(v.min()), int(np.median(v)), int(np.percentile(v, 95)), int(v.max())]


@dataclass
class Stats:
    path: str
    unit: str  # "tokens" | "chars"
    format: str | None = None
    records: int = 0
    skipped_invalid: int = 0
    turns: array = field(default_factory=lambda: array("I"))
    lengths: dict[str, array] = field(default_factory=lambda: defaultdict(lambda: array("I")))
    totals: array = field(default_factory=lambda: array("I"))  # whole sequences (tokens only)
    cutoff_len: int | None = None
    over_cutoff: int = 0
    targets: int = 0
    cut_targets: int = 0
    encode_errors: int = 0
    label_field: str | None = None
    labels: Counter = field(default_factory=Counter)
    prefixes: Counter = field(default_factory=Counter)
    dialogues: set = field(default_factory=set)  # 8-byte hashes of first user turns

    def summary(self, top: int = 10) -> str:
        parts = [table([f"{self.path} ({self.format})", "value"], self._counts())]
        rows = [[f"{role} ({self.unit})", *describe(v)] for role, v in sorted(self.lengths.items())]
        rows.append(["turns per record", *describe(self.turns)])
        if len(self.totals):
            rows.append(["whole sequence (tokens)", *describe(self.totals)])
        parts.append(table(["length", "count", "min", "median", "p95", "max"], rows))
        if self.labels:
            n = sum(self.labels.values())
            parts.append(table([self.label_field, "records", "share"],
                               [[k, v, percent(v, n)] for k, v in self.labels.most_common()]))
        if self.prefixes:
            parts.append(table(["most repeated instruction openings", "records", "share"],
                               [[repr(k), v, percent(v, self.records)] for k, v in self.prefixes.most_common(top)]))
        return "\n\n".join(parts)

    def _counts(self) -> list[list]:
        rows = [["records", self.records], ["dialogues (distinct first user turns)", len(self.dialogues)],
                ["distinct instruction openings", percent(len(self.prefixes), self.records)]]
        if self.skipped_invalid:
            rows.append(["invalid records skipped", self.skipped_invalid])
        if self.cutoff_len:
            rows += [[f"sequences over cutoff_len={self.cutoff_len}", percent(self.over_cutoff, len(self.totals))],
                     ["answer tokens truncation cuts", percent(self.cut_targets, self.targets)]]
        if self.encode_errors:
            rows.append(["records the template cannot encode", self.encode_errors])
        return rows

    def to_json(self, top: int = 10) -> dict:
        keys = ("count", "min", "median", "p95", "max")
        return {
            "path": self.path, "format": self.format, "records": self.records, "unit": self.unit,
            "dialogues": len(self.dialogues), "skipped_invalid": self.skipped_invalid,
            "lengths": {role: dict(zip(keys, describe(v))) for role, v in self.lengths.items()},
            "turns": dict(zip(keys, describe(self.turns))),
            "sequence_tokens": dict(zip(keys, describe(self.totals))) if len(self.totals) else None,
            "cutoff_len": self.cutoff_len, "over_cutoff": self.over_cutoff,
            "answer_tokens": self.targets, "answer_tokens_cut": self.cut_targets,
            "encode_errors": self.encode_errors,
            "labels": dict(self.labels), "distinct_openings": len(self.prefixes),
            "top_openings": self.prefixes.most_common(top),
        }


def profile_file(path: str | os.PathLike, fmt: str = "auto", *, counter: TokenCounter | None = None,
                 label_field: str | None = None, prefix_chars: int = 12, skip_invalid: bool = False) -> Stats:
    """Profile one file in a single streaming pass (only lengths and hashes stay in memory)."""
    stats = Stats(str(path), "tokens" if counter else "chars", cutoff_len=counter.cutoff_len if counter else None)
    invalid: set[int] = set()
    for _number, file_format, item in valid_items(path, fmt, skip_invalid=skip_invalid, skipped=invalid):
        stats.records += 1
        stats.format = file_format
        if label_field is None and file_format == "hotel":
            label_field = "response_role"  # the hotel set's natural label
        messages = [m for m in item_messages(item) if m.role != "system"]
        stats.turns.append(len(messages))
        opening = first_user_turn(item)
        stats.dialogues.add(hashlib.blake2b(opening.encode("utf-8"), digest_size=8).digest())
        stats.prefixes[normalise(opening)[:prefix_chars]] += 1
        label = label_of(item, label_field)
        if label is not None:
            stats.labels[label] += 1
        if counter is None:
            for m in item_messages(item):
                stats.lengths[m.role].append(len(m.content))
        else:
            _count_tokens(stats, item, counter)
    stats.label_field = label_field
    stats.skipped_invalid = len(invalid)
    return stats


def _count_tokens(stats: Stats, item, counter: TokenCounter) -> None:
    try:
        sequences = counter.count(item)
    except TunelabError:  # reported by `tunelab data check`; here it is only counted
        stats.encode_errors += 1
        return
    for seq in sequences:
        for role, n in seq.role_lengths:
            stats.lengths[role].append(n)
        stats.totals.append(seq.total)
        stats.over_cutoff += seq.total > counter.cutoff_len
        stats.targets += seq.targets
        stats.cut_targets += seq.cut_targets


def plot(stats: Stats, path: str | os.PathLike) -> None:
    """A PNG of histograms: lengths per role, whole sequences against cutoff_len, turns."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    panels = [(f"{role} ({stats.unit})", v, None) for role, v in sorted(stats.lengths.items())]
    if len(stats.totals):
        panels.append(("whole sequence (tokens)", stats.totals, stats.cutoff_len))
    panels.append(("turns per record", stats.turns, None))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, values, cutoff) in zip(axes.flat, panels):
        ax.hist(np.asarray(values), bins=40, color="#4c72b0")
        if cutoff:
            ax.axvline(cutoff, color="#c44e52", linestyle="--", label=f"cutoff_len={cutoff}")
            ax.legend()
        ax.set_title(title)
        ax.set_ylabel("count")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{os.path.basename(stats.path)}: {stats.records} records")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
