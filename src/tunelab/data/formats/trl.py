"""TRL's prompt-completion formats: `prompt` / `completion` for SFT (strings, or message lists:
the "conversational" variant) and, with a boolean `label`, unpaired preference data for KTO.

A string prompt becomes one user turn and a string completion one assistant turn, rendered
with the chat template like every other chat format; only the completion is trained.
"""

from __future__ import annotations

from tunelab.data.formats.base import (
    OPENAI_ROLES,
    Format,
    chat_checks,
    check_roles,
    with_system,
)
from tunelab.data.formats.openai import openai_message, openai_messages
from tunelab.data.formats.preference import answer, kto_label, prompt_of, prompt_record
from tunelab.data.types import Conversation, KTOExample, Message


def _completion(value) -> list[Message]:
    if isinstance(value, str):
        return [Message("assistant", value)]
    if isinstance(value, dict):
        return [openai_message(value, "completion")]
    return openai_messages(value, "completion")


def _completion_record(messages: list[Message], as_text: bool):
    if as_text and len(messages) == 1 and messages[0].role == "assistant":
        return messages[0].content
    return [{"role": m.role, "content": m.content} for m in messages]


class PromptCompletion(Format):
    name = "prompt_completion"
    required, optional = ("prompt", "completion"), ("system",)

    def detect(self, keys) -> bool:
        return "prompt" in keys and "completion" in keys and "label" not in keys

    def read(self, record: dict, source: str = "") -> Conversation:
        prompt = prompt_of(record)
        for m in prompt:  # the prompt is context, whatever its roles (TRL's completion-only loss)
            m.train = False if m.train is None else m.train
        return self.conversation(record, prompt + _completion(record["completion"]), source)

    def write(self, conv: Conversation) -> dict:
        chat_checks(conv, self)
        check_roles(conv.messages, self, OPENAI_ROLES)
        messages = conv.messages
        first = next((i for i, m in enumerate(messages) if m.is_target()), len(messages))
        if first == len(messages) or not all(m.is_target() for m in messages[first:]):
            raise self.refuse("trained turns before untrained ones (only the completion at the end is trained)",
                              "convert to messages, which keeps a weight per turn")
        record = prompt_record(messages[:first], self)
        as_text = isinstance(record["prompt"], str)
        system = record.pop("system", None)
        record["completion"] = _completion_record(messages[first:], as_text)
        return with_system(record, system)


class UnpairedPreference(Format):
    """`{"prompt", "completion", "label": true|false}`: one answer with a thumbs up or down (KTO)."""

    name = "unpaired_preference"
    kind = "preference"
    required, optional = ("prompt", "completion", "label"), ("system",)

    def detect(self, keys) -> bool:
        return "completion" in keys and "label" in keys

    def read(self, record: dict, source: str = "") -> KTOExample:
        before, completion = answer(record["completion"], "completion")
        return KTOExample(prompt_of(record) + before, completion, kto_label(record["label"], "label"), source)

    def write(self, item: KTOExample) -> dict:
        record = prompt_record(item.prompt, self)
        as_text = isinstance(record["prompt"], str)
        system = record.pop("system", None)
        record["completion"] = _completion_record([item.completion], as_text)
        record["label"] = item.desirable
        return with_system(record, system)


