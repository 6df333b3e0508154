"""Helpers the data tools share: record text, grouping keys, output files, plain tables."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tunelab.data.formats import RecordError
from tunelab.data.readers import iter_items, location, read_records
from tunelab.data.types import Conversation, Item, KTOExample, Message, PreferencePair
from tunelab.errors import TunelabError
from tunelab.io import atomic_path

OUTPUT_EXTENSIONS = (".jsonl", ".json")


def item_messages(item: Item) -> list[Message]:
    """Every turn of an item in reading order (a pair's prompt, then chosen, then rejected)."""
    if isinstance(item, Conversation):
        return item.messages
    if isinstance(item, PreferencePair):
        return [*item.prompt, item.chosen, item.rejected]
    return [*item.prompt, item.completion]


def item_text(item: Item) -> str:
    return "\n".join(f"{m.role}: {m.content}" for m in item_messages(item))


def exchange_text(item: Item) -> str:
    """The last exchange only: the last user turn before the first target turn, and the targets.

    Rows of one hotel dialogue repeat its whole prefix, so whole-record similarity calls
    them near-duplicates; comparing the exchange each row teaches does not. Tool results
    (the hotel `return` records) are left out: the same records follow many requests.
    """
    messages = item_messages(item)
    first = next((i for i, m in enumerate(messages) if m.is_target()), len(messages))
    asks = [m for m in messages[:first] if m.role in ("user", "text")]
    kept = asks[-1:] + [m for m in messages[first:] if m.is_target()]
    return "\n".join(f"{m.role}: {m.content}" for m in kept)


def first_user_turn(item: Item) -> str:
    """What a dialogue starts with: rows of one dialogue (the hotel set) share it."""
    messages = item_messages(item)
    return next((m.content for m in messages if m.role in ("user", "text")), messages[0].content if messages else "")


def label_of(item: Item, field: str | None) -> str | None:
    """A label for stratification / distributions: a `meta` key (hotel: response_role) or a kept extra field."""
    if field is None:
        return None
    meta = getattr(item, "meta", {}) or {}
    value = meta.get(field, meta.get("extra", {}).get(field))
    if value is None and field == "kto_tag" and isinstance(item, KTOExample):
        value = item.desirable
    return None if value is None else str(value)


def valid_items(path: str | os.PathLike, fmt: str = "auto", *, skip_invalid: bool = False,
                skipped: set[int] | None = None) -> Iterator[tuple[int, str, Item]]:
    """(record number, format, item) of each valid record; the first bad one raises unless
    skip_invalid, which drops it and adds its number to `skipped`."""
    for source, number, file_format, item in iter_items(path, fmt):
        if isinstance(item, RecordError):
            if skip_invalid:
                if skipped is not None:
                    skipped.add(number)
                continue
            raise TunelabError(item.what, where=location(source, number),
                               fix=f"{item.fix}; see every problem with `tunelab data check {path}`, "
                                   "or pass --skip-invalid to drop bad records")
        yield number, file_format, item


def raw_records(path: str | os.PathLike) -> Iterator[tuple[str, int, dict]]:
    """A second pass: the original records with their location, written out unchanged by
    dedup and split (so fields the normalised types do not hold survive)."""
    for source, number, record in read_records(path):
        if not isinstance(record, RecordError):
            yield source, number, record


def check_output_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_EXTENSIONS:
        raise TunelabError(f"cannot write {path.suffix or 'a file without extension'!r}", where=str(path),
                           fix="name the output .jsonl (one record per line) or .json (an array)")
    return path


def write_records(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records as JSONL or a JSON array (by extension), atomically; returns the count."""
    path = check_output_path(path)
    as_array = path.suffix.lower() == ".json"
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("[\n" if as_array else "")
        for record in records:
            line = json.dumps(record, ensure_ascii=False)
            f.write((",\n" if as_array and count else "") + line + ("" if as_array else "\n"))
            count += 1
        f.write("\n]\n" if as_array else "")
    return count


def table(headers: list[str], rows: list[list]) -> str:
    """A plain aligned text table (numbers right-aligned), readable in any terminal or log."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(_width(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row, values):
        return "  ".join(_pad(c, w, right=_is_number(v)) for c, w, v in zip(row, widths, values))

    lines = [fmt(cells[0], headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(c, r) for c, r in zip(cells[1:], rows)]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) or (isinstance(value, str) and value.endswith("%"))


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _width(text: str) -> int:
    # CJK characters take two columns in a terminal.
    return sum(2 if ord(ch) > 0x2E80 else 1 for ch in text)


def _pad(text: str, width: int, right: bool) -> str:
    space = " " * (width - _width(text))
    return space + text if right else text + space


def snippet(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
