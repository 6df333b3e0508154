"""The simple chat formats: Alpaca (LLaMA-Factory's default), XTuner's `conversation`
turns of input/output, and plain `text` for continued pre-training."""

from __future__ import annotations

from tunelab.data.formats.base import (
    Format,
    RecordError,
    as_list,
    chat_checks,
    check_flags,
    exchanges,
    split_system,
    string,
    system_messages,
    user_text,
    with_system,
)
from tunelab.data.types import Conversation, Message


class Alpaca(Format):
    """`{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}`."""

    name = "alpaca"
    required, optional = ("instruction", "output"), ("input", "system", "history")

    def detect(self, keys) -> bool:
        return "instruction" in keys

    def read(self, record: dict, source: str = "") -> Conversation:
        messages = system_messages(record)
        for i, pair in enumerate(record.get("history") or []):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise RecordError(f"history[{i}] is not a [user, assistant] pair of strings",
                                  fix='write history as [["question", "answer"], ...]')
            messages += [Message("user", pair[0]), Message("assistant", pair[1])]
        instruction = string(record["instruction"], "instruction")
        extra = string(record.get("input"), "input", optional=True)
        messages += [Message("user", user_text(instruction, extra)),
                     Message("assistant", string(record["output"], "output"))]
        return self.conversation(record, messages, source)

    def write(self, conv: Conversation) -> dict:
        chat_checks(conv, self)
        check_flags(conv.messages, self)
        system, rest = split_system(conv.messages)
        pairs = exchanges(rest, self)
        record = with_system({"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1]}, system)
        if len(pairs) > 1:
            record["history"] = [list(p) for p in pairs[:-1]]
        return record


class InputOutputTurns(Format):
    """XTuner's (and EmoLLM's) `{"conversation": [{"system"?, "input", "output"}, ...]}`:
    one user/assistant exchange per turn, the system prompt in the first turn only."""

    name = "conversation"
    required = ("conversation",)

    def read(self, record: dict, source: str = "") -> Conversation:
        turns = as_list(record["conversation"], "conversation")
        messages: list[Message] = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RecordError(f"conversation[{i}] must be an object with 'input' and 'output'",
                                  fix='write turns as {"input": "...", "output": "..."}')
            system = string(turn.get("system"), f"conversation[{i}].system", optional=True)
            if system and i > 0 and system != turns[0].get("system"):
                raise RecordError(f"conversation[{i}] sets a different system prompt mid-conversation",
                                  fix="put the system prompt in the first turn only")
            if system and i == 0:
                messages.append(Message("system", system))
            for key, role in (("input", "user"), ("output", "assistant")):
                if turn.get(key) is None:
                    raise RecordError(f"conversation[{i}] is missing {key!r}", fix=f"add {key!r} to every turn")
                messages.append(Message(role, string(turn[key], f"conversation[{i}].{key}")))
        return self.conversation(record, messages, source)

    def write(self, conv: Conversation) -> dict:
        chat_checks(conv, self)
        check_flags(conv.messages, self)
        system, rest = split_system(conv.messages)
        turns = [{"input": u, "output": a} for u, a in exchanges(rest, self)]
        if system is not None:
            turns[0] = {"system": system, **turns[0]}
        return {"conversation": turns}


class Text(Format):
    """`{"text": "..."}`: continued pre-training, every token trained."""

    name = "text"
    required = ("text",)

    def read(self, record: dict, source: str = "") -> Conversation:
        return self.conversation(record, [Message("text", string(record["text"], "text"), train=True)], source)

    def write(self, conv: Conversation) -> dict:
        if not conv.is_plain_text:
            raise self.refuse("a chat conversation", "convert plain text only to text, and chats only to chat formats")
        return {"text": conv.messages[0].content}
