"""Write hotel_prefs_train.jsonl / hotel_prefs_test.jsonl: preference pairs from the hotel data.

Each pair is a user's first request from the hotel dialogues (../shared/data/hotel) with
two search calls as answers: the true one (chosen) and a copy with one slot changed to
another plausible value (rejected: a different hotel type, price bound, rating or
facility). Both answers look alike; only the chosen one matches what the user asked,
so a model can only prefer it by reading the request. Train pairs come from train.jsonl,
held-out pairs from test.jsonl. The same files train KTO (chosen = desirable,
rejected = undesirable). Rerun to regenerate: python examples/data/make_preferences.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOTEL = HERE.parents[2] / "shared" / "data" / "hotel"
TYPES = ["经济型", "舒适型", "高档型", "豪华型"]
RATINGS = [3.0, 3.5, 4.0, 4.5, 5.0]
MAX_REQUEST_CHARS = 40  # short prompts keep a CPU run short
HELD_OUT = 64  # test pairs: enough to read an accuracy, few enough to score on a CPU


def first_searches(path: Path) -> list[tuple[str, dict]]:
    """(user request, search arguments) of every dialogue that opens with a search."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        context, response = json.loads(row["context"]), json.loads(row["response"])
        if len(context) == 1 and context[0]["role"] == "user" and response["role"] == "search":
            request = context[0]["content"]
            if len(request) <= MAX_REQUEST_CHARS and response["arguments"]:
                out.append((request, response["arguments"]))
    return out


def consistent(args: dict) -> bool:
    """No lower bound above its upper bound: a rejected answer must not be wrong on its face."""
    return all(args.get(f"{k}_lower", 0) <= args.get(f"{k}_upper", float("inf")) for k in ("price_range", "rating_range"))


def corrupt(args: dict, facilities: list[str], rng: random.Random) -> dict | None:
    """A copy of `args` with one slot changed to another plausible, self-consistent value."""
    for _ in range(20):
        wrong = change_one_slot(args, facilities, rng)
        if wrong is None or consistent(wrong):
            return wrong
    return None


def change_one_slot(args: dict, facilities: list[str], rng: random.Random) -> dict | None:
    wrong = dict(args)
    slots = [k for k in args if k in ("type", "price_range_lower", "price_range_upper", "rating_range_lower",
                                      "rating_range_upper", "facilities")]
    if not slots:
        return None
    slot = rng.choice(slots)
    value = args[slot]
    if slot == "type":
        wrong[slot] = rng.choice([t for t in TYPES if t != value])
    elif slot.startswith("price"):
        wrong[slot] = type(value)(max(100, value + rng.choice([-300, -200, -100, 100, 200, 300])))
        if wrong[slot] == value:
            wrong[slot] = type(value)(value + 200)
    elif slot.startswith("rating"):
        wrong[slot] = rng.choice([r for r in RATINGS if r != value])
    else:
        i = rng.randrange(len(value))
        wrong[slot] = value[:i] + [rng.choice([f for f in facilities if f not in value])] + value[i + 1:]
    return wrong


def pairs(path: Path, facilities: list[str], rng: random.Random) -> list[dict]:
    out = []
    for request, args in first_searches(path):
        wrong = corrupt(args, facilities, rng)
        if wrong is not None:
            out.append({"prompt": request,
                        "chosen": json.dumps(args, ensure_ascii=False),
                        "rejected": json.dumps(wrong, ensure_ascii=False)})
    return out


def facility_names(path: Path) -> list[str]:
    names = {f for _, args in first_searches(path) for f in args.get("facilities", [])}
    return sorted(names)


if __name__ == "__main__":
    rng = random.Random(0)
    facilities = facility_names(HOTEL / "train.jsonl")
    for split in ("train", "test"):
        rows = pairs(HOTEL / f"{split}.jsonl", facilities, rng)
        rows = rows if split == "train" else rows[:HELD_OUT]
        out = HERE / f"hotel_prefs_{split}.jsonl"
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} pairs to {out}")
