"""Preference formats: `prompt` / `chosen` / `rejected` (TRL's, also with message lists and an
implicit prompt), `question` / `positive_answer` / `negative_answer`, and LLaMA-Factory's
Alpaca-style KTO rows with a `kto_tag`."""

from __future__ import annotations

from tunelab.data.formats.base import (
    OPENAI_ROLES,
    PREFERENCE_ROLES,
    Format,
    RecordError,
    assistant_text,
    check_roles,
    plain_prompt,
    split_system,
    string,
    system_messages,
    user_text,
    with_system,
)
from tunelab.data.formats.openai import openai_message, openai_messages
from tunelab.data.types import KTOExample, Message, PreferencePair


def answer(value, name: str) -> tuple[list[Message], Message]:
    """A chosen/rejected/completion value: a string, a message object, or a message list
    ending on the answer. Messages before the answer in a list (TRL's "implicit prompt"
    style) are returned so the caller can add them to the prompt."""
    if isinstance(value, str):
        return [], Message("assistant", value)
    if isinstance(value, dict):
        return [], openai_message(value, name, PREFERENCE_ROLES)
    messages = openai_messages(value, name, PREFERENCE_ROLES)
    if not messages:
        raise RecordError(f"{name} is an empty list", fix=f"give {name} the answer text")
    return messages[:-1], messages[-1]


def prompt_of(record: dict) -> list[Message]:
    """The system key plus `prompt`: a string (one user turn) or a message list."""
    value = record["prompt"]
    prompt = [Message("user", value)] if isinstance(value, str) else \
        openai_messages(value, "prompt", PREFERENCE_ROLES)
    return system_messages(record) + prompt


def prompt_record(prompt: list[Message], fmt: Format) -> dict:
    """The inverse of `prompt_of`: a string prompt where it is one user turn, else messages."""
    check_roles(prompt, fmt, OPENAI_ROLES)
    system, rest = split_system(prompt)
    if len(rest) == 1 and rest[0].role == "user":
        return with_system({"prompt": rest[0].content}, system)
    return {"prompt": [{"role": m.role, "content": m.content} for m in prompt]}


class Preference(Format):
    name = "preference"
    kind = "preference"
    required, optional = ("prompt", "chosen", "rejected"), ("system",)

    def detect(self, keys) -> bool:
        return "chosen" in keys or "rejected" in keys

    def read(self, record: dict, source: str = "") -> PreferencePair:
        prompt = prompt_of(record)
        before_chosen, chosen = answer(record["chosen"], "chosen")
        before_rejected, rejected = answer(record["rejected"], "rejected")
        if [(m.role, m.content) for m in before_chosen] != [(m.role, m.content) for m in before_rejected]:
            raise RecordError("chosen and rejected continue different conversations",
                              fix="keep only the answers in chosen/rejected and the shared turns in prompt")
        return PreferencePair(prompt + before_chosen, chosen, rejected, source)

    def write(self, item: PreferencePair) -> dict:
        chosen = assistant_text(item.chosen, self, "chosen")
        rejected = assistant_text(item.rejected, self, "rejected")
        record = prompt_record(item.prompt, self)
        system = record.pop("system", None)
        return with_system({**record, "chosen": chosen, "rejected": rejected}, system)


class QAPreference(Format):
    name = "qa_preference"
    kind = "preference"
    required, optional = ("question", "positive_answer", "negative_answer"), ("system",)

    def detect(self, keys) -> bool:
        return "question" in keys or "positive_answer" in keys

    def read(self, record: dict, source: str = "") -> PreferencePair:
        prompt = system_messages(record) + [Message("user", string(record["question"], "question"))]
        chosen = Message("assistant", string(record["positive_answer"], "positive_answer"))
        rejected = Message("assistant", string(record["negative_answer"], "negative_answer"))
        return PreferencePair(prompt, chosen, rejected, source)

    def write(self, item: PreferencePair) -> dict:
        chosen = assistant_text(item.chosen, self, "chosen")
        rejected = assistant_text(item.rejected, self, "rejected")
        system, user = plain_prompt(item.prompt, self)
        return with_system({"question": user, "positive_answer": chosen, "negative_answer": rejected}, system)


def kto_label(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise RecordError(f"{name} must be true or false, got {value!r}",
                          fix=f"write {name} as a JSON boolean (true / false), not a string or number")
    return value


class KTO(Format):
    """LLaMA-Factory's KTO rows: Alpaca keys plus `kto_tag` (true: a good answer)."""

    name = "kto"
    kind = "preference"
    required, optional = ("instruction", "output", "kto_tag"), ("input", "system")

    def detect(self, keys) -> bool:
        return "kto_tag" in keys

    def read(self, record: dict, source: str = "") -> KTOExample:
        tag = kto_label(record["kto_tag"], "kto_tag")
        user = user_text(string(record["instruction"], "instruction"),
                         string(record.get("input"), "input", optional=True))
        prompt = system_messages(record) + [Message("user", user)]
        return KTOExample(prompt, Message("assistant", string(record["output"], "output")), tag, source)

    def write(self, item: KTOExample) -> dict:
        system, user = plain_prompt(item.prompt, self)
        record = {"instruction": user, "input": "", "output": assistant_text(item.completion, self, "output"),
                  "kto_tag": item.desirable}
        return with_system(record, system)
