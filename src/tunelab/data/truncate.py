"""Fit a conversation into `cutoff_len` by shortening what matters least first.

In tool-using dialogues most tokens are tool results (about 73% of the hotel train
characters are `return` records), and the oldest of them matter least to the next answer.
Plain truncation cuts the end, which is where the answers are. Here, a conversation that
does not fit loses, in this order, until it fits:

1. the oldest tool results, shortened one by one (a JSON list keeps its first element,
   other text its head);
2. those shortened results, dropped, oldest first;
3. the oldest other turns, dropped, oldest first;

never a system prompt, a target turn or the latest user turn. What still does not fit is
cut at the end as `tokenize.encode_conversation` always did (its later targets are lost).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from tunelab.data.formats import RESULT_ROLES
from tunelab.data.tokenize import EncodedExample, encode_conversation
from tunelab.data.types import Conversation, Message

UNLIMITED = 1 << 31
TEXT_HEAD = 200  # characters a shortened plain-text tool result keeps
SHORTENED_MARK = " …"


@dataclass
class TruncationStats:
    """How many samples did not fit, and what was done to them."""

    samples: int = 0  # samples that were over cutoff_len
    actions: Counter = field(default_factory=Counter)

    def add(self, actions: list[str]) -> None:
        if actions:
            self.samples += 1
            self.actions.update(actions)

    def summary(self, total: int, cutoff_len: int) -> str:
        done = ", ".join(f"{n} {what}" for what, n in self.actions.most_common())
        return f"{self.samples} of {total} samples were longer than cutoff_len={cutoff_len}: {done}"


def encode_fitted(conv: Conversation, tokenizer, template_src: str, cutoff_len: int,
                  train_on: str = "all") -> tuple[EncodedExample, list[str]]:
    """`encode_conversation` with the context shortened first (see the module docstring);
    also returns what was done (e.g. ["tool result shortened", "turn dropped"])."""
    def encode(c: Conversation, limit: int = UNLIMITED) -> EncodedExample:
        return encode_conversation(c, tokenizer, template_src, limit, train_on)

    full = encode(conv)
    if len(full.input_ids) <= cutoff_len:
        return full, []
    actions: list[str] = []
    messages = list(conv.messages)
    for step, what in _steps(messages, train_on):
        messages = step
        actions.append(what)
        fitted = encode(_with_messages(conv, messages))
        if len(fitted.input_ids) <= cutoff_len:
            return fitted, actions
    actions.append("cut at the end")
    return encode(_with_messages(conv, messages), cutoff_len), actions


def _with_messages(conv: Conversation, messages: list[Message]) -> Conversation:
    return Conversation(messages, source=conv.source, tools=conv.tools, meta=conv.meta)


def _protected(messages: list[Message], train_on: str) -> set[int]:
    """Turns never touched: system prompts, the target turns, the latest user turn."""
    targets = [i for i, m in enumerate(messages) if m.is_target()]
    keep = set(targets[-1:] if train_on == "last" else targets)
    keep |= {i for i, m in enumerate(messages) if m.role == "system"}
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    return keep | set(users[-1:])


def _steps(messages: list[Message], train_on: str):
    """Each successive shorter version of `messages`, with what changed. Messages are
    identified by object so indices can move as turns are dropped."""
    protected = {id(messages[i]) for i in _protected(messages, train_on)}
    last_target = max((i for i, m in enumerate(messages) if id(m) in protected and m.is_target()), default=-1)
    results = [m for m in messages[:last_target] if m.role in RESULT_ROLES and id(m) not in protected]
    shortened = []
    for old in results:  # 1. shorten the oldest results
        new = _shorten(old)
        if new is not None:
            messages = [new if m is old else m for m in messages]
            shortened.append(new)
            yield messages, "tool result shortened"
        else:
            shortened.append(old)
    for old in shortened:  # 2. drop them, oldest first
        messages = [m for m in messages if m is not old]
        yield messages, "tool result dropped"
    for old in list(messages):  # 3. drop the oldest other turns (the results are gone already)
        if id(old) not in protected:
            messages = [m for m in messages if m is not old]
            yield messages, "turn dropped"


def _shorten(m: Message) -> Message | None:
    """A shorter version of a tool result, or None if it is already short."""
    text = m.content
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, list) and len(value) > 1:
        indent = _indent_of(text)
        return Message(m.role, json.dumps(value[:1], indent=indent, ensure_ascii=False), train=m.train)
    if len(text) > TEXT_HEAD + len(SHORTENED_MARK):
        return Message(m.role, text[:TEXT_HEAD] + SHORTENED_MARK, train=m.train)
    return None


def _indent_of(text: str) -> int | None:
    """The indentation the JSON was written with (the hotel set: 4), or None (one line)."""
    lines = text.splitlines()
    if len(lines) < 2:
        return None
    second = lines[1]
    return len(second) - len(second.lstrip(" ")) or None
