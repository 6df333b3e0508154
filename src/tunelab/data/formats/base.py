"""What every format shares: the `Format` class, `RecordError`, roles, and small field readers.

A format sees one record (a dict) and knows nothing about files: a problem is raised as
`RecordError(what, fix)` and the reader (`readers.py`) adds the file, line and record
number. `write` is the inverse of `read`, used by `tunelab data convert`; it refuses
(naming what would be lost) rather than silently dropping data.
"""

from __future__ import annotations

import json

from tunelab.data.types import Conversation, KTOExample, Message, PreferencePair
from tunelab.errors import TunelabError, nearest


class RecordError(TunelabError):
    """A problem with one record. The reader adds where it is (file:line: record N)."""

    def __init__(self, what: str, fix: str | None = None):
        super().__init__(what, None, fix)


Item = Conversation | PreferencePair | KTOExample

# Turn classes for the order check. "Calls" are the model asking a tool (ShareGPT's
# function_call, the hotel set's search); "results" are what the tool answers.
ANSWER_ROLES = ("assistant", "function_call", "search")
CALL_ROLES = ("function_call", "search")
RESULT_ROLES = ("tool", "return")
OPENAI_ROLES = ("system", "user", "assistant", "tool")
# Preference records may also hold the hotel roles, rendered as the hotel reader renders
# them (`tunelab data mine-pairs` writes pairs from hotel dialogues so).
PREFERENCE_ROLES = OPENAI_ROLES + ("search", "return")


class Format:
    """One record format: its keys, how to recognise it, read it and write it back.

    `kind` is "conversation" (-> Conversation) or "preference" (-> PreferencePair /
    KTOExample). `required` keys must be present; other keys than `required + optional`
    are kept in `meta["extra"]` so that `convert` carries ids and labels through.
    """

    name: str = ""
    kind: str = "conversation"
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    def detect(self, keys) -> bool:
        """Whether a record with these keys is of this format (asked in registry order)."""
        return all(k in keys for k in self.required)

    def read(self, record: dict, source: str = "") -> Item:
        raise NotImplementedError

    def write(self, item: Item) -> dict:
        raise NotImplementedError

    def require(self, record: dict) -> None:
        for key in self.required:
            if record.get(key) is None:
                hint = nearest(key, [k for k in record if k not in self.required + self.optional])
                raise RecordError(f"missing field {key!r} ({self.name} records need {', '.join(self.required)})",
                                  fix=f"rename {hint!r} to {key!r}" if hint else f"add {key!r}")

    def extra(self, record: dict) -> dict:
        known = set(self.required) | set(self.optional)
        return {k: v for k, v in record.items() if k not in known}

    def conversation(self, record: dict, messages: list[Message], source: str, *, tools=None,
                     meta: dict | None = None) -> Conversation:
        """The Conversation of `messages`, keeping the record's unknown keys for convert."""
        meta = dict(meta or {})
        extra = self.extra(record)
        if extra:
            meta["extra"] = extra
        return Conversation(messages, source=source, tools=tools, meta=meta)

    def refuse(self, lost: str, fix: str) -> RecordError:
        return RecordError(f"{self.name} cannot hold {lost}", fix=fix)


# --- small field readers -------------------------------------------------------------

def string(value, name: str, *, optional: bool = False) -> str:
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"{name} must be a string, got {type(value).__name__}",
                          fix=f"write {name} as a JSON string")
    return value


def as_list(value, name: str) -> list:
    if not isinstance(value, list):
        raise RecordError(f"{name} must be a list, got {type(value).__name__}",
                          fix=f"write {name} as a JSON list")
    return value


def user_text(instruction: str, extra: str) -> str:
    # Alpaca's convention (and LLaMA-Factory's): the input follows the instruction on a new line.
    return f"{instruction}\n{extra}" if instruction and extra else instruction or extra


def system_messages(record: dict) -> list[Message]:
    system = string(record.get("system"), "system", optional=True)
    return [Message("system", system)] if system else []


def tools_of(value) -> list | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):  # LLaMA-Factory stores tools as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordError(f"tools is a string but not valid JSON ({exc.msg})",
                              fix="write tools as a JSON list of tool schemas") from None
    return as_list(value, "tools")


def known_role(role, allowed, what: str):
    """`role` if the format knows it; else a RecordError with the nearest known role."""
    if role in allowed:
        return role
    hint = nearest(str(role), allowed)
    raise RecordError(f"{what} {role!r}",
                      fix=f"use {hint!r}" if hint else f"use one of {', '.join(allowed)}")


# --- writing helpers -----------------------------------------------------------------------

def default_target(role: str) -> bool:
    return role in ("assistant", "function_call")


def check_flags(messages: list[Message], fmt: Format) -> None:
    """Refuse turns whose trained/not-trained flag the format cannot express."""
    for i, m in enumerate(messages):
        if m.train is not None and m.train != default_target(m.role):
            state = "trained" if m.train else "not trained"
            raise fmt.refuse(f"turn {i + 1} ({m.role}) being {state}",
                             "convert to messages (which keeps it as weight) or hotel")


def check_roles(messages: list[Message], fmt: Format, roles: tuple[str, ...]) -> None:
    for i, m in enumerate(messages):
        if m.role not in roles:
            raise fmt.refuse(f"a {m.role!r} turn (turn {i + 1})",
                             f"pick a format whose roles include {m.role!r} (hotel keeps search/return; "
                             "sharegpt and messages keep tool turns)")


def split_system(messages: list[Message]) -> tuple[str | None, list[Message]]:
    if messages and messages[0].role == "system":
        return messages[0].content, messages[1:]
    return None, messages


def chat_checks(conv: Conversation, fmt: Format, *, keeps_tools: bool = False) -> None:
    """What every chat format refuses: plain text, and tool schemas it has no place for."""
    if conv.is_plain_text:
        raise fmt.refuse("plain text", "convert plain text only to text, and chats only to chat formats")
    if conv.tools and not keeps_tools:
        raise fmt.refuse("tool schemas", "convert to sharegpt or messages")


def exchanges(messages: list[Message], fmt: Format) -> list[tuple[str, str]]:
    """[user, assistant, user, assistant, ...] -> [(user, assistant), ...], else refuse."""
    roles = [m.role for m in messages]
    if len(messages) % 2 or roles != ["user", "assistant"] * (len(messages) // 2):
        raise fmt.refuse(f"the turn sequence {' -> '.join(roles)}",
                         "only plain user/assistant exchanges fit; convert to sharegpt or messages")
    return [(messages[i].content, messages[i + 1].content) for i in range(0, len(messages), 2)]


def with_system(record: dict, system: str | None) -> dict:
    return {**record, "system": system} if system is not None else record


def plain_prompt(prompt: list[Message], fmt: Format) -> tuple[str | None, str]:
    """(system, user text) of a one-question prompt, else refuse."""
    system, rest = split_system(prompt)
    if len(rest) != 1 or rest[0].role != "user":
        raise fmt.refuse("a multi-turn prompt", "convert to preference or sharegpt_preference")
    return system, rest[0].content


def assistant_text(answer: Message, fmt: Format, name: str) -> str:
    if answer.role != "assistant":
        raise fmt.refuse(f"a {answer.role} turn as {name}", "convert to sharegpt_preference")
    return answer.content
