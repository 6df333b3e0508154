"""Data mixtures: how many rows each source gives the training set, and which ones.

`dataset` entries are plain (every row), weighted (`weight`: a share of the mixture) or
counted (`samples: N`). Weighted entries are interleaved as LLaMA-Factory's `mix_strategy`
says: `interleave_under` sizes the mixture so that no source repeats a row (the first
source to run out decides the size), `interleave_over` so that every row of every source
is used at least once (short sources repeat). A count above a source's rows repeats rows
too; that is the only other case. Everything is drawn with one seeded RNG, so a run is
the same rows every time.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from tunelab.config import DatasetSource


@dataclass
class SourceTake:
    """What one source gave the training set (saved in RUN_DIR/data_mixture.json)."""
    path: str
    available: int  # training rows of the source (after the validation split)
    taken: int
    weight: float | None = None
    repeated: int = 0  # rows drawn a second (third...) time: the count exceeded the source
    fraction: float | None = None  # replay: the share of the earlier rows asked for

    def describe(self) -> str:
        share = f", weight {self.weight:g}" if self.weight is not None else ""
        share += f", fraction {self.fraction:g}" if self.fraction is not None else ""
        extra = f"; {self.repeated} drawn again with replacement (count > rows)" if self.repeated else ""
        return f"{self.path}: {self.taken} of {self.available} rows{share}{extra}"


def mixture_counts(sizes: list[int], sources: list[DatasetSource], strategy: str) -> list[int]:
    """Rows to take from each source."""
    counts = [s.samples if s.samples is not None else n for s, n in zip(sources, sizes)]
    if strategy == "concat":
        return counts
    weighted = [i for i, s in enumerate(sources) if s.samples is None]
    weights = [sources[i].weight if sources[i].weight is not None else 1.0 for i in weighted]
    total_weight = sum(weights)
    if not weighted or total_weight <= 0:
        return counts
    probs = [w / total_weight for w in weights]
    # interleave_under: the largest mixture in which no source repeats; over: the smallest that uses every row.
    ratios = [sizes[i] / p for i, p in zip(weighted, probs)]
    size = min(ratios) if strategy == "interleave_under" else max(ratios)
    for i, p in zip(weighted, probs):
        counts[i] = min(sizes[i], math.floor(size * p + 1e-9)) if strategy == "interleave_under" \
            else max(sizes[i], math.ceil(size * p - 1e-9))
    return counts


def draw(items: list, n: int, rng: random.Random) -> tuple[list, int]:
    """`n` of `items` without replacement where n fits; above that every row once per full pass
    plus a random remainder. Returns the rows (in source order within each pass) and how many
    were repeats."""
    if n <= len(items) or not items:
        return [items[i] for i in sorted(rng.sample(range(len(items)), min(n, len(items))))], 0
    passes, rest = divmod(n, len(items))
    return items * passes + [items[i] for i in sorted(rng.sample(range(len(items)), rest))], n - len(items)


def mix(parts: list[list], sources: list[DatasetSource], strategy: str, seed: int) -> tuple[list, list[SourceTake]]:
    """The training rows of the mixture (source by source; the loop shuffles) and what each gave."""
    rng = random.Random(seed)
    counts = mixture_counts([len(p) for p in parts], sources, strategy)
    rows, takes = [], []
    for part, source, n in zip(parts, sources, counts):
        if n == len(part):  # every row: the file order, nothing drawn (plain lists stay as before)
            taken, repeated = list(part), 0
        else:
            taken, repeated = draw(part, n, rng)
        rows.extend(taken)
        takes.append(SourceTake(source.path, len(part), len(taken), source.weight, repeated))
    return rows, takes


def subsample(items: list, n: int, seed: int) -> list:
    """A seeded random `n` of `items`, in their order (`max_samples` with the random strategy)."""
    if n >= len(items):
        return items
    return draw(items, n, random.Random(seed))[0]


def report(takes: list[SourceTake], strategy: str, replay: SourceTake | None = None) -> dict:
    """The data_mixture.json record."""
    return {"mix_strategy": strategy, "sources": [asdict(t) for t in takes],
            "replay": asdict(replay) if replay else None,
            "training_rows": sum(t.taken for t in takes) + (replay.taken if replay else 0)}
