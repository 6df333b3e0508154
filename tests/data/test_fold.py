"""Dialogue folding: prefix rows fold into the longest row of their dialogue, same loss terms."""

from __future__ import annotations

import pytest
import torch

from tunelab.data.fold import fold_dialogues
from tunelab.data.readers import load_conversations
from tunelab.data.tokenize import IGNORE_INDEX, encode_conversation
from tunelab.data.types import Conversation, Message
from tunelab.train.dataset import split_validation


def _conv(*turns, source="x"):
    messages = [Message(role, content, train=train) for role, content, train in turns]
    return Conversation(messages, source=source)


def _hotel_dialogue(hotel_dir, n_rows=None):
    """The rows of the first dialogue of the hotel train set (growing prefixes)."""
    rows = load_conversations([str(hotel_dir / "train.jsonl")], "hotel", max_samples=40)
    first = rows[0].messages[0].content
    dialogue = [r for r in rows if r.messages[0].content == first]
    assert len(dialogue) >= 3
    return dialogue[:n_rows]


def test_hotel_rows_fold_to_about_one_sequence_per_dialogue(hotel_dir):
    rows = load_conversations([str(hotel_dir / "train.jsonl")], "hotel")
    folded, stats = fold_dialogues(rows)
    assert stats.rows == 1054 and stats.sequences == len(folded)
    assert 350 <= stats.sequences <= 420  # ~390 dialogues
    targets_before = sum(1 for r in rows for m in r.messages if m.is_target())
    assert sum(1 for c in folded for m in c.messages if m.is_target()) == targets_before


def test_grouped_validation_split_then_folding_never_mixes_sides(hotel_dir):
    rows = load_conversations([str(hotel_dir / "train.jsonl")], "hotel")
    train, val = split_validation(rows, 0.05, seed=42)
    folded_train, _ = fold_dialogues(train)
    folded_val, _ = fold_dialogues(val)
    val_sources = {r.source for r in val}
    assert not val_sources & {c.source for c in folded_train}
    assert {c.source for c in folded_val} <= val_sources
    assert sum(c.meta.get("folded_rows", 1) for c in folded_val) == len(val)


def test_folded_per_token_losses_equal_the_unfolded_rows(hotel_dir, qwen2_tokenizer):
    from tests.conftest import tiny_llama

    from tunelab.data.templates import resolve_template

    torch.manual_seed(0)
    template = resolve_template("hotel", qwen2_tokenizer)
    rows = _hotel_dialogue(hotel_dir, 4)
    (folded,), stats = fold_dialogues(rows)
    assert stats.folded_rows == len(rows) - 1 and folded.meta["folded_rows"] == len(rows)
    whole = encode_conversation(folded, qwen2_tokenizer, template, 8192, "all")
    parts = [encode_conversation(r, qwen2_tokenizer, template, 8192, "all") for r in rows]
    model = tiny_llama(qwen2_tokenizer)

    def token_losses(example):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1].float()
        targets = torch.tensor(example.labels[1:])
        losses = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
        return {t + 1: float(losses[t]) for t in range(len(targets)) if targets[t] != IGNORE_INDEX}

    folded_losses = token_losses(whole)
    covered = {}
    for part in parts:
        n = len(part.input_ids)
        assert whole.input_ids[:n] == part.input_ids  # the same tokens before each target
        row_losses = token_losses(part)
        for position, loss in row_losses.items():
            assert whole.labels[position] == part.labels[position]
            assert folded_losses[position] == pytest.approx(loss, abs=1e-5)
        covered |= row_losses
    # Every folded target token is some row's target token, and none is lost or added.
    assert set(folded_losses) == set(covered)
    assert sum(folded_losses.values()) == pytest.approx(sum(covered.values()), rel=1e-5)
    assert len(whole.input_ids) < sum(len(p.input_ids) for p in parts)


def test_identical_rows_branches_and_other_tools_are_not_merged():
    a = _conv(("user", "hi", False), ("assistant", "hello", True), source="a")
    a_again = _conv(("user", "hi", False), ("assistant", "hello", True), source="a2")
    b1 = _conv(("user", "hi", False), ("assistant", "hello", None), ("user", "x", None),
               ("assistant", "X", None), source="b1")
    b2 = _conv(("user", "hi", False), ("assistant", "hello", None), ("user", "y", None),
               ("assistant", "Y", None), source="b2")
    tooled = Conversation([Message("user", "hi"), Message("assistant", "hello")], source="t", tools=[{"n": 1}])
    out, stats = fold_dialogues([a, a_again, b1, b2, tooled])
    # a folds into b1 (the first longest row), its duplicate a2 into b2; the row with tools stays alone.
    assert [c.source for c in out] == ["b1", "b2", "t"]
    assert stats.folded_rows == 2
    assert [m.is_target() for m in out[0].messages] == [False, True, False, True]


def test_max_rows_splits_a_long_dialogue_nearest_rows_into_the_longest():
    turns = [(role, f"{role}{k}") for k in range(5) for role in ("user", "assistant")]
    # One dialogue stored as 5 rows of growing prefixes, each trained on its last turn (as the hotel set).
    rows = [_conv(*[(r, c, i == 2 * k + 1) for i, (r, c) in enumerate(turns[:2 * (k + 1)])], source=f"r{k}")
            for k in range(5)]
    out, stats = fold_dialogues(rows, max_rows=2)
    assert [(c.source, c.meta.get("folded_rows", 1)) for c in out] == [("r0", 1), ("r2", 2), ("r4", 2)]
    assert stats.folded_rows == 2
    assert sum(m.is_target() for c in out for m in c.messages) == 5  # every answer still trains once
    assert [c.source for c in fold_dialogues(rows, max_rows=1)[0]] == [f"r{k}" for k in range(5)]
    assert fold_dialogues(rows)[0][0].meta["folded_rows"] == 5
    assert fold_dialogues(rows, max_rows=6)[0][0].meta["folded_rows"] == 5  # a cap above the dialogue: no cut


def test_train_on_last_keeps_each_rows_last_turn_only():
    short = _conv(("user", "a", None), ("assistant", "A", None), ("user", "b", None), ("assistant", "B", None))
    long = _conv(("user", "a", None), ("assistant", "A", None), ("user", "b", None), ("assistant", "B", None),
                 ("user", "c", None), ("assistant", "C", None))
    (folded,), _ = fold_dialogues([short, long], train_on="last")
    assert [m.is_target() for m in folded.messages] == [False, False, False, True, False, True]
    (folded_all,), _ = fold_dialogues([short, long], train_on="all")
    assert [m.is_target() for m in folded_all.messages] == [False, True, False, True, False, True]


def test_load_sft_data_folds_by_default_and_fold_dialogues_false_turns_it_off(hotel_dir, qwen2_tokenizer, capsys):
    from tunelab.config import TunelabConfig
    from tunelab.train.dataset import load_sft_data

    common = dict(dataset=[str(hotel_dir / "train.jsonl")], dataset_format="hotel", template="hotel",
                  cutoff_len=8192, max_samples=40, max_samples_strategy="head", val_size=0,
                  per_device_train_batch_size=4, gradient_accumulation_steps=4)
    folded = load_sft_data(TunelabConfig(**common), qwen2_tokenizer)
    assert "rows ->" in capsys.readouterr().err
    plain = load_sft_data(TunelabConfig(**common, fold_dialogues=False), qwen2_tokenizer)
    assert len(plain.train) == 40 and len(folded.train) < 20
    # Each sequence knows how many rows it holds: batches count those (collate.batch_order).
    assert sum(s.rows for s in folded.train) == 40 and {s.rows for s in plain.train} == {1}
    # A training sequence holds at most one optimizer step's rows (4 x 1 here), validation any number.
    capped = load_sft_data(TunelabConfig(**common | dict(gradient_accumulation_steps=1)), qwen2_tokenizer)
    assert max(s.rows for s in capped.train) == 4 < max(s.rows for s in folded.train)
    assert sum(s.rows for s in capped.train) == 40
    label_count = lambda samples: sum(sum(1 for x in s.labels if x != IGNORE_INDEX) for s in samples)  # noqa: E731
    # Rows cut at max_samples may leave a prefix row whose dialogue continues beyond: the counts still agree.
    assert label_count(folded.train) == label_count(plain.train)
    assert sum(len(s) for s in folded.train) < 0.7 * sum(len(s) for s in plain.train)


def test_rows_a_template_renders_differently_inside_a_longer_row_are_not_folded(qwen2_tokenizer):
    from tunelab.config import TunelabConfig
    from tunelab.data.templates import resolve_template
    from tunelab.train.dataset import _fold

    short = _conv(("user", "2+2?", None), ("assistant", "<think>add</think>4", None), source="s")
    long = _conv(("user", "2+2?", None), ("assistant", "<think>add</think>4", None), ("user", "3+3?", None),
                 ("assistant", "<think>add</think>6", None), source="l")
    cfg = TunelabConfig(template="qwen3")
    # Qwen3 drops the reasoning of earlier replies: folded, "4" would train without its thinking.
    qwen3 = resolve_template("qwen3", qwen2_tokenizer)
    assert [c.source for c in _fold([short, long], cfg, qwen2_tokenizer, qwen3, "training")] == ["s", "l"]
    chatml = resolve_template("chatml", qwen2_tokenizer)
    assert [c.source for c in _fold([short, long], cfg, qwen2_tokenizer, chatml, "training")] == ["l"]
