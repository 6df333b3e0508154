"""The format registry: one class per format; detection in table order; TRL's formats read and written."""

from __future__ import annotations

import json

import pytest

from tunelab.data.formats import (
    REGISTRY,
    RecordError,
    detect_format,
    get_format,
    to_record,
)
from tunelab.data.readers import load_conversations, load_preferences, parse_record
from tunelab.data.types import Conversation, KTOExample, PreferencePair

# One record of every registered format: the table below must cover the registry.
SAMPLES = {
    "alpaca": {"instruction": "hi", "input": "", "output": "hello"},
    "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    "messages": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    "conversation": {"conversation": [{"input": "hi", "output": "hello"}]},
    "hotel": {"context": json.dumps([{"role": "user", "content": "hi"}]),
              "response": json.dumps({"role": "assistant", "content": "hello"})},
    "text": {"text": "plain text"},
    "prompt_completion": {"prompt": "hi", "completion": "hello"},
    "preference": {"prompt": "hi", "chosen": "hello", "rejected": "go away"},
    "qa_preference": {"question": "hi", "positive_answer": "hello", "negative_answer": "go away"},
    "sharegpt_preference": {"conversations": [{"from": "human", "value": "hi"}],
                            "chosen": {"from": "gpt", "value": "hello"},
                            "rejected": {"from": "gpt", "value": "go away"}},
    "kto": {"instruction": "hi", "input": "", "output": "hello", "kto_tag": True},
    "unpaired_preference": {"prompt": "hi", "completion": "hello", "label": False},
}


def test_samples_cover_the_registry():
    assert set(SAMPLES) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_format_is_detected_read_and_written_back(name):
    record = SAMPLES[name]
    assert detect_format(record) == name
    item = parse_record(record, name)
    assert to_record(item, name) == record
    assert parse_record(to_record(item, name), name) == item


def test_prompt_completion_trains_only_the_completion():
    conv = parse_record({"prompt": "What is 2+2?", "completion": "4", "system": "Be brief."}, "prompt_completion")
    assert [(m.role, m.is_target()) for m in conv.messages] == [("system", False), ("user", False),
                                                                ("assistant", True)]


def test_conversational_prompt_completion():
    record = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "and now?"}],
              "completion": [{"role": "assistant", "content": "bye"}]}
    conv = parse_record(record, "prompt_completion")
    # The assistant turn inside the prompt is context (TRL's completion-only loss), the completion is trained.
    assert [m.is_target() for m in conv.messages] == [False, False, False, True]
    assert to_record(conv, "prompt_completion") == record


def test_unpaired_preference_is_kto_data(tmp_path):
    path = tmp_path / "kto.jsonl"
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}],
             "label": True},
            {"prompt": "hi", "completion": "go away", "label": False}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_preferences(path)
    assert [type(i) for i in items] == [KTOExample, KTOExample]
    assert [(i.completion.content, i.desirable) for i in items] == [("yo", True), ("go away", False)]
    with pytest.raises(Exception, match="not conversations"):
        load_conversations(path)


def test_unpaired_label_must_be_a_boolean():
    with pytest.raises(RecordError, match="label must be true or false"):
        parse_record({"prompt": "hi", "completion": "x", "label": "yes"}, "unpaired_preference")


def test_pairs_and_unpaired_rows_do_not_mix_on_write():
    pair = parse_record(SAMPLES["preference"], "preference")
    assert isinstance(pair, PreferencePair)
    with pytest.raises(RecordError, match="pairing would be lost"):
        to_record(pair, "unpaired_preference")
    conv = Conversation(parse_record(SAMPLES["messages"], "messages").messages * 2)
    with pytest.raises(RecordError, match="only the completion at the end"):
        to_record(conv, "prompt_completion")


def test_get_format_names_the_nearest():
    with pytest.raises(Exception, match="prompt_completion"):
        get_format("prompt_completions")
