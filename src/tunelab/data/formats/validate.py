"""Whether a normalised item can be trained on, whatever format it came from."""

from __future__ import annotations

from tunelab.data.formats.base import (
    ANSWER_ROLES,
    CALL_ROLES,
    RESULT_ROLES,
    RecordError,
)
from tunelab.data.types import Conversation, KTOExample, Message, PreferencePair


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
