import pytest

from tunelab.config import TunelabConfig
from tunelab.data.readers import load_conversations
from tunelab.errors import TunelabError
from tunelab.train.dataset import load_sft_data, split_validation


def test_dialogue_split_keeps_every_dialogue_on_one_side(hotel_dir):
    rows = load_conversations([str(hotel_dir / "train.jsonl")], "hotel")
    train, val = split_validation(rows, 0.1, seed=1)
    first = lambda conv: next(m.content for m in conv.messages if m.role == "user")  # noqa: E731
    assert {first(c) for c in train}.isdisjoint({first(c) for c in val})
    assert 0.08 * len(rows) <= len(val) <= 0.15 * len(rows)
    assert len(train) + len(val) == len(rows)
    assert split_validation(rows, 0.1, seed=1) == (train, val)  # reproducible


def test_record_split_draws_rows_alone_and_counts_are_exact():
    rows = list(range(100))
    train, val = split_validation(rows, 10, seed=0, by="record")
    assert len(val) == 10 and sorted(train + val) == rows
    assert split_validation(rows, 0.0, seed=0) == (rows, [])


def test_one_record_with_val_size_says_why_nothing_was_held_out(tmp_path, qwen2_tokenizer):
    data = tmp_path / "one.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello"}\n')
    cfg = TunelabConfig(dataset=[str(data)], val_size=0.1, eval_strategy="steps")
    with pytest.raises(TunelabError) as caught:
        load_sft_data(cfg, qwen2_tokenizer)
    assert "val_size=0.1 holds out nothing from 1 record(s)" in caught.value.what
    assert "set val_size" not in caught.value.fix and "eval_dataset" in caught.value.fix
