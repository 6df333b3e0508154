"""Readers: every format normalised exactly, every bad input named with its location and fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.data.readers import (
    FORMATS,
    detect_format,
    load_conversations,
    load_preferences,
    read_records,
    to_record,
)
from tunelab.data.types import KTOExample, Message, PreferencePair
from tunelab.errors import TunelabError

FIXTURES = Path(__file__).parent / "fixtures"


def roles(conv) -> list[str]:
    return [m.role for m in conv.messages]


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def jsonl(tmp_path: Path, rows: list, name: str = "data.jsonl") -> Path:
    return write(tmp_path, name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def error_of(fn, *args, **kwargs) -> TunelabError:
    with pytest.raises(TunelabError) as info:
        fn(*args, **kwargs)
    return info.value


# --- every format -----------------------------------------------------------------------

def test_alpaca_json_array_with_history_system_and_extra_fields():
    convs = load_conversations(FIXTURES / "alpaca.json")
    assert [c.source for c in convs] == [f"{FIXTURES / 'alpaca.json'}:record {i}" for i in (1, 2, 3)]
    assert convs[0].messages == [Message("system", "You are a translator."),
                                 Message("user", "Translate to French\nGood morning"), Message("assistant", "Bonjour")]
    assert roles(convs[1]) == ["user", "assistant", "user", "assistant"]
    assert convs[1].messages[0].content == "Hi" and convs[1].messages[3].content == "4"
    assert convs[2].messages[0].content == "用一句话介绍北京" and convs[2].meta["extra"] == {"id": "zh-1"}


def test_alpaca_csv_with_quoted_commas_and_empty_input():
    convs = load_conversations(FIXTURES / "alpaca.csv")
    assert convs[1].messages == [Message("user", "Name three colours, please"), Message("assistant", "Red, green, blue")]
    assert convs[0].source.endswith("alpaca.csv:record 1")


def test_sharegpt_roles_tools_and_function_calls():
    first, second = load_conversations(FIXTURES / "sharegpt.jsonl")
    assert roles(first) == ["system", "user", "assistant", "user", "function_call", "tool", "assistant"]
    assert first.tools[0]["name"] == "weather"  # the JSON-string tools of LLaMA-Factory are decoded
    assert [m.is_target() for m in first.messages] == [False, False, True, False, True, False, True]
    assert roles(second) == ["system", "user", "assistant"]
    assert first.source.endswith("sharegpt.jsonl:1") and second.source.endswith("sharegpt.jsonl:2")


def test_openai_messages_text_parts_weight_and_tool_calls():
    plain, parts, tools = load_conversations(FIXTURES / "messages.jsonl")
    assert roles(plain) == ["system", "user", "assistant"]
    assert parts.messages[0].content == "Say hi"
    assert [m.is_target() for m in parts.messages] == [False, False, False, True]  # weight 0
    assert roles(tools) == ["user", "function_call", "tool", "assistant"]
    assert json.loads(tools.messages[1].content) == [{"name": "weather", "arguments": "{\"city\": \"Rome\"}"}]
    assert tools.tools[0]["function"]["name"] == "weather"


def test_emollm_conversation_takes_system_from_first_turn():
    first, second = load_conversations(FIXTURES / "conversation.jsonl")
    assert roles(first) == ["system", "user", "assistant", "user", "assistant"]
    assert first.messages[0].content == "你是一个心理咨询师。"
    assert roles(second) == ["user", "assistant"]


def test_text_rows_are_plain_text_trained_in_full():
    convs = load_conversations(FIXTURES / "text.jsonl")
    assert all(c.is_plain_text and c.messages[0].train for c in convs)
    assert convs[1].messages[0].content.startswith("北京")


def test_parquet_with_nested_message_lists(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0},
                          {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}]
    path = tmp_path / "messages.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    convs = load_conversations(path)
    # Parquet fills absent struct fields with null (weight: None) and that must mean "absent".
    assert [m.is_target() for m in convs[0].messages] == [False, False, True]
    assert [m.is_target() for m in convs[1].messages] == [False, False, False, True]
    assert convs[1].source == f"{path}:record 2"


@pytest.mark.parametrize("name, fmt", [
    ("alpaca.json", "alpaca"), ("sharegpt.jsonl", "sharegpt"), ("messages.jsonl", "messages"),
    ("conversation.jsonl", "conversation"), ("text.jsonl", "text"), ("preference.jsonl", "preference"),
    ("qa_preference.json", "qa_preference"), ("sharegpt_preference.jsonl", "sharegpt_preference"),
    ("kto.jsonl", "kto"),
])
def test_detect_format_of_each_fixture(name, fmt):
    _, _, record = next(read_records(FIXTURES / name))
    assert detect_format(record) == fmt


def test_preference_formats():
    plain, listed = load_preferences(FIXTURES / "preference.jsonl")
    assert plain.prompt == [Message("user", "What is the capital of France?")]
    assert (plain.chosen.content, plain.rejected.content) == ("Paris.", "London.")
    assert [m.role for m in listed.prompt] == ["system", "user"] and listed.rejected.content == "No."
    qa = load_preferences(FIXTURES / "qa_preference.json")
    assert qa[1].prompt == [Message("system", "Answer briefly."), Message("user", "Colour of the sky?")]
    assert (qa[0].chosen.content, qa[0].rejected.content) == ("4", "5")
    (sg,) = load_preferences(FIXTURES / "sharegpt_preference.jsonl")
    assert isinstance(sg, PreferencePair) and sg.chosen.role == "assistant" and sg.rejected.content == "Rain is wet."
    good, bad = load_preferences(FIXTURES / "kto.jsonl")
    assert isinstance(good, KTOExample) and good.desirable is True and bad.desirable is False
    assert bad.prompt == [Message("user", "Translate\nchat")]


def test_implicit_prompt_in_chosen_and_rejected_lists(tmp_path):
    turns = [{"role": "user", "content": "Hi"}]
    path = jsonl(tmp_path, [{"prompt": turns, "chosen": turns[:0] + [{"role": "assistant", "content": "Hello"}],
                             "rejected": [{"role": "assistant", "content": "Go away"}]}])
    (pair,) = load_preferences(path)
    assert pair.prompt == [Message("user", "Hi")] and pair.chosen == Message("assistant", "Hello")


# --- the hotel set -------------------------------------------------------------------------

def test_hotel_train_file(hotel_dir):
    convs = load_conversations(hotel_dir / "train.jsonl")
    assert len(convs) == 1054
    assert sum(c.meta["response_role"] == "search" for c in convs) == 444
    search = convs[0]
    assert search.messages[-1] == Message("search", '{\n    "rating_range_lower": 4.0,\n    "type": "经济型"\n}', train=True)
    assert search.messages[0].train is False and search.meta == {"response_role": "search"}
    answer = convs[1]
    assert roles(answer) == ["user", "search", "return", "assistant"]
    assert [m.is_target() for m in answer.messages] == [False, False, False, True]
    assert answer.messages[2].content.startswith('[\n    {\n        "name": "锦江之星(北京奥体中心店)",\n'
                                                  '        "type": "经济型",\n')
    assert '        "facilities": [\n            "公共区域提供wifi",\n' in answer.messages[2].content
    assert answer.messages[2].content.endswith('        "hotel_id": 44\n    }\n]')


def test_hotel_search_drops_none_arguments(tmp_path):
    row = {"context": json.dumps([{"role": "user", "content": "找酒店"}]),
           "response": json.dumps({"role": "search", "arguments": {"type": "豪华型", "name": None}})}
    (conv,) = load_conversations(jsonl(tmp_path, [row]))
    assert conv.messages[-1].content == '{\n    "type": "豪华型"\n}'


def test_hotel_rows_convert_back_exactly(hotel_dir):
    lines = (hotel_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()
    convs = load_conversations(hotel_dir / "train.jsonl")
    assert all(to_record(c, "hotel") == json.loads(line) for c, line in zip(convs, lines))


# --- loading options -----------------------------------------------------------------------

def test_system_prompt_only_where_missing_and_max_samples():
    convs = load_conversations(FIXTURES / "messages.jsonl", system_prompt="Default.", max_samples=2)
    assert len(convs) == 2
    assert convs[0].messages[0].content == "You answer in one word."
    assert convs[1].messages[0] == Message("system", "Default.")


def test_explicit_format_and_unknown_format_name():
    assert len(load_conversations(FIXTURES / "alpaca.json", "alpaca")) == 3
    err = error_of(load_conversations, FIXTURES / "alpaca.json", "alpacca")
    assert "unknown data format" in err.what and "alpaca" in err.fix


def test_wrong_kind_of_data_names_the_stage():
    err = error_of(load_conversations, FIXTURES / "preference.jsonl")
    assert "preference" in err.what and "stage=dpo" in err.fix
    err = error_of(load_preferences, FIXTURES / "alpaca.json")
    assert "alpaca" in err.what


def test_skip_invalid_drops_bad_records_and_reports_them(tmp_path, capsys):
    good = {"instruction": "q", "output": "a"}
    path = write(tmp_path, "d.jsonl", "\n".join([json.dumps(good), "{broken", json.dumps({"instruction": "q", "output": " "}),
                                                  json.dumps(good)]) + "\n")
    convs = load_conversations(path, skip_invalid=True)
    assert len(convs) == 2 and convs.skipped == 2
    assert convs.problems[0].startswith(f"{path}:2: record 2: malformed JSON")
    assert "empty answer" in convs.problems[1]
    assert "skipped 2 invalid record(s), kept 2" in capsys.readouterr().err


# --- bad input: each names file, line/record and a fix -----------------------------------------

def test_missing_file_folder_and_unknown_extension(tmp_path):
    assert "does not exist" in error_of(load_conversations, tmp_path / "nope.jsonl").what
    assert "folder" in error_of(load_conversations, tmp_path).what
    err = error_of(load_conversations, write(tmp_path, "data.txt", '{"text": "x"}\n'))
    assert "unknown file type '.txt'" in err.what and ".jsonl" in err.fix


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"[]"])
def test_empty_files(tmp_path, content):
    name = "d.json" if content == b"[]" else "d.jsonl"
    err = error_of(load_conversations, write(tmp_path, name, content))
    assert "empty" in err.what or "no records" in err.what


def test_malformed_json_names_line_and_column(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "ok"}\n{"text": "a" "b"}\n')
    err = error_of(load_conversations, path)
    assert err.where == f"{path}:2: record 2"
    assert "malformed JSON" in err.what and "column 14" in err.what and "skip_invalid=true" in err.fix


def test_truncated_jsonl_line(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "ok"}\n{"text": "cut in the mid')
    err = error_of(load_conversations, path)
    assert err.where == f"{path}:2: record 2" and "truncated" in err.fix


def test_json_array_with_trailing_comma(tmp_path):
    path = write(tmp_path, "d.json", '[\n  {"text": "a"},\n  {"text": "b"},\n]\n')
    err = error_of(load_conversations, path)
    assert "trailing comma" in err.what and err.where == f"{path}:4:1" and "comma" in err.fix


def test_trailing_comma_inside_a_jsonl_object(tmp_path):
    err = error_of(load_conversations, write(tmp_path, "d.jsonl", '{"text": "a",}\n'))
    assert "trailing comma" in err.what and err.where.endswith("d.jsonl:1: record 1")


def test_bom_is_tolerated(tmp_path):
    for name in ("d.jsonl", "d.json", "d.csv"):
        text = "text\nhello\n" if name.endswith(".csv") else '{"text": "hello"}\n'
        (conv,) = load_conversations(write(tmp_path, name, b"\xef\xbb\xbf" + text.encode()))
        assert conv.messages[0].content == "hello"


def test_non_utf8_and_nul_bytes_name_the_line(tmp_path):
    gbk = write(tmp_path, "gbk.jsonl", b'{"text": "ok"}\n' + '{"text": "北京"}\n'.encode("gbk"))
    err = error_of(load_conversations, gbk)
    assert err.where == f"{gbk}:2: record 2" and "not UTF-8" in err.what and "iconv" in err.fix
    nul = write(tmp_path, "nul.jsonl", b'{"text": "ok"}\n{"text": "a\x00b"}\n')
    err = error_of(load_conversations, nul)
    assert err.where == f"{nul}:2: record 2" and "NUL" in err.what
    arr = write(tmp_path, "nul.json", b'[\n{"text": "a"},\n{"text": "\x00"}]')
    assert error_of(load_conversations, arr).where == f"{arr}:3"
    csv_path = write(tmp_path, "d.csv", "text\nok\n".encode() + "北京\n".encode("gbk"))
    assert error_of(load_conversations, csv_path).where == f"{csv_path}:3"


def test_record_that_is_not_an_object(tmp_path):
    err = error_of(load_conversations, write(tmp_path, "d.jsonl", '["a", "b"]\n'))
    assert "must be a JSON object, got list" in err.what
    err = error_of(load_conversations, write(tmp_path, "d.json", '[{"text": "a"}, "b"]'))
    assert err.where.endswith("d.json:record 2")


def test_csv_with_a_missing_column(tmp_path):
    path = write(tmp_path, "d.csv", "instruction,input,output\nq,,a\nonly two,fields\n")
    err = error_of(load_conversations, path)
    assert err.where == f"{path}:record 2" and "line 3 has 2 fields but the header has 3" in err.what
    path = write(tmp_path, "e.csv", "instruction,input\nq,x\n")
    assert "missing field 'output'" in error_of(load_conversations, path).what


def test_mixed_formats_name_both(tmp_path):
    path = jsonl(tmp_path, [{"instruction": "q", "output": "a"}, {"messages": [{"role": "user", "content": "q"}]}])
    err = error_of(load_conversations, path)
    assert err.where == f"{path}:2: record 2"
    assert "looks like messages but the file started as alpaca" in err.what


@pytest.mark.parametrize("record, message", [
    ({"instruction": "q", "ouptut": "a"}, "missing field 'output'"),
    ({"instruction": "q", "output": "   "}, "empty answer"),
    ({"instruction": "q", "output": 3}, "output must be a string"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "no turn to train on"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, "unknown role"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                        {"from": "human", "value": "more?"}]}, "ends on a user turn"),
    ({"conversations": [{"from": "gpt", "value": "a"}]}, "must start with a user turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}, "two user turns in a row"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}, "system message after the first turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"},
                   {"role": "assistant", "content": "a"}]}, "tool result without a tool call"),
    ({"messages": [{"role": "human", "content": "q"}]}, "unknown role 'human'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts"),
    ({"text": ""}, "text is empty"),
    ({"foo": 1}, "cannot tell the format"),
    ({"context": "[{\"role\": \"user\", \"content\": \"q\"}]", "response": "{\"role\": \"robot\"}"}, "unknown role"),
])
def test_invalid_conversations(tmp_path, record, message):
    path = jsonl(tmp_path, [record])
    err = error_of(load_conversations, path)
    assert message in err.what and err.where == f"{path}:1: record 1" and err.fix


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, "chosen and rejected are the same"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen is empty"),
    ({"instruction": "q", "output": "a", "kto_tag": "true"}, "kto_tag must be true or false"),
    ({"instruction": "q", "output": "a", "kto_tag": 1}, "kto_tag must be true or false"),
    ({"question": "q", "positive_answer": "a"}, "missing field 'negative_answer'"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}}, "chosen is a user turn"),
])
def test_invalid_preferences(tmp_path, record, message):
    path = jsonl(tmp_path, [record])
    err = error_of(load_preferences, path)
    assert message in err.what and err.where == f"{path}:1: record 1"


def test_ten_megabyte_single_line(tmp_path):
    big = "字" * (10 * 1024 * 1024 // 3)
    path = jsonl(tmp_path, [{"text": big}])
    (conv,) = load_conversations(path)
    assert len(conv.messages[0].content) == len(big)


def test_jsonl_streams(tmp_path):
    path = jsonl(tmp_path, [{"text": "a"}, {"text": "b"}])
    records = read_records(path)
    assert next(records)[1:] == (1, {"text": "a"})  # a generator: nothing read ahead of need


# --- to_record: the inverse, refusing what would be lost ---------------------------------------

@pytest.mark.parametrize("name", ["alpaca.json", "sharegpt.jsonl", "messages.jsonl", "conversation.jsonl", "text.jsonl"])
def test_conversations_round_trip_through_their_own_format(tmp_path, name):
    convs = load_conversations(FIXTURES / name)
    fmt = detect_format(next(read_records(FIXTURES / name))[2])
    again = load_conversations(jsonl(tmp_path, [to_record(c, fmt) for c in convs]))
    assert [(c.messages, c.tools) for c in again] == [(c.messages, c.tools) for c in convs]


@pytest.mark.parametrize("target", ["alpaca", "sharegpt", "messages", "conversation"])
def test_plain_chats_convert_between_chat_formats(tmp_path, target):
    convs = load_conversations(FIXTURES / "conversation.jsonl")
    again = load_conversations(jsonl(tmp_path, [to_record(c, target) for c in convs]))
    assert [c.messages for c in again] == [c.messages for c in convs]


@pytest.mark.parametrize("fmt", ["preference", "qa_preference", "sharegpt_preference"])
def test_pairs_round_trip(tmp_path, fmt):
    pairs = load_preferences(FIXTURES / "qa_preference.json")
    again = load_preferences(jsonl(tmp_path, [to_record(p, fmt) for p in pairs]))
    assert [(p.prompt, p.chosen, p.rejected) for p in again] == [(p.prompt, p.chosen, p.rejected) for p in pairs]


def test_to_record_refuses_and_names_the_loss(hotel_dir):
    hotel = load_conversations(hotel_dir / "train.jsonl", max_samples=2)
    assert "'search' turn" in error_of(to_record, hotel[0], "messages").what
    sharegpt = load_conversations(FIXTURES / "sharegpt.jsonl")
    assert "tool schemas" in error_of(to_record, sharegpt[0], "alpaca").what
    weighted = load_conversations(FIXTURES / "messages.jsonl")[1]
    assert "not trained" in error_of(to_record, weighted, "sharegpt").what
    assert to_record(weighted, "messages")["messages"][1]["weight"] == 0
    assert "multi-turn prompt" in error_of(to_record, load_preferences(FIXTURES / "preference.jsonl")[1], "kto").what \
        or "pairing" in error_of(to_record, load_preferences(FIXTURES / "preference.jsonl")[1], "kto").what
    assert "rejected answer" in error_of(to_record, hotel[1], "preference").what
    assert set(FORMATS) >= {"alpaca", "kto", "hotel"}
