"""Slot precision / recall / F1 for function-call arguments (the hotel `search` turns).

As the FineTuningLab hotel recipe counts them (see shared/README.md):
- counts are pooled over all search turns, then P = tp/predicted, R = tp/expected;
- a list value counts each element as one slot (`facilities: [a, b]` is two slots);
- a prediction that is not a JSON object counts as an empty dict (all reference slots missed);
- None-valued reference arguments are dropped, as the recipe renders them; a None-valued
  *predicted* argument still counts as a predicted slot that matches nothing (the recipe's
  own scorer counts it so, and a model that emits `"name": null` did say something wrong).
A slot matches when key and value are equal; numbers compare as numbers (4 == 4.0).
Matching is one-to-one (multiset), so repeating a correct list element earns nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SlotCounts:
    correct: int = 0
    predicted: int = 0
    expected: int = 0

    def __add__(self, other: SlotCounts) -> SlotCounts:
        return SlotCounts(self.correct + other.correct, self.predicted + other.predicted,
                          self.expected + other.expected)


def parse_arguments(value: str | Mapping | None) -> dict:
    """A prediction as a dict: JSON text is parsed; anything not a JSON object is `{}`."""
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, str):
        return {}
    try:
        parsed = json.loads(value)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _value_key(value) -> object:
    """A hashable form of a slot value in which 4 and 4.0 are the same and True is not 1."""
    if isinstance(value, bool) or value is None:
        return ("const", value)
    if isinstance(value, (int, float)):
        return ("number", float(value))
    if isinstance(value, str):
        return ("text", value)
    return ("json", json.dumps(value, sort_keys=True, ensure_ascii=False))


def _slots(arguments: Mapping, *, drop_none: bool) -> Counter:
    slots: Counter = Counter()
    for key, value in arguments.items():
        for item in value if isinstance(value, list) else [value]:
            if item is None and drop_none:
                continue
            # A kept None (predictions only) can never match: references never hold one.
            slots[(key, _value_key(item))] += 1
    return slots


def slot_counts(prediction: str | Mapping | None, reference: Mapping) -> SlotCounts:
    """Counts for one search turn (prediction may be raw model text)."""
    predicted = _slots(parse_arguments(prediction), drop_none=False)
    expected = _slots(reference, drop_none=True)
    correct = sum((predicted & expected).values())
    return SlotCounts(correct, sum(predicted.values()), sum(expected.values()))


def slot_counts_by_key(prediction: str | Mapping | None, reference: Mapping) -> dict[str, SlotCounts]:
    """`slot_counts` split by argument name (the per-slot view of the error breakdown)."""
    predicted = _slots(parse_arguments(prediction), drop_none=False)
    expected = _slots(reference, drop_none=True)
    correct = predicted & expected
    out: dict[str, SlotCounts] = {}
    for counter, field_index in ((correct, 0), (predicted, 1), (expected, 2)):
        for (key, _), n in counter.items():
            counts = [0, 0, 0]
            counts[field_index] = n
            out[key] = out.get(key, SlotCounts()) + SlotCounts(*counts)
    return out


def prf(counts: SlotCounts) -> dict[str, float]:
    """Precision / recall / F1 (x100, 0 where undefined) of pooled counts."""
    precision = counts.correct / counts.predicted if counts.predicted else 0.0
    recall = counts.correct / counts.expected if counts.expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": 100.0 * precision, "recall": 100.0 * recall, "f1": 100.0 * f1}


def slot_scores(predictions: Sequence[str | Mapping | None], references: Sequence[Mapping]) -> dict[str, float]:
    """Pooled slot precision / recall / F1 over all turns, x100 (0 where undefined)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    total = sum((slot_counts(p, r) for p, r in zip(predictions, references)), SlotCounts())
    return {f"slot_{k}": v for k, v in prf(total).items()} | {
        "slot_correct": total.correct, "slot_predicted": total.predicted, "slot_expected": total.expected}
