"""`tunelab data mine-pairs`: wrong answers become rejected, references chosen; files the dpo stage reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_breakdown import hotel_rows, scored

from tunelab.cli import main
from tunelab.data.readers import load_preferences
from tunelab.data.types import Message
from tunelab.evaluate.mine import MineStats, pair_records
from tunelab.evaluate.tasks import EvalSample, get_task

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "data" / "quickstart.jsonl"


def _hotel_samples(rows):
    prompt = [Message("user", "find me a hotel"), Message("search", '{"type": "x"}'), Message("return", "[]"),
              Message("user", "and then?")]
    samples = []
    for row in rows:
        role, _, body = row["reference"].partition("\n")
        samples.append(EvalSample(row["source"], prompt, Message(role, body), row["reference"], row["meta"]))
    return samples


def test_hotel_mistakes_become_pairs_the_preference_reader_and_encoder_accept(tmp_path, qwen2_tokenizer):
    from tunelab.data.preference_tokenize import encode_pair
    from tunelab.data.templates import resolve_template

    rows = scored("hotel", hotel_rows())
    stats = MineStats()
    records = pair_records(get_task("hotel"), _hotel_samples(rows), rows, stats)
    assert [r["mistake"] for r in records] == ["wrong slots", "malformed JSON", "wrong role"]
    assert stats.rows == 4 and "3 pairs from 4 rows" in stats.summary()
    assert records[2]["chosen"]["role"] == "assistant" and records[2]["rejected"]["role"] == "search"
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    pairs = load_preferences([str(path)])
    assert [m.role for m in pairs[0].prompt] == ["user", "search", "return", "user"]
    assert pairs[1].rejected.content == '{"name": "Grand", "price_range_upper": 5'
    template = resolve_template("hotel", qwen2_tokenizer)
    row = encode_pair(pairs[2], qwen2_tokenizer, template, 1024)
    # The prompt stops at <|im_start|>: the answers differ from their role name on (it is learned).
    assert qwen2_tokenizer.decode(row.prompt).endswith("<|im_start|>")
    assert qwen2_tokenizer.decode(row.rejected).startswith("search")


def test_right_answers_and_unusable_roles_make_no_pair():
    rows = scored("hotel", hotel_rows())
    rows[0]["prediction"] = rows[0]["reference"]
    rows[1]["prediction"] = "hotel?\nwhatever"
    rows = scored("hotel", rows)
    stats = MineStats()
    records = pair_records(get_task("hotel"), _hotel_samples(rows), rows, stats)
    assert [r["mistake"] for r in records] == ["wrong role"]
    assert stats.skipped == {"answers with no usable role or text": 1}


def test_cli_mines_a_tiny_models_mistakes_into_a_dpo_file(tmp_path, tiny_model_dir, capsys):
    from conftest import tiny_lora_adapter

    torch.set_num_threads(1)
    adapter = tiny_lora_adapter(tiny_model_dir, tmp_path / "adapter")  # random LoRA: text, not blank lines
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "mine-pairs", str(QUICKSTART), str(out), "--model", str(tiny_model_dir),
                 "--adapter", str(adapter), "--limit", "3", "--max-new-tokens", "5", "--device", "cpu",
                 "--dtype", "float32", "--no-progress"]) == 0
    assert "pairs from 3 rows" in capsys.readouterr().err
    pairs = load_preferences([str(out)])
    references = [json.loads(line) for line in QUICKSTART.read_text().splitlines()[:3]]
    assert len(pairs) == 3  # a random model is wrong every time
    for pair, record in zip(pairs, references):
        assert pair.chosen.content == record["messages"][-1]["content"]
        assert pair.rejected.content != pair.chosen.content and pair.prompt[-1].role == "user"


def test_mine_pairs_refuses_an_output_it_cannot_write(tmp_path, capsys):
    assert main(["data", "mine-pairs", str(QUICKSTART), str(tmp_path / "pairs.txt")]) == 2
    assert "name the output .jsonl" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
