"""Error breakdowns: per-slot scores, malformed JSON, wrong roles, lengths, worst rows."""

from __future__ import annotations

import json

import pytest

from tunelab.cli import main
from tunelab.evaluate import breakdown as bd
from tunelab.evaluate.tasks import get_task


def _search(arguments: dict) -> str:
    return "search\n" + json.dumps(arguments, ensure_ascii=False, indent=4)


def hotel_rows() -> list[dict]:
    ref_a = {"type": "舒适型", "facilities": ["wifi", "parking"]}
    ref_b = {"name": "Grand", "price_range_upper": 500}
    rows = [
        {"reference": _search(ref_a), "meta": {"role": "search", "arguments": ref_a},
         "prediction": _search({"type": "舒适型", "facilities": ["wifi"]})},
        {"reference": _search(ref_b), "meta": {"role": "search", "arguments": ref_b},
         "prediction": 'search\n{"name": "Grand", "price_range_upper": 5'},  # cut off: malformed
        {"reference": "assistant\nThe Grand has rooms.", "meta": {"role": "assistant"},
         "prediction": "assistant\nThe Grand has rooms."},
        {"reference": "assistant\nIt costs 300 yuan.", "meta": {"role": "assistant"},
         "prediction": _search({"name": "Grand"})},  # searched instead of answering
    ]
    for i, row in enumerate(rows):
        row["source"], row["id"] = f"test.jsonl:{i + 1}", i
    return rows


def scored(task_name: str, rows: list[dict]) -> list[dict]:
    task = get_task(task_name)
    for row in rows:
        row["scores"] = task.score_row(row, task.default_metrics)
    return rows


def test_hotel_breakdown_per_slot_format_roles_lengths_worst():
    result = get_task("hotel").breakdown(scored("hotel", hotel_rows()))
    fields = result["fields"]
    assert fields["facilities"] | {} == {"expected": 2, "predicted": 1, "correct": 1, "precision": 100.0,
                                         "recall": 50.0, "f1": pytest.approx(200 / 3)}
    assert fields["type"]["f1"] == 100.0
    assert fields["name"] == {"expected": 1, "predicted": 0, "correct": 0, "precision": 0.0, "recall": 0.0,
                              "f1": 0.0}
    # Three predictions are searches; the cut-off one is malformed.
    assert result["format"] == {"search_predictions": 3, "malformed_json": 1, "malformed_json_rate": 100 / 3}
    assert result["roles"] == {"wrong_role": 1, "wrong_role_rate": 25.0, "assistant_answered_as_search": 1}
    assert result["lengths"]["assistant"]["reference_chars"]["max"] == len("The Grand has rooms.")
    assert [w["source"] for w in result["worst"]["search"]] == ["test.jsonl:2", "test.jsonl:1"]
    assert result["worst"]["assistant"][0]["source"] == "test.jsonl:4"
    text = bd.render(result)
    assert "| facilities | 2 | 1 | 1 | 100.00 | 50.00 | 66.67 |" in text
    assert "malformed json rate: 33.33" in text and "Worst search rows" in text
    assert "Worst" not in bd.render(result, with_worst=False)


def test_generic_breakdown_reads_json_answers_per_key():
    rows = [
        {"reference": '{"city": "Paris", "days": 3}', "prediction": '{"city": "Paris", "days": 4}'},
        {"reference": '{"city": "Rome"}', "prediction": "Rome, I think"},
        {"reference": '{"city": "Oslo"}', "prediction": '{"city": "Oslo"}'},
    ]
    result = get_task("generic").breakdown(scored("generic", rows))
    assert result["fields"]["city"]["correct"] == 2 and result["fields"]["city"]["expected"] == 3
    assert result["fields"]["days"]["precision"] == 0.0
    assert result["format"]["malformed_json"] == 1
    assert result["worst"]["all"][0]["prediction"] == "Rome, I think"


def test_generic_breakdown_of_plain_text_has_no_field_view():
    rows = [{"reference": "hello there", "prediction": "hello"}, {"reference": "bye", "prediction": "bye"}]
    result = get_task("generic").breakdown(scored("generic", rows))
    assert "fields" not in result and result["lengths"]["all"]["prediction_chars"]["mean"] == 4.0


def test_eval_rescore_writes_and_prints_the_breakdown(tmp_path, capsys):
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join(json.dumps(r | {"task": "hotel"}, ensure_ascii=False) for r in hotel_rows()) + "\n")
    assert main(["eval", "--predictions", str(path), "--task", "hotel"]) == 0
    err = capsys.readouterr().err
    assert "Per slot" in err and "wrong role rate: 25.00" in err
    saved = json.loads((tmp_path / "breakdown.json").read_text())
    assert saved["format"]["malformed_json"] == 1
    assert "Worst assistant rows" in (tmp_path / "breakdown.md").read_text()
