"""`tunelab data check --against`: test rows found in the training data, verbatim or by prefix."""

from __future__ import annotations

import json

from tunelab.cli import main
from tunelab.data.tools.leakage import check_leakage


def _row(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in zip(["user", "assistant"] * 3, turns)]}


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_each_kind_of_leak_is_found_and_clean_rows_are_not(tmp_path):
    train = _write(tmp_path / "train.jsonl", [_row("hi", "hello", "book a room", "which city?"),
                                              _row("weather?", "sunny")])
    test = _write(tmp_path / "test.jsonl", [
        _row("weather?", "sunny"),  # the same row
        _row("hi", "hello"),  # the training row continues past it: its answer was trained on
        _row("hi", "hello", "book a room", "done, in Paris"),  # same prompt, other answer
        _row("hi", "bye"),  # its prompt ("hi") was trained on too
        _row("new question", "new answer"),
    ])
    report = check_leakage([train], test)
    assert [(leak.where, leak.kind) for leak in report.leaks] == [
        (f"{test}:1", "verbatim"), (f"{test}:2", "answer in train"), (f"{test}:3", "context in train"),
        (f"{test}:4", "context in train")]
    assert report.leaks[0].train == f"{train}:2"
    assert report.counts() == {"verbatim": 1, "answer in train": 1, "context in train": 2}
    assert report.test_rows == 5 and report.train_rows == 2


def test_hotel_test_rows_found_in_train(hotel_dir):
    report = check_leakage([hotel_dir / "train.jsonl"], hotel_dir / "test.jsonl")
    assert report.test_rows == 517 and report.counts()["verbatim"] >= 1
    assert all(leak.train.startswith(str(hotel_dir / "train.jsonl")) for leak in report.leaks)


def test_cli_check_against_prints_and_emits_json(tmp_path, capsys):
    train = _write(tmp_path / "train.jsonl", [_row("weather?", "sunny")])
    test = _write(tmp_path / "test.jsonl", [_row("weather?", "sunny"), _row("a", "b")])
    assert main(["data", "check", str(train), "--against", str(test)]) == 0
    out = capsys.readouterr().out
    assert f"{test}:1: verbatim ({train}:1)" in out and "50.0%" in out
    assert main(["data", "check", str(train), "--against", str(test), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["leakage"]["counts"]["verbatim"] == 1 and data["files"][0]["records"] == 1
