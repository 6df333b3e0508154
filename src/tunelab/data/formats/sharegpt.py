"""ShareGPT (`conversations` of from/value turns, LLaMA-Factory's second format) and its
preference variant with `chosen` / `rejected` turns."""

from __future__ import annotations

import json

from tunelab.data.formats.base import (
    Format,
    RecordError,
    as_list,
    chat_checks,
    check_flags,
    check_roles,
    known_role,
    split_system,
    string,
    system_messages,
    tools_of,
)
from tunelab.data.types import Conversation, Message, PreferencePair

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "function_call", "observation": "tool",
                  "tool": "tool"}
SHAREGPT_NAMES = {"user": "human", "assistant": "gpt", "system": "system",
                  "function_call": "function_call", "tool": "observation"}


def sharegpt_message(turn, name: str) -> Message:
    if not isinstance(turn, dict):
        raise RecordError(f"{name} must be an object with 'from' and 'value'",
                          fix='write turns as {"from": "human", "value": "..."}')
    speaker = known_role(turn.get("from"), SHAREGPT_ROLES, f"{name} has unknown role 'from':")
    role = SHAREGPT_ROLES[speaker]
    # function_call turns are the model's output: trained like assistant turns.
    return Message(role, string(turn.get("value"), f"{name}.value"),
                   train=True if role == "function_call" else None)


def sharegpt_messages(record: dict) -> list[Message]:
    turns = as_list(record["conversations"], "conversations")
    return system_messages(record) + [sharegpt_message(t, f"conversations[{i}]") for i, t in enumerate(turns)]


class ShareGPT(Format):
    """`{"conversations": [{"from": "human"|"gpt"|"function_call"|"observation", "value"}], "system"?, "tools"?}`."""

    name = "sharegpt"
    required, optional = ("conversations",), ("system", "tools")

    def detect(self, keys) -> bool:
        return "conversations" in keys and "chosen" not in keys and "rejected" not in keys

    def read(self, record: dict, source: str = "") -> Conversation:
        return self.conversation(record, sharegpt_messages(record), source, tools=tools_of(record.get("tools")))

    def write(self, conv: Conversation) -> dict:
        chat_checks(conv, self, keeps_tools=True)
        check_flags(conv.messages, self)
        check_roles(conv.messages, self, tuple(SHAREGPT_NAMES))
        system, rest = split_system(conv.messages)
        record = {"conversations": [{"from": SHAREGPT_NAMES[m.role], "value": m.content} for m in rest]}
        if system is not None:
            record["system"] = system
        if conv.tools:
            record["tools"] = json.dumps(conv.tools, ensure_ascii=False)
        return record


class ShareGPTPreference(Format):
    """ShareGPT turns as the prompt plus `chosen` / `rejected` turns (LLaMA-Factory's ranking data)."""

    name = "sharegpt_preference"
    kind = "preference"
    required, optional = ("conversations", "chosen", "rejected"), ("system", "tools")

    def detect(self, keys) -> bool:
        return "conversations" in keys and ("chosen" in keys or "rejected" in keys)

    def read(self, record: dict, source: str = "") -> PreferencePair:
        return PreferencePair(sharegpt_messages(record), sharegpt_message(record["chosen"], "chosen"),
                              sharegpt_message(record["rejected"], "rejected"), source)

    def write(self, item: PreferencePair) -> dict:
        record = SHAREGPT.write(Conversation(list(item.prompt)))
        for name in ("chosen", "rejected"):
            answer = getattr(item, name)
            check_roles([answer], self, tuple(SHAREGPT_NAMES))
            record[name] = {"from": SHAREGPT_NAMES[answer.role], "value": answer.content}
        return record


SHAREGPT = ShareGPT()
