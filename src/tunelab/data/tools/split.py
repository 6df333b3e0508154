"""`tunelab data split`: train / validation / test files, reproducible from a seed, with every
group of related records (one dialogue) kept in one split, optionally stratified by a label.

Records are grouped by their first user turn: the hotel set's rows of one dialogue share
it, and identical prompts elsewhere would leak an answer between splits. `group_by` names
a field to group by instead (e.g. a dialogue id kept in the records).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.data.tools.common import first_user_turn, label_of, percent, raw_records, table, valid_items
from tunelab.errors import TunelabError
from tunelab.io import atomic_path

DEFAULT_RATIOS = (0.7, 0.15, 0.15)
NAMES = {2: ("train", "test"), 3: ("train", "validation", "test")}


def parse_ratios(text: str | tuple[float, ...]) -> tuple[float, ...]:
    try:
        ratios = tuple(float(r) for r in text.split(",")) if isinstance(text, str) else tuple(text)
    except ValueError:
        raise TunelabError(f"--ratios {text!r} is not a list of numbers", where="split",
                           fix="write e.g. --ratios 0.7,0.15,0.15") from None
    if len(ratios) not in NAMES or not all(0 <= r <= 1 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:  # nan fails
        raise TunelabError(f"--ratios {text} must be 2 or 3 non-negative numbers summing to 1", where="split",
                           fix="write e.g. --ratios 0.7,0.15,0.15 (train,validation,test) or 0.9,0.1 (train,test)")
    return ratios


def group_key(item, group_by: str | None) -> bytes:
    value = label_of(item, group_by) if group_by else first_user_turn(item)
    if value is None:
        raise TunelabError(f"record {item.source} has no field {group_by!r} to group by", where=item.source,
                           fix=f"add {group_by!r} to every record, or leave out --group-by")
    return hashlib.blake2b(value.encode("utf-8"), digest_size=12).digest()


def assign(group_labels: list[Counter], ratios: tuple[float, ...], seed: int) -> list[int]:
    """The split of each group: groups in seeded random order, each to the split furthest
    below its target share of the group's labels (so ratios and strata both come out close)."""
    totals = sum(group_labels, Counter())
    targets = [{label: ratio * n for label, n in totals.items()} for ratio in ratios]
    placed = [Counter() for _ in ratios]
    order = list(range(len(group_labels)))
    random.Random(seed).shuffle(order)
    chosen = [0] * len(group_labels)
    for g in order:
        labels = group_labels[g]
        deficit = [sum(n * (targets[s][label] - placed[s][label]) for label, n in labels.items())
                   for s in range(len(ratios))]
        best = max(range(len(ratios)), key=lambda s: (ratios[s] > 0, deficit[s]))
        chosen[g] = best
        placed[best].update(labels)
    return chosen


@dataclass
class SplitResult:
    names: tuple[str, ...]
    records: list[int] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    labels: list[Counter] = field(default_factory=list)
    skipped_invalid: int = 0

    def summary(self, stratify: str | None) -> str:
        total = sum(self.records)
        all_labels = sorted(set().union(*self.labels)) if stratify else []
        headers = ["split", "records", "share", "groups"] + [f"{stratify}={label}" for label in all_labels]
        rows = [[name, n, percent(n, total), g] + [percent(lab[label], n) for label in all_labels]
                for name, n, g, lab in zip(self.names, self.records, self.groups, self.labels)]
        return table(headers, rows)


def _check_outdir(outdir: Path, names: tuple[str, ...]) -> None:
    if outdir.exists() and not outdir.is_dir():
        raise TunelabError("exists and is not a folder", where=str(outdir), fix="name a new folder for the splits")
    if outdir.is_dir():
        others = sorted(p.name for p in outdir.iterdir() if p.name not in {f"{n}.jsonl" for n in names})
        if others:
            raise TunelabError(f"the folder already holds other files ({', '.join(others[:3])})", where=str(outdir),
                               fix="name a new or empty folder: split replaces the whole folder")


def split_file(src: str | os.PathLike, outdir: str | os.PathLike, ratios=DEFAULT_RATIOS, *, seed: int = 42,
               fmt: str = "auto", group_by: str | None = None, stratify: str | None = None,
               skip_invalid: bool = False) -> SplitResult:
    """Write `outdir/{train,validation,test}.jsonl` (the original records, unchanged)."""
    ratios = parse_ratios(ratios)
    names = NAMES[len(ratios)]
    outdir = Path(outdir)
    _check_outdir(outdir, names)
    group_ids: dict[bytes, int] = {}
    group_labels: list[Counter] = []
    record_group = array("q")  # record number - 1 -> group id (-1: invalid, skipped)
    invalid: set[int] = set()
    for number, _fmt, item in valid_items(src, fmt, skip_invalid=skip_invalid, skipped=invalid):
        gid = group_ids.setdefault(group_key(item, group_by), len(group_ids))
        if gid == len(group_labels):
            group_labels.append(Counter())
        label = label_of(item, stratify) if stratify else "all"
        if label is None:
            raise TunelabError(f"has no field {stratify!r} to stratify by", where=item.source,
                               fix=f"add {stratify!r} to every record, or leave out --stratify")
        group_labels[gid][label] += 1
        record_group.extend([-1] * (number - 1 - len(record_group)))
        record_group.append(gid)
    if not group_labels:
        raise TunelabError("no valid records to split", where=str(src), fix=f"run `tunelab data check {src}`")
    chosen = assign(group_labels, ratios, seed)

    result = SplitResult(names, [0] * len(names), [0] * len(names), [Counter() for _ in names], len(invalid))
    for gid, split in enumerate(chosen):
        result.groups[split] += 1
        result.labels[split].update(group_labels[gid])
    with atomic_path(outdir) as tmp:
        tmp.mkdir()
        files = [open(tmp / f"{name}.jsonl", "w", encoding="utf-8") for name in names]
        try:
            for _source, number, record in raw_records(src):
                gid = record_group[number - 1] if number <= len(record_group) else -1
                if gid < 0:
                    continue
                split = chosen[gid]
                files[split].write(json.dumps(record, ensure_ascii=False) + "\n")
                result.records[split] += 1
        finally:
            for f in files:
                f.close()
    return result

