"""`tunelab data stats`: counts, per-role lengths, truncation, labels, openings, a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.cli import main
from tunelab.data.tools.stats import profile_file
from tunelab.data.tools.tokens import TokenCounter

FIXTURES = Path(__file__).parent / "fixtures"


def test_character_stats_without_a_model(tmp_path):
    rows = [{"instruction": "Translate: hello", "output": "bonjour", "lang": "fr"},
            {"instruction": "Translate: cat", "output": "chat", "lang": "fr"},
            {"instruction": "Sum 2 and 2", "output": "4", "lang": "en"}]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = profile_file(src, label_field="lang", prefix_chars=10)
    assert stats.unit == "chars" and stats.records == 3 and len(stats.dialogues) == 3
    assert sorted(stats.lengths["assistant"]) == [1, 4, 7]
    assert stats.labels == {"fr": 2, "en": 1}
    assert stats.prefixes.most_common(1) == [("translate:", 2)]


def test_hotel_token_stats_plot_and_json(hotel_dir, qwen2_tokenizer, tmp_path):
    counter = TokenCounter(qwen2_tokenizer, "hotel", cutoff_len=512)
    stats = profile_file(hotel_dir / "test.jsonl", counter=counter)
    assert stats.labels == {"assistant": 301, "search": 216}  # hotel's label comes by default
    assert set(stats.lengths) == {"user", "assistant", "search", "return"}
    assert 0 < stats.over_cutoff < len(stats.totals) == 517
    # Training shortens the oldest tool results before it cuts an answer: at 512 none is cut.
    assert stats.cut_targets == 0 < stats.targets
    assert stats.encode_errors == 0
    from tunelab.data.tools.stats import plot

    plot(stats, tmp_path / "stats.png")
    assert (tmp_path / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_json_for_preference_data(capsys):
    assert main(["data", "stats", str(FIXTURES / "kto.jsonl"), "--label", "kto_tag", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["records"] == 2 and data["labels"] == {"True": 1, "False": 1}
