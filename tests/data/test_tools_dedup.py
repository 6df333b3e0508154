"""`tunelab data dedup`: exact and near duplicates (small edits, Chinese too), first of each kept."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tunelab.cli import main
from tunelab.data.tools.dedup import MinHasher, dedup_file, shingle_hashes


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def distinct_text(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_exact_near_and_distinct(tmp_path):
    rng = random.Random(0)
    english = distinct_text(rng, "abcdefghijklmnopqrstuvwxyz     ", 400)
    chinese = distinct_text(rng, "酒店价格评分早餐地铁安静干净经济型豪华推荐预订入住北京上海", 300)
    rows = [
        {"instruction": english, "output": "a"},                                   # 1 kept
        {"instruction": chinese, "output": "b"},                                   # 2 kept
        {"instruction": "  " + english.upper() + " ", "output": "A"},             # 3 exact (normalised)
        {"instruction": english[:200] + "X" + english[201:], "output": "a"},     # 4 near: one edit
        {"instruction": chinese[:150] + "的" + chinese[151:], "output": "b"},      # 5 near, Chinese
        {"instruction": distinct_text(rng, "abcdefghijklmnopqrstuvwxyz ", 400), "output": "c"},  # 6 kept
        {"instruction": english, "output": "a"},                                   # 7 exact
    ]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    result = dedup_file(src, tmp_path / "out.jsonl", near=0.8)
    assert read_jsonl(tmp_path / "out.jsonl") == [rows[0], rows[1], rows[5]]
    assert {h: sorted((d.number, d.kind) for d in dups) for h, dups in result.groups.items()} == {
        1: [(3, "exact"), (4, "near"), (7, "exact")], 2: [(5, "near")]}
    assert result.heads[1][0] == f"{src}:1: record 1"
    assert all(d.similarity >= 0.8 for dups in result.groups.values() for d in dups)


def test_exact_only_keeps_near_duplicates(tmp_path):
    rows = [{"text": "the same sentence here"}, {"text": "the same sentence here!"}, {"text": "The same  sentence here"}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    result = dedup_file(src, tmp_path / "out.jsonl", near=None)
    assert read_jsonl(tmp_path / "out.jsonl") == rows[:2] and result.count("exact") == 1


def test_minhash_estimates_jaccard():
    hasher = MinHasher(256)
    a, b = "abcdefghij" * 20, "abcdefghij" * 19 + "abcdeXghij"
    sa, sb = set(shingle_hashes(a, 3).tolist()), set(shingle_hashes(b, 3).tolist())
    true = len(sa & sb) / len(sa | sb)
    estimate = float((hasher.signature(shingle_hashes(a, 3)) == hasher.signature(shingle_hashes(b, 3))).mean())
    assert abs(estimate - true) < 0.1


def test_cli_report_and_json_array_output(tmp_path, capsys):
    rows = [{"text": "hello world, this is a test"}, {"text": "hello world, this is a test"}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    out, report = tmp_path / "out.json", tmp_path / "report.json"
    assert main(["data", "dedup", str(src), str(out), "--report", str(report)]) == 0
    assert "exact duplicates removed      1" in capsys.readouterr().out
    assert json.loads(out.read_text()) == rows[:1]
    groups = json.loads(report.read_text())["groups"]
    assert groups[0]["kept"] == f"{src}:1: record 1" and groups[0]["removed"][0]["where"] == f"{src}:2: record 2"


def test_hotel_rows_are_deduplicated_without_loss_of_format(hotel_dir, tmp_path):
    result = dedup_file(hotel_dir / "train.jsonl", tmp_path / "out.jsonl", near=None)
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == result.written == 1054 - result.count("exact")
    assert set(json.loads(lines[0])) == {"context", "response"}


def test_exchange_mode_keeps_rows_that_only_share_a_dialogue_prefix(tmp_path, hotel_dir):
    # The first rows of the hotel set are one growing dialogue: whole-record similarity calls
    # consecutive rows near-duplicates; the exchange each row teaches is different.
    rows = (hotel_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    src = tmp_path / "dialogue.jsonl"
    src.write_text("\n".join(rows) + "\n", encoding="utf-8")
    by_record = dedup_file(src, tmp_path / "a.jsonl", near=0.8, compare="record")
    by_exchange = dedup_file(src, tmp_path / "b.jsonl", near=0.8, compare="exchange")
    assert by_record.count("near") > 0
    assert by_exchange.count("near") == 0 and by_exchange.written == 8


def test_rows_sharing_dialogue_prefixes_are_compared_by_exchange_automatically(tmp_path, hotel_dir):
    result = dedup_file(hotel_dir / "train.jsonl", tmp_path / "out.jsonl")
    assert result.compare == "exchange" and "compared by the last exchange" in result.summary()
    assert result.records - result.written < 0.05 * result.records  # whole rows: 235 of 1054 removed
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"instruction": f"question {i}", "output": f"answer {i}"}) + "\n"
                             for i in range(20)))
    result = dedup_file(plain, tmp_path / "plain_out.jsonl")
    assert result.compare == "record" and "exchange" not in result.summary()
