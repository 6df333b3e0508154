"""Every supported record format, one class each, in one registry table (`REGISTRY`).

A format (`base.Format`) declares its keys, recognises a record by them (`detect`), reads
a record into `Conversation` / `PreferencePair` / `KTOExample` (`read`) and writes one back
(`write`, for `tunelab data convert`). Detection asks the formats in table order, so a
more specific format comes before a looser one (ShareGPT preference before ShareGPT,
KTO before Alpaca). Adding a format is one class and one line here.
"""

from __future__ import annotations

from tunelab.data.formats.base import (
    ANSWER_ROLES,
    CALL_ROLES,
    OPENAI_ROLES,
    PREFERENCE_ROLES,
    RESULT_ROLES,
    Format,
    Item,
    RecordError,
)
from tunelab.data.formats.chat import Alpaca, InputOutputTurns, Text
from tunelab.data.formats.hotel import HOTEL_ROLES, Hotel, render_hotel_turn
from tunelab.data.formats.openai import Messages
from tunelab.data.formats.preference import KTO, Preference, QAPreference
from tunelab.data.formats.sharegpt import (
    SHAREGPT_NAMES,
    SHAREGPT_ROLES,
    ShareGPT,
    ShareGPTPreference,
)
from tunelab.data.formats.trl import PromptCompletion, UnpairedPreference
from tunelab.data.formats.validate import validate_conversation, validate_preference
from tunelab.data.types import Conversation
from tunelab.errors import TunelabError, nearest

# In detection order: the first format whose `detect` accepts a record's keys wins.
REGISTRY: dict[str, Format] = {f.name: f for f in (
    Hotel(), ShareGPTPreference(), ShareGPT(), Messages(), InputOutputTurns(), Preference(), QAPreference(),
    KTO(), UnpairedPreference(), PromptCompletion(), Alpaca(), Text(),
)}
CONVERSATION_FORMATS = tuple(name for name, f in REGISTRY.items() if f.kind == "conversation")
PREFERENCE_FORMATS = tuple(name for name, f in REGISTRY.items() if f.kind == "preference")
FORMATS = CONVERSATION_FORMATS + PREFERENCE_FORMATS
# format -> (required keys, optional keys)
FIELDS = {name: (f.required, f.optional) for name, f in REGISTRY.items()}

__all__ = [
    "ANSWER_ROLES", "CALL_ROLES", "CONVERSATION_FORMATS", "FIELDS", "FORMATS", "HOTEL_ROLES", "OPENAI_ROLES",
    "PREFERENCE_FORMATS", "PREFERENCE_ROLES", "REGISTRY", "RESULT_ROLES", "SHAREGPT_NAMES", "SHAREGPT_ROLES",
    "Format", "Item", "RecordError", "check_format_name", "detect_format", "get_format", "render_hotel_turn",
    "to_conversation", "to_preference", "to_record", "validate_conversation", "validate_preference",
]


def detect_format(record: dict) -> str:
    """The format of one record, from its keys (see `REGISTRY`)."""
    keys = record.keys()
    for name, fmt in REGISTRY.items():
        if fmt.detect(keys):
            return name
    raise RecordError(f"cannot tell the format from the keys {sorted(keys)}",
                      fix=f"use the keys of one of {', '.join(FORMATS)} (see docs/data.md), "
                          "or name the format with --format / dataset_format")


def check_format_name(fmt: str, allowed: tuple[str, ...] = FORMATS + ("auto",)) -> str:
    if fmt in allowed:
        return fmt
    hint = nearest(fmt, allowed)
    raise TunelabError(f"unknown data format {fmt!r}", where="format",
                       fix=f"use {hint!r}" if hint else f"use one of {', '.join(allowed)}")


def get_format(fmt: str | Format) -> Format:
    """The registered format of that name (a `Format` instance passes through)."""
    return fmt if isinstance(fmt, Format) else REGISTRY[check_format_name(fmt, FORMATS)]


def to_conversation(record: dict, fmt: str | Format, source: str = "") -> Conversation:
    """Normalise one record of a conversation format (not validated: see `validate_conversation`)."""
    fmt = get_format(fmt)
    if fmt.kind != "conversation":
        raise RecordError(f"{fmt.name} records are preference data, not conversations",
                          fix="train them with stage=dpo/simpo/orpo (or kto), or pick a conversation format")
    fmt.require(record)
    return fmt.read(record, source)


def to_preference(record: dict, fmt: str | Format, source: str = ""):
    """Normalise one record of a preference format (not validated: see `validate_preference`)."""
    fmt = get_format(fmt)
    if fmt.kind != "preference":
        raise RecordError(f"{fmt.name} records are conversations, not preference data",
                          fix="train them with stage=sft, or pick a preference format")
    fmt.require(record)
    return fmt.read(record, source)


def _refuse_kind(item: Item, fmt: Format) -> RecordError | None:
    from tunelab.data.types import KTOExample

    if isinstance(item, Conversation):
        if fmt.kind != "conversation":
            return fmt.refuse("a conversation (it has no rejected answer)", "pick a conversation format")
        return None
    if fmt.kind != "preference":
        return fmt.refuse("preference data (the rejected answer would be lost)", "pick a preference format")
    unpaired = fmt.name in ("kto", "unpaired_preference")
    if isinstance(item, KTOExample) != unpaired:
        what = "a preference pair (KTO rows hold one answer, so the pairing would be lost)" if unpaired else \
            "a KTO example (one answer with a thumbs up/down)"
        return fmt.refuse(what, "keep pairs in preference / qa_preference / sharegpt_preference and KTO rows "
                                "in kto / unpaired_preference")
    return None


def to_record(item: Item, fmt: str) -> dict:
    """Write a normalised item back as a record of `fmt`; RecordError names what would be lost."""
    check_format_name(fmt, FORMATS)
    fmt = REGISTRY[fmt]
    problem = _refuse_kind(item, fmt)
    if problem:
        raise problem
    record = fmt.write(item)
    if isinstance(item, Conversation):
        return {**item.meta.get("extra", {}), **record}
    return record
