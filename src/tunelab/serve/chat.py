"""`tunelab chat`: multi-turn terminal chat, streamed, in the model's own chat template.

Commands: /reset (forget the conversation), /system TEXT (set or, bare, clear the system
prompt), /exit. The conversation is re-encoded each turn; when it no longer fits the
context with room for a reply, the oldest exchanges are dropped, with a notice.
"""

from __future__ import annotations

import contextlib
from typing import TextIO

from tunelab.data.types import Message
from tunelab.serve.engine import Engine

HELP = "commands: /reset  /system TEXT  /exit"


def fit_history(engine: Engine, system: str | None, history: list[Message],
                reply_budget: int) -> tuple[list[int] | None, list[Message]]:
    """Prompt ids of the longest recent history that leaves `reply_budget` tokens, and that
    history (the oldest exchanges dropped). None: even the last user turn alone does not fit."""
    kept = list(history)
    while True:
        messages = ([Message("system", system)] if system else []) + kept
        prompt = engine.encode(messages)
        if engine.room_for(len(prompt)) >= reply_budget:
            return prompt, kept
        if len(kept) <= 1:
            return None, history
        # Drop the oldest exchange whole (user turn + its reply) so roles keep alternating.
        del kept[:2 if len(kept) > 2 and kept[1].role == "assistant" else 1]


def chat_loop(engine: Engine, options, stdin: TextIO, stdout: TextIO, system: str | None = None) -> None:
    history: list[Message] = []
    adapters = ", ".join(engine.adapters) or "none"
    print(f"tunelab chat: {engine.base_name} (adapter: {adapters}, context {engine.context_length} tokens). {HELP}",
          file=stdout, flush=True)
    while True:
        print("\nyou> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            print(file=stdout)
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                history.clear()
                print("(conversation cleared)", file=stdout)
            elif command == "/system":
                system = arg.strip() or None
                print(f"(system prompt {'set' if system else 'cleared'})", file=stdout)
            else:
                print(f"unknown command {command}; {HELP}", file=stdout)
            continue
        history.append(Message("user", text))
        reply = answer(engine, options, system, history, stdout)
        if reply is None:
            history.pop()
        else:
            history.append(Message("assistant", reply))


def answer(engine: Engine, options, system: str | None, history: list[Message], stdout: TextIO) -> str | None:
    """Stream one reply to `stdout`; None when the message cannot fit the context at all."""
    # Keep room for a reply of max_new_tokens, but never give a reply more than a quarter of a
    # small context: a long history is worth more than a long answer budget.
    budget = min(options.max_new_tokens, max(engine.context_length // 4, 1))
    prompt, kept = fit_history(engine, system, history, budget)
    if prompt is None:
        print(f"(that message is too long: it leaves no room for a reply in the {engine.context_length}-token "
              f"context; send a shorter one)", file=stdout)
        return None
    if len(kept) < len(history):
        print(f"(dropped the {len(history) - len(kept)} oldest turn(s) to stay within the "
              f"{engine.context_length}-token context)", file=stdout)
        history[:] = kept
    room = engine.room_for(len(prompt))
    if room < options.max_new_tokens:
        options = type(options)(**{**vars(options), "max_new_tokens": room})
    print("assistant> ", end="", file=stdout, flush=True)
    reply = ""
    adapter = next(iter(engine.adapters), None)  # chat serves the base with at most one adapter
    with contextlib.closing(engine.stream(prompt, options, adapter)) as deltas:
        try:
            for delta in deltas:
                reply += delta
                print(delta, end="", file=stdout, flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            print(" (interrupted)", end="", file=stdout)
    print(file=stdout, flush=True)
    return reply
