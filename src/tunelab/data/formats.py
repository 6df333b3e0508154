"""Every supported record format: detect it, normalise it to `types`, validate it, write it back.

Functions here see one record (a dict) and know nothing about files: a problem is raised
as `RecordError(what, fix)` and the reader (`readers.py`) adds the file, line and record
number. `to_record` is the inverse of the normalisers, used by `tunelab data convert`;
it refuses (naming what would be lost) rather than silently dropping data.
"""

from __future__ import annotations

import json

from tunelab.data.types import Conversation, KTOExample, Message, PreferencePair
from tunelab.errors import TunelabError, nearest


class RecordError(TunelabError):
    """A problem with one record. The reader adds where it is (file:line: record N)."""

    def __init__(self, what: str, fix: str | None = None):
        super().__init__(what, None, fix)


CONVERSATION_FORMATS = ("alpaca", "sharegpt", "messages", "conversation", "hotel", "text")
PREFERENCE_FORMATS = ("preference", "qa_preference", "sharegpt_preference", "kto")
FORMATS = CONVERSATION_FORMATS + PREFERENCE_FORMATS

# format -> (required keys, optional keys). Other keys are kept in `meta["extra"]` so
# that `convert` carries ids, labels and the like through unchanged.
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "alpaca": (("instruction", "output"), ("input", "system", "history")),
    "sharegpt": (("conversations",), ("system", "tools")),
    "messages": (("messages",), ("tools",)),
    "conversation": (("conversation",), ()),
    "hotel": (("context", "response"), ()),
    "text": (("text",), ()),
    "preference": (("prompt", "chosen", "rejected"), ("system",)),
    "qa_preference": (("question", "positive_answer", "negative_answer"), ("system",)),
    "sharegpt_preference": (("conversations", "chosen", "rejected"), ("system", "tools")),
    "kto": (("instruction", "output", "kto_tag"), ("input", "system")),
}

# Turn classes for the order check. "Calls" are the model asking a tool (ShareGPT's
# function_call, the hotel set's search); "results" are what the tool answers.
ANSWER_ROLES = ("assistant", "function_call", "search")
CALL_ROLES = ("function_call", "search")
RESULT_ROLES = ("tool", "return")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "function_call", "observation": "tool",
                  "tool": "tool"}
SHAREGPT_NAMES = {"user": "human", "assistant": "gpt", "system": "system",
                  "function_call": "function_call", "tool": "observation"}
OPENAI_ROLES = ("system", "user", "assistant", "tool")
HOTEL_ROLES = ("user", "assistant", "search", "return")
# Preference records may also hold the hotel roles, rendered as the hotel reader renders
# them (`tunelab data mine-pairs` writes pairs from hotel dialogues so).
PREFERENCE_ROLES = OPENAI_ROLES + ("search", "return")


# --- detection -----------------------------------------------------------------------

def detect_format(record: dict) -> str:
    """The format of one record, from its keys (see `FIELDS`)."""
    keys = record.keys()
    if "context" in keys and "response" in keys:
        return "hotel"
    if "conversations" in keys:
        return "sharegpt_preference" if "chosen" in keys or "rejected" in keys else "sharegpt"
    if "messages" in keys:
        return "messages"
    if "conversation" in keys:
        return "conversation"
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    if "question" in keys or "positive_answer" in keys:
        return "qa_preference"
    if "kto_tag" in keys:
        return "kto"
    if "instruction" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise RecordError(f"cannot tell the format from the keys {sorted(keys)}",
                      fix=f"use the keys of one of {', '.join(FORMATS)} (see docs/data.md), "
                          "or name the format with --format / dataset_format")


def check_format_name(fmt: str, allowed: tuple[str, ...] = FORMATS + ("auto",)) -> str:
    if fmt in allowed:
        return fmt
    hint = nearest(fmt, allowed)
    raise TunelabError(f"unknown data format {fmt!r}", where="format",
                       fix=f"use {hint!r}" if hint else f"use one of {', '.join(allowed)}")


# --- small field readers -------------------------------------------------------------

def _require(record: dict, fmt: str) -> None:
    required, optional = FIELDS[fmt]
    for key in required:
        if record.get(key) is None:
            hint = nearest(key, [k for k in record if k not in required + optional])
            raise RecordError(f"missing field {key!r} ({fmt} records need {', '.join(required)})",
                              fix=f"rename {hint!r} to {key!r}" if hint else f"add {key!r}")


def _string(value, name: str, *, optional: bool = False) -> str:
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"{name} must be a string, got {type(value).__name__}",
                          fix=f"write {name} as a JSON string")
    return value


def _list(value, name: str) -> list:
    if not isinstance(value, list):
        raise RecordError(f"{name} must be a list, got {type(value).__name__}",
                          fix=f"write {name} as a JSON list")
    return value


def _user_text(instruction: str, extra: str) -> str:
    # Alpaca's convention (and LLaMA-Factory's): the input follows the instruction on a new line.
    return f"{instruction}\n{extra}" if instruction and extra else instruction or extra


def _extra(record: dict, fmt: str) -> dict:
    required, optional = FIELDS[fmt]
    known = set(required) | set(optional)
    return {k: v for k, v in record.items() if k not in known}


def _system(record: dict) -> list[Message]:
    system = _string(record.get("system"), "system", optional=True)
    return [Message("system", system)] if system else []


def _tools(value) -> list | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):  # LLaMA-Factory stores tools as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordError(f"tools is a string but not valid JSON ({exc.msg})",
                              fix="write tools as a JSON list of tool schemas") from None
    return _list(value, "tools")


# --- normalisers: record -> Conversation -----------------------------------------------

def _alpaca(record: dict) -> list[Message]:
    messages = _system(record)
    for i, pair in enumerate(record.get("history") or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RecordError(f"history[{i}] is not a [user, assistant] pair of strings",
                              fix='write history as [["question", "answer"], ...]')
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    instruction = _string(record["instruction"], "instruction")
    extra = _string(record.get("input"), "input", optional=True)
    messages += [Message("user", _user_text(instruction, extra)),
                 Message("assistant", _string(record["output"], "output"))]
    return messages


def _known_role(role, allowed, what: str):
    """`role` if the format knows it; else a RecordError with the nearest known role."""
    if role in allowed:
        return role
    hint = nearest(str(role), allowed)
    raise RecordError(f"{what} {role!r}",
                      fix=f"use {hint!r}" if hint else f"use one of {', '.join(allowed)}")


def _sharegpt_message(turn, name: str) -> Message:
    if not isinstance(turn, dict):
        raise RecordError(f"{name} must be an object with 'from' and 'value'",
                          fix='write turns as {"from": "human", "value": "..."}')
    speaker = _known_role(turn.get("from"), SHAREGPT_ROLES, f"{name} has unknown role 'from':")
    role = SHAREGPT_ROLES[speaker]
    # function_call turns are the model's output: trained like assistant turns.
    return Message(role, _string(turn.get("value"), f"{name}.value"),
                   train=True if role == "function_call" else None)


def _sharegpt(record: dict) -> list[Message]:
    turns = _list(record["conversations"], "conversations")
    return _system(record) + [_sharegpt_message(t, f"conversations[{i}]") for i, t in enumerate(turns)]


def _openai_content(content, name: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RecordError(f"{name}[{j}] is a {kind!r} part; only text parts are supported",
                                  fix='keep only {"type": "text", "text": "..."} parts')
            texts.append(part["text"])
        return "".join(texts)
    raise RecordError(f"{name} must be a string or a list of text parts, got {type(content).__name__}",
                      fix="write content as a string")


def _openai_message(message, name: str, roles: tuple[str, ...] = OPENAI_ROLES) -> Message:
    if not isinstance(message, dict):
        raise RecordError(f"{name} must be an object with 'role' and 'content'",
                          fix='write messages as {"role": "user", "content": "..."}')
    role = _known_role(message.get("role"), roles, f"{name} has unknown role")
    weight = message.get("weight")
    if weight not in (None, 0, 1) or isinstance(weight, float):
        raise RecordError(f"{name}.weight must be 0 or 1, got {weight!r}",
                          fix="use weight 0 (do not train this turn) or 1, or leave it out")
    train = None if weight is None else bool(weight)
    if role == "assistant" and message.get("tool_calls"):
        if (message.get("content") or "").strip():
            raise RecordError(f"{name} has both text content and tool_calls",
                              fix="split it into a text turn and a tool-call turn")
        calls = [c.get("function", c) if isinstance(c, dict) else c
                 for c in _list(message["tool_calls"], f"{name}.tool_calls")]
        return Message("function_call", json.dumps(calls, ensure_ascii=False),
                       train=True if train is None else train)
    return Message(role, _openai_content(message.get("content"), f"{name}.content"), train=train)


def _openai_messages(value, name: str, roles: tuple[str, ...] = OPENAI_ROLES) -> list[Message]:
    return [_openai_message(m, f"{name}[{i}]", roles) for i, m in enumerate(_list(value, name))]


def _emollm(record: dict) -> list[Message]:
    turns = _list(record["conversation"], "conversation")
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"conversation[{i}] must be an object with 'input' and 'output'",
                              fix='write turns as {"input": "...", "output": "..."}')
        system = _string(turn.get("system"), f"conversation[{i}].system", optional=True)
        if system and i > 0 and system != turns[0].get("system"):
            raise RecordError(f"conversation[{i}] sets a different system prompt mid-conversation",
                              fix="put the system prompt in the first turn only")
        if system and i == 0:
            messages.append(Message("system", system))
        for key, role in (("input", "user"), ("output", "assistant")):
            if turn.get(key) is None:
                raise RecordError(f"conversation[{i}] is missing {key!r}", fix=f"add {key!r} to every turn")
            messages.append(Message(role, _string(turn[key], f"conversation[{i}].{key}")))
    return messages


def _json_field(value, name: str):
    """The hotel set stores context/response as JSON-encoded strings; accept them decoded too."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{name} is not valid JSON ({exc.msg} at column {exc.colno})",
                          fix=f"{name} must be a JSON-encoded turn list / turn") from None


def render_hotel_turn(turn, name: str) -> Message:
    """One hotel turn as a Message: search arguments and return records as indented JSON."""
    if not isinstance(turn, dict) or turn.get("role") not in HOTEL_ROLES:
        role = turn.get("role") if isinstance(turn, dict) else None
        raise RecordError(f"{name} has unknown role {role!r}", fix=f"use one of {', '.join(HOTEL_ROLES)}")
    role = turn["role"]
    if role == "search":
        arguments = turn.get("arguments")
        if not isinstance(arguments, dict):
            raise RecordError(f"{name} (search) needs an 'arguments' object", fix="add the search slots")
        content = json.dumps({k: v for k, v in arguments.items() if v is not None},
                             indent=4, ensure_ascii=False)
    elif role == "return":
        content = json.dumps(_list(turn.get("records"), f"{name}.records"), indent=4, ensure_ascii=False)
    else:
        content = _string(turn.get("content"), f"{name}.content")
    return Message(role, content)


def _hotel(record: dict) -> tuple[list[Message], dict]:
    context = _list(_json_field(record["context"], "context"), "context")
    messages = [render_hotel_turn(t, f"context[{i}]") for i, t in enumerate(context)]
    for m in messages:
        m.train = False
    response = render_hotel_turn(_json_field(record["response"], "response"), "response")
    response.train = True
    return messages + [response], {"response_role": response.role}


def to_conversation(record: dict, fmt: str, source: str = "") -> Conversation:
    """Normalise one record of a conversation format (not validated: see `validate_conversation`)."""
    _require(record, fmt)
    meta: dict = {}
    tools = None
    if fmt == "alpaca":
        messages = _alpaca(record)
    elif fmt == "sharegpt":
        messages, tools = _sharegpt(record), _tools(record.get("tools"))
    elif fmt == "messages":
        messages, tools = _openai_messages(record["messages"], "messages"), _tools(record.get("tools"))
    elif fmt == "conversation":
        messages = _emollm(record)
    elif fmt == "hotel":
        messages, meta = _hotel(record)
    elif fmt == "text":
        messages = [Message("text", _string(record["text"], "text"), train=True)]
    else:
        raise RecordError(f"{fmt} records are preference data, not conversations",
                          fix="train them with stage=dpo/simpo/orpo (or kto), or pick a conversation format")
    extra = _extra(record, fmt)
    if extra:
        meta["extra"] = extra
    return Conversation(messages, source=source, tools=tools, meta=meta)


# --- normalisers: record -> PreferencePair / KTOExample --------------------------------

def _answer(value, name: str) -> tuple[list[Message], Message]:
    """A chosen/rejected value: a string, a message object, or a message list ending on the answer.

    Messages before the answer in a list (TRL's "implicit prompt" style) are returned
    so the caller can add them to the prompt.
    """
    if isinstance(value, str):
        return [], Message("assistant", value)
    if isinstance(value, dict):
        return [], _openai_message(value, name, PREFERENCE_ROLES)
    messages = _openai_messages(value, name, PREFERENCE_ROLES)
    if not messages:
        raise RecordError(f"{name} is an empty list", fix=f"give {name} the answer text")
    return messages[:-1], messages[-1]


def _prompt(value, name: str) -> list[Message]:
    if isinstance(value, str):
        return [Message("user", value)]
    return _openai_messages(value, name, PREFERENCE_ROLES)


def _pair(record: dict) -> tuple[list[Message], Message, Message]:
    prompt = _system(record) + _prompt(record["prompt"], "prompt")
    before_chosen, chosen = _answer(record["chosen"], "chosen")
    before_rejected, rejected = _answer(record["rejected"], "rejected")
    if [(m.role, m.content) for m in before_chosen] != [(m.role, m.content) for m in before_rejected]:
        raise RecordError("chosen and rejected continue different conversations",
                          fix="keep only the answers in chosen/rejected and the shared turns in prompt")
    return prompt + before_chosen, chosen, rejected


def _sharegpt_pair(record: dict) -> tuple[list[Message], Message, Message]:
    prompt = _sharegpt(record)
    return (prompt, _sharegpt_message(record["chosen"], "chosen"),
            _sharegpt_message(record["rejected"], "rejected"))


def to_preference(record: dict, fmt: str, source: str = "") -> PreferencePair | KTOExample:
    """Normalise one record of a preference format (not validated: see `validate_preference`)."""
    _require(record, fmt)
    if fmt == "preference":
        prompt, chosen, rejected = _pair(record)
    elif fmt == "qa_preference":
        prompt = _system(record) + [Message("user", _string(record["question"], "question"))]
        chosen = Message("assistant", _string(record["positive_answer"], "positive_answer"))
        rejected = Message("assistant", _string(record["negative_answer"], "negative_answer"))
    elif fmt == "sharegpt_preference":
        prompt, chosen, rejected = _sharegpt_pair(record)
    elif fmt == "kto":
        tag = record["kto_tag"]
        if not isinstance(tag, bool):
            raise RecordError(f"kto_tag must be true or false, got {tag!r}",
                              fix="write kto_tag as a JSON boolean (true / false), not a string or number")
        user = _user_text(_string(record["instruction"], "instruction"),
                          _string(record.get("input"), "input", optional=True))
        prompt = _system(record) + [Message("user", user)]
        return KTOExample(prompt, Message("assistant", _string(record["output"], "output")), tag, source)
    else:
        raise RecordError(f"{fmt} records are conversations, not preference data",
                          fix="train them with stage=sft, or pick a preference format")
    return PreferencePair(prompt, chosen, rejected, source)


# --- validation ------------------------------------------------------------------------

def _check_order(messages: list[Message]) -> None:
    """System first; user and answer turns alternate; tool results follow a tool call."""
    previous = None
    for i, m in enumerate(messages):
        where = f"turn {i + 1} ({m.role})"
        if m.role == "system":
            if i > 0:
                raise RecordError(f"{where}: a system message after the first turn",
                                  fix="put the system prompt first (or fold it into the user turn)")
        elif previous in (None, "system") and m.role != "user":
            raise RecordError(f"{where}: the conversation must start with a user turn",
                              fix="add the user's question before it")
        elif m.role == "user" and previous == "user":
            raise RecordError(f"{where}: two user turns in a row", fix="merge them into one turn")
        elif m.role in ANSWER_ROLES and previous in ANSWER_ROLES:
            raise RecordError(f"{where}: follows another {previous} turn without a user or tool turn between",
                              fix="merge the two answers, or add the missing turn between them")
        elif m.role in RESULT_ROLES and previous not in CALL_ROLES + RESULT_ROLES:
            raise RecordError(f"{where}: a tool result without a tool call before it",
                              fix="add the function_call turn that produced it")
        previous = m.role


def validate_conversation(conv: Conversation) -> None:
    """Raise RecordError if `conv` cannot be trained on as it stands."""
    if not conv.messages:
        raise RecordError("the conversation has no turns", fix="drop the record or add turns")
    if conv.is_plain_text:
        if not conv.messages[0].content.strip():
            raise RecordError("the text is empty", fix="drop the record")
        return
    _check_order(conv.messages)
    targets = [m for m in conv.messages if m.is_target()]
    if not targets:
        raise RecordError("no turn to train on (no assistant answer)", fix="add the assistant's answer")
    for i, m in enumerate(conv.messages):
        if m.is_target() and not m.content.strip():
            raise RecordError(f"turn {i + 1} ({m.role}) is an empty answer", fix="write the answer or drop the record")
    last = conv.messages[-1]
    if not last.is_target():
        raise RecordError(f"the conversation ends on a {last.role} turn, which is never trained",
                          fix="drop the last turn or add the answer to it")


def validate_preference(item: PreferencePair | KTOExample) -> None:
    """Raise RecordError if a preference pair / KTO example cannot be trained on."""
    if not item.prompt:
        raise RecordError("the prompt is empty", fix="give the question the answers respond to")
    _check_order(item.prompt)
    if item.prompt[-1].role not in ("user",) + RESULT_ROLES:
        raise RecordError(f"the prompt ends on a {item.prompt[-1].role} turn, not a user turn",
                          fix="end the prompt on the user turn the answers reply to")
    answers = [("completion", item.completion)] if isinstance(item, KTOExample) else \
        [("chosen", item.chosen), ("rejected", item.rejected)]
    for name, answer in answers:
        if answer.role not in ANSWER_ROLES:
            raise RecordError(f"{name} is a {answer.role} turn, not an answer", fix=f"make {name} an assistant turn")
        if not answer.content.strip():
            raise RecordError(f"{name} is empty", fix=f"write the {name} answer or drop the record")
    if isinstance(item, PreferencePair) and item.chosen.content.strip() == item.rejected.content.strip():
        raise RecordError("chosen and rejected are the same answer",
                          fix="drop the record: a pair teaches nothing when both sides agree")


# --- writing back: to_record -------------------------------------------------------------

def _default_target(role: str) -> bool:
    return role in ("assistant", "function_call")


def _refuse(fmt: str, lost: str, fix: str) -> RecordError:
    return RecordError(f"{fmt} cannot hold {lost}", fix=fix)


def _check_flags(messages: list[Message], fmt: str) -> None:
    for i, m in enumerate(messages):
        if m.train is not None and m.train != _default_target(m.role):
            state = "trained" if m.train else "not trained"
            raise _refuse(fmt, f"turn {i + 1} ({m.role}) being {state}",
                          "convert to messages (which keeps it as weight) or hotel")


def _check_roles(messages: list[Message], fmt: str, roles: tuple[str, ...]) -> None:
    for i, m in enumerate(messages):
        if m.role not in roles:
            raise _refuse(fmt, f"a {m.role!r} turn (turn {i + 1})",
                          f"pick a format whose roles include {m.role!r} (hotel keeps search/return; "
                          "sharegpt and messages keep tool turns)")


def _split_system(messages: list[Message]) -> tuple[str | None, list[Message]]:
    if messages and messages[0].role == "system":
        return messages[0].content, messages[1:]
    return None, messages


def _pairs(messages: list[Message], fmt: str) -> list[tuple[str, str]]:
    """[user, assistant, user, assistant, ...] -> [(user, assistant), ...], else refuse."""
    roles = [m.role for m in messages]
    if len(messages) % 2 or roles != ["user", "assistant"] * (len(messages) // 2):
        raise _refuse(fmt, f"the turn sequence {' -> '.join(roles)}",
                      "only plain user/assistant exchanges fit; convert to sharegpt or messages")
    return [(messages[i].content, messages[i + 1].content) for i in range(0, len(messages), 2)]


def _conversation_record(conv: Conversation, fmt: str) -> dict:
    messages = conv.messages
    if conv.is_plain_text != (fmt == "text"):
        what = "a chat conversation" if fmt == "text" else "plain text"
        raise _refuse(fmt, what, "convert plain text only to text, and chats only to chat formats")
    if conv.tools and fmt not in ("sharegpt", "messages"):
        raise _refuse(fmt, "tool schemas", "convert to sharegpt or messages")
    if fmt == "text":
        return {"text": messages[0].content}
    if fmt == "hotel":
        return _hotel_record(messages)
    if fmt == "messages":
        return _messages_record(conv)
    _check_flags(messages, fmt)
    if fmt == "sharegpt":
        _check_roles(messages, fmt, tuple(SHAREGPT_NAMES))
        system, rest = _split_system(messages)
        record = {"conversations": [{"from": SHAREGPT_NAMES[m.role], "value": m.content} for m in rest]}
        if system is not None:
            record["system"] = system
        if conv.tools:
            record["tools"] = json.dumps(conv.tools, ensure_ascii=False)
        return record
    system, rest = _split_system(messages)
    pairs = _pairs(rest, fmt)
    if fmt == "alpaca":
        record = {"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1]}
        if system is not None:
            record["system"] = system
        if len(pairs) > 1:
            record["history"] = [list(p) for p in pairs[:-1]]
        return record
    turns = [{"input": u, "output": a} for u, a in pairs]
    if system is not None:
        turns[0] = {"system": system, **turns[0]}
    return {"conversation": turns}


def _messages_record(conv: Conversation) -> dict:
    _check_roles(conv.messages, "messages", OPENAI_ROLES + ("function_call",))
    out = []
    for m in conv.messages:
        if m.role == "function_call":
            try:
                calls = json.loads(m.content)
            except json.JSONDecodeError:
                raise _refuse("messages", "a function_call turn that is not JSON",
                              "convert to sharegpt, which keeps function_call text as is") from None
            calls = calls if isinstance(calls, list) else [calls]
            item = {"role": "assistant", "content": None,
                    "tool_calls": [{"type": "function", "function": c} for c in calls]}
        else:
            item = {"role": m.role, "content": m.content}
        if m.train is not None and m.train != _default_target(m.role):
            if m.role not in ("assistant", "function_call"):
                raise _refuse("messages", f"a trained {m.role} turn", "convert to hotel")
            item["weight"] = int(m.train)
        out.append(item)
    record = {"messages": out}
    if conv.tools:
        record["tools"] = conv.tools
    return record


def _hotel_turn(m: Message) -> dict:
    if m.role == "search":
        return {"role": "search", "arguments": json.loads(m.content)}
    if m.role == "return":
        return {"role": "return", "records": json.loads(m.content)}
    return {"role": m.role, "content": m.content}


def _hotel_record(messages: list[Message]) -> dict:
    _check_roles(messages, "hotel", HOTEL_ROLES)
    targets = [i for i, m in enumerate(messages) if m.is_target()]
    if targets != [len(messages) - 1]:
        raise _refuse("hotel", f"{len(targets)} trained turns (a hotel row trains only its last turn)",
                      "convert to messages, or split the dialogue into one row per answer first")
    try:
        context = [_hotel_turn(m) for m in messages[:-1]]
        response = _hotel_turn(messages[-1])
    except json.JSONDecodeError:
        raise _refuse("hotel", "a search/return turn whose content is not JSON", "convert to messages") from None
    return {"context": json.dumps(context, ensure_ascii=False), "response": json.dumps(response, ensure_ascii=False)}


def _plain_prompt(prompt: list[Message], fmt: str) -> tuple[str | None, str]:
    system, rest = _split_system(prompt)
    if len(rest) != 1 or rest[0].role != "user":
        raise _refuse(fmt, "a multi-turn prompt", "convert to preference or sharegpt_preference")
    return system, rest[0].content


def _assistant_text(answer: Message, fmt: str, name: str) -> str:
    if answer.role != "assistant":
        raise _refuse(fmt, f"a {answer.role} turn as {name}", "convert to sharegpt_preference")
    return answer.content


def _preference_record(item: PreferencePair | KTOExample, fmt: str) -> dict:
    if isinstance(item, KTOExample) != (fmt == "kto"):
        what = "a KTO example (one answer with a thumbs up/down)" if fmt != "kto" else \
            "a preference pair (KTO rows hold one answer, so the pairing would be lost)"
        raise _refuse(fmt, what, "keep pairs in preference / qa_preference / sharegpt_preference and KTO rows in kto")
    if fmt == "kto":
        system, user = _plain_prompt(item.prompt, fmt)
        record = {"instruction": user, "input": "",
                  "output": _assistant_text(item.completion, fmt, "output"), "kto_tag": item.desirable}
        return {**record, "system": system} if system is not None else record
    if fmt == "sharegpt_preference":
        conv = _conversation_record(Conversation(list(item.prompt)), "sharegpt")
        for name in ("chosen", "rejected"):
            answer = getattr(item, name)
            _check_roles([answer], fmt, tuple(SHAREGPT_NAMES))
            conv[name] = {"from": SHAREGPT_NAMES[answer.role], "value": answer.content}
        return conv
    chosen = _assistant_text(item.chosen, fmt, "chosen")
    rejected = _assistant_text(item.rejected, fmt, "rejected")
    if fmt == "qa_preference":
        system, user = _plain_prompt(item.prompt, fmt)
        record = {"question": user, "positive_answer": chosen, "negative_answer": rejected}
        return {**record, "system": system} if system is not None else record
    _check_roles(item.prompt, fmt, OPENAI_ROLES)
    system, rest = _split_system(item.prompt)
    prompt = rest[0].content if len(rest) == 1 and rest[0].role == "user" else \
        [{"role": m.role, "content": m.content} for m in item.prompt]
    record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {**record, "system": system} if system is not None and isinstance(prompt, str) else record


def to_record(item: Conversation | PreferencePair | KTOExample, fmt: str) -> dict:
    """Write a normalised item back as a record of `fmt`; RecordError names what would be lost."""
    check_format_name(fmt, FORMATS)
    if isinstance(item, Conversation):
        if fmt in PREFERENCE_FORMATS:
            raise _refuse(fmt, "a conversation (it has no rejected answer)", "pick a conversation format")
        record = _conversation_record(item, fmt)
        return {**item.meta.get("extra", {}), **record}
    if fmt in CONVERSATION_FORMATS:
        raise _refuse(fmt, "preference data (the rejected answer would be lost)", "pick a preference format")
    return _preference_record(item, fmt)
