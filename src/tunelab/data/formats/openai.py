"""OpenAI-style `messages` records (also TRL's conversational format), and the message
readers the preference formats share."""

from __future__ import annotations

import json

from tunelab.data.formats.base import (
    OPENAI_ROLES,
    Format,
    RecordError,
    as_list,
    chat_checks,
    check_roles,
    default_target,
    known_role,
    tools_of,
)
from tunelab.data.types import Conversation, Message


def openai_content(content, name: str) -> str:
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


def openai_message(message, name: str, roles: tuple[str, ...] = OPENAI_ROLES) -> Message:
    if not isinstance(message, dict):
        raise RecordError(f"{name} must be an object with 'role' and 'content'",
                          fix='write messages as {"role": "user", "content": "..."}')
    role = known_role(message.get("role"), roles, f"{name} has unknown role")
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
                 for c in as_list(message["tool_calls"], f"{name}.tool_calls")]
        return Message("function_call", json.dumps(calls, ensure_ascii=False),
                       train=True if train is None else train)
    return Message(role, openai_content(message.get("content"), f"{name}.content"), train=train)


def openai_messages(value, name: str, roles: tuple[str, ...] = OPENAI_ROLES) -> list[Message]:
    return [openai_message(m, f"{name}[{i}]", roles) for i, m in enumerate(as_list(value, name))]


class Messages(Format):
    """`{"messages": [{"role": ..., "content": ...}, ...], "tools": [...]}`; a `weight` of 0/1
    on a turn says whether it is trained; assistant `tool_calls` become function_call turns."""

    name = "messages"
    required, optional = ("messages",), ("tools",)

    def read(self, record: dict, source: str = "") -> Conversation:
        return self.conversation(record, openai_messages(record["messages"], "messages"), source,
                                 tools=tools_of(record.get("tools")))

    def write(self, conv: Conversation) -> dict:
        chat_checks(conv, self, keeps_tools=True)
        check_roles(conv.messages, self, OPENAI_ROLES + ("function_call",))
        record = {"messages": [self._turn(m) for m in conv.messages]}
        if conv.tools:
            record["tools"] = conv.tools
        return record

    def _turn(self, m: Message) -> dict:
        if m.role == "function_call":
            try:
                calls = json.loads(m.content)
            except json.JSONDecodeError:
                raise self.refuse("a function_call turn that is not JSON",
                                  "convert to sharegpt, which keeps function_call text as is") from None
            calls = calls if isinstance(calls, list) else [calls]
            item = {"role": "assistant", "content": None,
                    "tool_calls": [{"type": "function", "function": c} for c in calls]}
        else:
            item = {"role": m.role, "content": m.content}
        if m.train is not None and m.train != default_target(m.role):
            if m.role not in ("assistant", "function_call"):
                raise self.refuse(f"a trained {m.role} turn", "convert to hotel")
            item["weight"] = int(m.train)
        return item
