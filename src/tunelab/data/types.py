"""The shapes every data format normalises to.

Readers turn Alpaca, ShareGPT, OpenAI messages, multi-turn `conversation` lists,
the hotel context/response rows and plain text into `Conversation`; preference
data into `PreferencePair` (DPO/SimPO) or `KTOExample`. Everything downstream
(tokenize, train, evaluate) sees only these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The label of a token no loss is computed on (prompt, padding): the index torch's
# cross_entropy ignores by default.
IGNORE_INDEX = -100

# Roles a chat template understands. Other roles (the hotel set's `search` and
# `return`) are allowed; templates that cannot render them say so.
STANDARD_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Message:
    role: str
    content: str
    # Whether this turn is a training target. None = decided by role: assistant turns
    # are targets, everything else is context. Readers set it where the format says
    # more (the hotel rows train only the `response` turn, whatever its role).
    train: bool | None = None

    def is_target(self) -> bool:
        return self.train if self.train is not None else self.role == "assistant"


@dataclass
class Conversation:
    messages: list[Message]
    source: str = ""  # "path:line" (or "path:record N"), for error messages
    tools: list | None = None  # OpenAI-style tool schemas, passed to the chat template
    meta: dict = field(default_factory=dict)  # extra fields kept for convert/split (e.g. hotel role)

    @property
    def is_plain_text(self) -> bool:
        """Continued pre-training rows: one `text` message, trained on in full."""
        return len(self.messages) == 1 and self.messages[0].role == "text"


@dataclass
class PreferencePair:
    """One prompt with a preferred and a dispreferred answer (DPO, SimPO, ORPO)."""

    prompt: list[Message]  # the conversation before the answer (ends on a user turn)
    chosen: Message
    rejected: Message
    source: str = ""


@dataclass
class KTOExample:
    """One prompt with one answer and a thumbs up (True) or down (False)."""

    prompt: list[Message]
    completion: Message
    desirable: bool
    source: str = ""


# Any one training record, as the readers return it.
Item = Conversation | PreferencePair | KTOExample
