"""The hotel booking set's rows: `context` (earlier turns) and `response` (the trained turn),
each JSON-encoded, with `search` (slot arguments) and `return` (records) tool turns."""

from __future__ import annotations

import json

from tunelab.data.formats.base import (
    Format,
    RecordError,
    as_list,
    chat_checks,
    check_roles,
    string,
)
from tunelab.data.types import Conversation, Message

HOTEL_ROLES = ("user", "assistant", "search", "return")


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
        content = json.dumps(as_list(turn.get("records"), f"{name}.records"), indent=4, ensure_ascii=False)
    else:
        content = string(turn.get("content"), f"{name}.content")
    return Message(role, content)


def _hotel_turn(m: Message) -> dict:
    if m.role == "search":
        return {"role": "search", "arguments": json.loads(m.content)}
    if m.role == "return":
        return {"role": "return", "records": json.loads(m.content)}
    return {"role": m.role, "content": m.content}


class Hotel(Format):
    name = "hotel"
    required = ("context", "response")

    def read(self, record: dict, source: str = "") -> Conversation:
        context = as_list(_json_field(record["context"], "context"), "context")
        messages = [render_hotel_turn(t, f"context[{i}]") for i, t in enumerate(context)]
        for m in messages:
            m.train = False
        response = render_hotel_turn(_json_field(record["response"], "response"), "response")
        response.train = True
        return self.conversation(record, messages + [response], source, meta={"response_role": response.role})

    def write(self, conv: Conversation) -> dict:
        chat_checks(conv, self)
        messages = conv.messages
        check_roles(messages, self, HOTEL_ROLES)
        targets = [i for i, m in enumerate(messages) if m.is_target()]
        if targets != [len(messages) - 1]:
            raise self.refuse(f"{len(targets)} trained turns (a hotel row trains only its last turn)",
                              "convert to messages, or split the dialogue into one row per answer first")
        try:
            context = [_hotel_turn(m) for m in messages[:-1]]
            response = _hotel_turn(messages[-1])
        except json.JSONDecodeError:
            raise self.refuse("a search/return turn whose content is not JSON", "convert to messages") from None
        return {"context": json.dumps(context, ensure_ascii=False),
                "response": json.dumps(response, ensure_ascii=False)}
