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


def slot_scores(predictions: Sequence[str | Mapping | None], references: Sequence[Mapping]) -> dict[str, float]:
    """Pooled slot precision / recall / F1 over all turns, x100 (0 where undefined)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    total = sum((slot_counts(p, r) for p, r in zip(predictions, references)), SlotCounts())
    precision = total.correct / total.predicted if total.predicted else 0.0
    recall = total.correct / total.expected if total.expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"slot_precision": 100.0 * precision, "slot_recall": 100.0 * recall, "slot_f1": 100.0 * f1,
            "slot_correct": total.correct, "slot_predicted": total.predicted, "slot_expected": total.expected}
