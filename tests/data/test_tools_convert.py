"""`tunelab data convert`: between formats, lossless where possible, refusing with a location otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.cli import main
from tunelab.data.readers import load_conversations, load_preferences
from tunelab.data.tools.convert import convert_file
from tunelab.errors import TunelabError

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("target", ["sharegpt", "messages", "conversation", "alpaca"])
def test_alpaca_array_to_each_chat_format_and_back(tmp_path, target):
    out = tmp_path / f"out.{'json' if target == 'alpaca' else 'jsonl'}"
    assert convert_file(FIXTURES / "alpaca.json", out, target) == (3, 0)
    again = load_conversations(out)
    original = load_conversations(FIXTURES / "alpaca.json")
    assert [c.messages for c in again] == [c.messages for c in original]
    assert again[2].meta["extra"] == {"id": "zh-1"}  # unknown fields ride along


def test_cli_convert_hotel_refuses_with_location_and_writes_nothing(hotel_dir, tmp_path, capsys):
    out = tmp_path / "hotel_messages.jsonl"
    assert main(["data", "convert", str(hotel_dir / "train.jsonl"), str(out), "--to", "messages"]) == 2
    err = capsys.readouterr().err
    assert f"{hotel_dir / 'train.jsonl'}:1: record 1: messages cannot hold a 'search' turn" in err
    assert not out.exists() and not list(tmp_path.iterdir())  # no partial file, no temp left


def test_skip_invalid_leaves_out_what_cannot_be_held(tmp_path, capsys):
    out = tmp_path / "alpaca.jsonl"
    assert main(["data", "convert", str(FIXTURES / "sharegpt.jsonl"), str(out), "--to", "alpaca",
                 "--skip-invalid"]) == 0
    assert "1 records that could not be converted left out" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record == {"instruction": "Thanks", "input": "", "output": "You're welcome.", "system": "You are kind."}


def test_preference_formats_convert_and_kinds_do_not_mix(tmp_path):
    out = tmp_path / "pairs.jsonl"
    convert_file(FIXTURES / "qa_preference.json", out, "sharegpt_preference")
    assert [p.chosen.content for p in load_preferences(out)] == ["4", "Blue"]
    with pytest.raises(TunelabError, match="rejected answer would be lost"):
        convert_file(FIXTURES / "qa_preference.json", tmp_path / "x.jsonl", "alpaca")
    with pytest.raises(TunelabError, match="pairing would be lost"):
        convert_file(FIXTURES / "preference.jsonl", tmp_path / "x.jsonl", "kto")


def test_bad_output_extension(tmp_path):
    with pytest.raises(TunelabError, match="cannot write '.csv'"):
        convert_file(FIXTURES / "alpaca.json", tmp_path / "x.csv", "sharegpt")
