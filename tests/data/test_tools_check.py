"""`tunelab data check`: every problem listed as file:line: record N: what: fix, exit 1 on errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tunelab.cli import main
from tunelab.data.tools.check import check_file
from tunelab.data.tools.tokens import TokenCounter

FIXTURES = Path(__file__).parent / "fixtures"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_clean_files_of_every_format_pass(capsys):
    files = sorted(str(p) for p in FIXTURES.iterdir())
    assert main(["data", "check", *files]) == 0
    out = capsys.readouterr().out
    assert "errors " in out and "(kto)" in out and "(hotel)" not in out


def test_every_bad_record_is_listed_with_location_and_fix(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "q", "output": "a"},
        {"instruction": "q", "output": "  "},
        {"instruction": "q", "output": "bell\x07"},
        {"messages": [{"role": "user", "content": "q"}]},
    ])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"instruction": "cut\n')
    assert main(["data", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"error: {path}:2: record 2: turn 2 (assistant) is an empty answer: write the answer" in out
    assert f"warning: {path}:3: record 3: turn 2 (assistant) holds control character U+0007" in out
    assert f"error: {path}:4: record 4: looks like messages but the file started as alpaca" in out
    assert f"error: {path}:5: record 5: the JSON ends early" in out
    assert re.search(r"^records +5$", out, re.M) and re.search(r"^errors +3$", out, re.M)
    assert re.search(r"^warnings +1$", out, re.M)


def test_report_counts_kinds_and_json(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"},
                                               {"prompt": "q", "chosen": "b", "rejected": "b"},
                                               {"prompt": "q", "chosen": "a", "rejected": "b"}])
    report = check_file(path)
    assert (report.records, report.valid, report.errors) == (3, 1, 2)
    assert report.kinds == {("error", "chosen and rejected are the same answer"): 2}
    assert main(["data", "check", str(path), "--json"]) == 1
    (data,) = json.loads(capsys.readouterr().out)
    assert data["errors"] == 2 and data["problems"][0]["where"] == f"{path}:1: record 1"


def test_unreadable_file_is_a_problem_not_a_crash(tmp_path, capsys):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "a"},]')
    assert main(["data", "check", str(path)]) == 1
    assert "trailing comma" in capsys.readouterr().out


def test_over_long_records_share_of_records_and_answer_tokens(qwen2_tokenizer, tmp_path):
    long_answer = "word " * 300
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "hi", "output": "short"},
                                               {"instruction": "hi", "output": long_answer}])
    report = check_file(path, counter=TokenCounter(qwen2_tokenizer, "chatml", cutoff_len=64))
    assert (report.sequences, report.over_cutoff) == (2, 1)
    assert 0 < report.cut_targets < report.targets
    (warning,) = [p for p in report.problems if p.severity == "warning"]
    assert warning.where.endswith("d.jsonl:2: record 2") and "over cutoff_len=64" in warning.what
    assert report.errors == 0


def test_summary_kinds_keep_digits_that_are_part_of_a_name(tmp_path, capsys):
    from tunelab.data.tools.check import Problem

    problem = Problem("x.jsonl:3", "error", "bytes that are not UTF-8 (b'\\xff') at column 12")
    assert problem.kind == "bytes that are not UTF-8 (…) at column N"
    assert Problem("x:1", "warning", "turn 3 (user): 2 user turns in a row, Qwen2 template").kind \
        == "N user turns in a row, Qwen2 template"
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"instruction": "hi", "output": "ok"}\n{"instruction": "\xff", "output": "x"}\n')
    main(["data", "check", str(path)])
    out = capsys.readouterr().out
    assert "not UTF-8 (…) at column N" in out and "UTF-N" not in out
