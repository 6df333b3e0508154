"""Truncation that keeps what matters: oldest tool results and turns go first, never the targets."""

from __future__ import annotations

import json

import pytest

from tunelab.data.tokenize import IGNORE_INDEX, encode_conversation
from tunelab.data.truncate import TruncationStats, encode_fitted
from tunelab.data.types import Conversation, Message


@pytest.fixture(scope="module")
def hotel_template(qwen2_tokenizer):
    from tunelab.data.templates import resolve_template

    return resolve_template("hotel", qwen2_tokenizer)


def _records(n, tag):
    return json.dumps([{"name": f"{tag} hotel {i}", "address": "street " * 20, "price": 100 + i}
                       for i in range(n)], indent=4)


def _dialogue():
    return Conversation([
        Message("user", "find a cheap hotel", train=False),
        Message("search", '{"price_range_upper": 300}', train=True),
        Message("return", _records(6, "old"), train=False),
        Message("assistant", "the old hotel 0 is cheap", train=True),
        Message("user", "something with wifi", train=False),
        Message("search", '{"facilities": ["wifi"]}', train=True),
        Message("return", _records(6, "new"), train=False),
        Message("assistant", "new hotel 0 has wifi", train=True),
    ], source="d:1")


def _decoded_targets(example, tokenizer):
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_oldest_tool_result_is_shortened_first_and_every_target_kept(qwen2_tokenizer, hotel_template):
    conv = _dialogue()
    full = encode_conversation(conv, qwen2_tokenizer, hotel_template, 1 << 20)
    cutoff = len(full.input_ids) - 50  # a little too long: one shortening is enough
    example, actions = encode_fitted(conv, qwen2_tokenizer, hotel_template, cutoff)
    assert actions == ["tool result shortened"]
    assert len(example.input_ids) <= cutoff
    assert _decoded_targets(example, qwen2_tokenizer) == _decoded_targets(full, qwen2_tokenizer)
    text = qwen2_tokenizer.decode(example.input_ids)
    assert "old hotel 1" not in text and "old hotel 0" in text  # the old list kept its first record
    assert "new hotel 5" in text  # the latest result is untouched


def test_much_too_long_drops_results_then_turns_but_never_targets_or_last_user(qwen2_tokenizer, hotel_template):
    conv = _dialogue()
    full = encode_conversation(conv, qwen2_tokenizer, hotel_template, 1 << 20)
    targets = _decoded_targets(full, qwen2_tokenizer)
    no_results = Conversation([m for m in conv.messages if m.role != "return"], source="d:1")
    cutoff = len(encode_conversation(no_results, qwen2_tokenizer, hotel_template, 1 << 20).input_ids) - 1
    example, actions = encode_fitted(conv, qwen2_tokenizer, hotel_template, cutoff)
    assert "tool result dropped" in actions and "turn dropped" in actions
    assert "cut at the end" not in actions
    assert _decoded_targets(example, qwen2_tokenizer) == targets
    text = qwen2_tokenizer.decode(example.input_ids)
    assert "something with wifi" in text and "find a cheap hotel" not in text


def test_what_cannot_fit_is_cut_at_the_end_and_said_so(qwen2_tokenizer, hotel_template):
    example, actions = encode_fitted(_dialogue(), qwen2_tokenizer, hotel_template, 40)
    assert actions[-1] == "cut at the end" and len(example.input_ids) <= 40


def test_a_sample_that_fits_is_untouched(qwen2_tokenizer, hotel_template):
    conv = _dialogue()
    example, actions = encode_fitted(conv, qwen2_tokenizer, hotel_template, 1 << 20)
    assert actions == [] and example == encode_conversation(conv, qwen2_tokenizer, hotel_template, 1 << 20)


def test_stats_summary_counts_samples_and_actions():
    stats = TruncationStats()
    stats.add(["tool result shortened", "tool result shortened", "turn dropped"])
    stats.add([])
    stats.add(["tool result shortened"])
    assert stats.samples == 2
    assert stats.summary(10, 512) == ("2 of 10 samples were longer than cutoff_len=512: "
                                      "3 tool result shortened, 1 turn dropped")


def test_training_data_on_hotel_rows_logs_what_was_shortened(hotel_dir, qwen2_tokenizer, capsys):
    from tunelab.config import TunelabConfig
    from tunelab.train.dataset import load_sft_data

    common = dict(dataset=[str(hotel_dir / "train.jsonl")], dataset_format="hotel", template="hotel",
                  cutoff_len=768, max_samples=30, max_samples_strategy="head", val_size=0,
                  fold_dialogues=False)
    smart = load_sft_data(TunelabConfig(**common), qwen2_tokenizer)
    assert "samples were longer than cutoff_len=768" in capsys.readouterr().err
    end = load_sft_data(TunelabConfig(**common, truncation="end", skip_invalid=True), qwen2_tokenizer)
    labels = lambda data: sum(sum(x != IGNORE_INDEX for x in s.labels) for s in data.train)  # noqa: E731
    assert all(len(s) <= 768 for s in smart.train)
    assert len(smart.train) == 30 and labels(smart) > labels(end)  # cutting the end loses answers
