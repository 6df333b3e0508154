"""`tunelab train --dry-run`: each stage shows its first record as its own training encodes it."""

from __future__ import annotations

import json

import pytest

from tunelab.cli import main


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("stage, data, marked", [
    ("sft", "chat", "[[4"),
    ("grpo", "chat", "[[4"),
    ("dpo", "pairs", "[[4"),
    ("rm", "pairs", "[[4"),  # a reward model's pairs, not conversations (the stage table says so)
    ("pt", "text", "[[2 + 2 = 4"),  # plain text, every token trained
])
def test_every_stage_dry_runs_its_own_encoding(tmp_path, tiny_model_dir, capsys, stage, data, marked):
    files = {
        "chat": write_jsonl(tmp_path / "chat.jsonl", [
            {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}]),
        "pairs": write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2 + 2?", "chosen": "4", "rejected": "5"}]),
        "text": write_jsonl(tmp_path / "text.jsonl", [{"text": "2 + 2 = 4"}]),
    }
    assert main(["train", f"stage={stage}", f"model_name_or_path={tiny_model_dir}", f"dataset={files[data]}",
                 f"output_dir={tmp_path / 'run'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"stage: {stage}" in out and "dry run: no weights loaded" in out
    assert marked in out.split("=== dry run")[0]  # the answer is what trains
    assert ("(chosen side)" in out) == (data == "pairs")
    assert ("<|im_start|>" in out) == (stage != "pt")  # chat stages render the template, pt does not
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
