"""`tunelab data split`: seeded, reproducible, dialogues never straddle splits, strata balanced."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tunelab.cli import main
from tunelab.data.tools.split import split_file
from tunelab.errors import TunelabError


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def first_user(row: dict) -> str:
    return json.loads(row["context"])[0]["content"]


def test_hotel_split_keeps_dialogues_whole_and_is_reproducible(hotel_dir, tmp_path):
    result = split_file(hotel_dir / "train.jsonl", tmp_path / "a", stratify="response_role")
    assert sum(result.records) == 1054 and result.names == ("train", "validation", "test")
    splits = {name: read_jsonl(tmp_path / "a" / f"{name}.jsonl") for name in result.names}
    owners = {}
    for name, rows in splits.items():
        for row in rows:
            assert owners.setdefault(first_user(row), name) == name  # never in two splits
    for name, share in zip(result.names, (0.7, 0.15, 0.15)):
        assert abs(len(splits[name]) / 1054 - share) < 0.03
        roles = Counter(json.loads(r["response"])["role"] for r in splits[name])
        assert abs(roles["search"] / len(splits[name]) - 444 / 1054) < 0.05
    split_file(hotel_dir / "train.jsonl", tmp_path / "b", stratify="response_role")
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
               for f in ("train.jsonl", "validation.jsonl", "test.jsonl"))
    split_file(hotel_dir / "train.jsonl", tmp_path / "c", seed=7)
    assert (tmp_path / "a" / "test.jsonl").read_bytes() != (tmp_path / "c" / "test.jsonl").read_bytes()


def test_group_by_field_and_two_way_split(tmp_path):
    rows = [{"instruction": f"q{i}", "output": "a", "dialogue": i // 3} for i in range(60)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = split_file(src, tmp_path / "out", "0.8,0.2", group_by="dialogue")
    assert result.names == ("train", "test") and sum(result.records) == 60 and sum(result.groups) == 20
    test_dialogues = {r["dialogue"] for r in read_jsonl(tmp_path / "out" / "test.jsonl")}
    train_dialogues = {r["dialogue"] for r in read_jsonl(tmp_path / "out" / "train.jsonl")}
    assert not test_dialogues & train_dialogues and len(test_dialogues) == 4


@pytest.mark.parametrize("ratios", ["0.7,0.2", "1", "a,b", "0.5,0.6,-0.1"])
def test_bad_ratios(tmp_path, ratios):
    with pytest.raises(TunelabError, match="--ratios"):
        split_file(Path(__file__).parent / "fixtures" / "alpaca.json", tmp_path / "out", ratios)


def test_refuses_a_folder_with_other_files_and_writes_nothing_on_error(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    src = Path(__file__).parent / "fixtures" / "alpaca.json"
    assert main(["data", "split", str(src), str(tmp_path / "out")]) == 2
    assert "already holds other files" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": ""}\n')
    assert main(["data", "split", str(bad), str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "out"]
