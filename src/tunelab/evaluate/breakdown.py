"""Error breakdowns: where a model's score is lost, not just how much.

A task's `breakdown(rows)` (rows already scored) returns a JSON-able dict with any of:
- `fields`: per-slot (hotel search arguments) or per-key (generic JSON answers) counts and
  precision / recall / F1;
- `format`: how many structured answers were malformed JSON;
- `roles`: which role the model chose against the reference's (hotel: search vs reply);
- `lengths`: prediction vs reference length in characters;
- `worst`: the lowest-scoring rows, prediction beside reference.
`render(breakdown)` turns it into the markdown `tunelab eval` writes and `tunelab report`
shows for the task evaluations kept during training.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from tunelab.evaluate.metrics import SlotCounts, prf, slot_counts_by_key
from tunelab.io import write_json_atomic, write_text_atomic

WORST = 5  # rows shown per group
SNIPPET = 160  # characters of each side shown


def field_scores(pairs: Sequence[tuple[object, dict]]) -> dict[str, dict]:
    """Per-key pooled counts and P/R/F1 over (prediction, reference arguments) pairs,
    counted as the slot metrics count them; keys sorted by how often the reference uses them."""
    totals: dict[str, SlotCounts] = {}
    for prediction, reference in pairs:
        for key, counts in slot_counts_by_key(prediction, reference).items():
            totals[key] = totals.get(key, SlotCounts()) + counts
    ordered = sorted(totals.items(), key=lambda kv: (-kv[1].expected, kv[0]))
    return {key: {"expected": c.expected, "predicted": c.predicted, "correct": c.correct, **prf(c)}
            for key, c in ordered}


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def length_stats(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"mean": statistics.fmean(ordered), "median": float(statistics.median(ordered)),
            "p90": float(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]), "max": float(ordered[-1])}


def lengths(rows: Sequence[dict], text: Callable[[str], str] = lambda t: t) -> dict[str, dict]:
    return {"prediction_chars": length_stats([len(text(r["prediction"])) for r in rows]),
            "reference_chars": length_stats([len(text(r["reference"])) for r in rows])}


def worst(rows: Sequence[dict], score: Callable[[dict], float], n: int = WORST) -> list[dict]:
    """The `n` lowest-scoring rows (ties: longest reference first), both sides shown."""
    ranked = sorted(rows, key=lambda r: (score(r), -len(r["reference"])))[:n]
    return [{"source": r.get("source", str(r.get("id", ""))), "score": round(float(score(r)), 2),
             "reference": r["reference"], "prediction": r["prediction"]} for r in ranked]


def rate(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


# --- markdown ----------------------------------------------------------------------------

def _cell(text: str) -> str:
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= SNIPPET else flat[:SNIPPET - 1] + "…"


def _num(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def render(breakdown: dict, with_worst: bool = True) -> str:
    """The breakdown as markdown sections (empty string for an empty breakdown)."""
    out: list[str] = []
    if breakdown.get("fields"):
        out += [f"### Per {breakdown.get('field_name', 'field')}", "",
                "| name | expected | predicted | correct | precision | recall | F1 |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        out += [f"| {k} | {v['expected']} | {v['predicted']} | {v['correct']} | {v['precision']:.2f} | "
                f"{v['recall']:.2f} | {v['f1']:.2f} |" for k, v in breakdown["fields"].items()]
        out.append("")
    for section in ("format", "roles"):
        if breakdown.get(section):
            out += [f"### {section.capitalize()}", ""]
            out += [f"- {k.replace('_', ' ')}: {_num(v)}" for k, v in breakdown[section].items()]
            out.append("")
    if breakdown.get("lengths"):
        out += ["### Lengths (characters)", "", "| rows | side | mean | median | p90 | max |",
                "| --- | --- | ---: | ---: | ---: | ---: |"]
        for group, sides in breakdown["lengths"].items():
            for side, s in sides.items():
                if s:
                    out.append(f"| {group} | {side.split('_')[0]} | {s['mean']:.1f} | {s['median']:.0f} | "
                               f"{s['p90']:.0f} | {s['max']:.0f} |")
        out.append("")
    for group, rows in (breakdown.get("worst") or {}).items() if with_worst else ():
        if rows:
            out += [f"### Worst {group} rows ({breakdown.get('worst_score', {}).get(group, 'score')})", "",
                    "| source | score | reference | prediction |", "| --- | ---: | --- | --- |"]
            out += [f"| {_cell(r['source'])} | {r['score']} | {_cell(r['reference'])} | {_cell(r['prediction'])} |"
                    for r in rows]
            out.append("")
    return ("## Error breakdown\n\n" + "\n".join(out)) if out else ""


def write_breakdown(task, rows: list[dict], out_dir: Path) -> str:
    """breakdown.json and breakdown.md in `out_dir` (atomically); returns the terminal text
    (the worst examples are only in the files)."""
    result = task.breakdown(rows)
    if not result:
        return ""
    write_json_atomic(out_dir / "breakdown.json", result)
    write_text_atomic(out_dir / "breakdown.md", render(result))
    return render(result, with_worst=False) + f"(worst examples: {out_dir / 'breakdown.md'})\n"
