"""Constrained decoding for structured turns: after a marker (the hotel `search\\n`), the
completion must be one JSON object, optionally with keys from a schema, then end.

A logits processor of our own (no extra dependency): at each step, for each row past its
marker, the highest-scoring candidate tokens are tried against an incremental JSON prefix
check and every other token is masked; the end-of-turn tokens are allowed only once the
object is complete. Rows before their marker, or that chose another role, are untouched.
When none of the `top_k` candidates fits, the row is left free (a constraint must never
stall generation).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

WHITESPACE = " \t\n\r"
LITERALS = ("true", "false", "null")
NUMBER_CHARS = set("0123456789+-.eE")
# What can begin a JSON number: an integer part (no leading zeros), then a fraction and an exponent.
NUMBER_PREFIX = re.compile(r"-?(?:(?:0|[1-9]\d*)(?:\.\d*)?(?:[eE][+-]?\d*)?)?")


@dataclass
class JsonState:
    """Where a JSON-object prefix stands. `expect` is what may come next:
    value | key_or_end | key | colon | comma_or_end | value_or_end | string | number | literal | done."""

    stack: list = field(default_factory=list)  # "{" / "[" of the open containers
    expect: str = "start"
    in_key: bool = False  # the open string is an object key
    text: str = ""  # the open string / number / literal so far
    escape: bool = False

    def copy(self) -> JsonState:
        return JsonState(list(self.stack), self.expect, self.in_key, self.text, self.escape)


def feed(state: JsonState, chars: str, keys: frozenset[str] | None = None) -> bool:
    """Advance `state` by `chars`; False as soon as they cannot continue a JSON object
    (with keys from `keys`, when given)."""
    for ch in chars:
        if not _step(state, ch, keys):
            return False
    return True


def _step(s: JsonState, ch: str, keys) -> bool:
    if s.expect == "string":
        return _string_char(s, ch, keys)
    if s.expect == "number":
        if ch in NUMBER_CHARS:
            s.text += ch
            return NUMBER_PREFIX.fullmatch(s.text) is not None
        if not _number_ok(s.text):
            return False
        _after_value(s)
    elif s.expect == "literal":
        s.text += ch
        if any(lit == s.text for lit in LITERALS):
            _after_value(s)
            return True
        return any(lit.startswith(s.text) for lit in LITERALS)
    if ch in WHITESPACE:
        return True
    if s.expect == "start":
        if ch != "{":
            return False
        s.stack.append("{")
        s.expect = "key_or_end"
        return True
    if s.expect == "done":
        return False
    if s.expect in ("key_or_end", "key"):
        if ch == "}" and s.expect == "key_or_end":
            return _close(s, "{")
        if ch != '"':
            return False
        s.expect, s.in_key, s.text = "string", True, ""
        return True
    if s.expect == "colon":
        if ch != ":":
            return False
        s.expect = "value"
        return True
    if s.expect == "comma_or_end":
        if ch == ",":
            s.expect = "key" if s.stack[-1] == "{" else "value"
            return True
        return ch in "}]" and _close(s, "{" if ch == "}" else "[")
    if s.expect in ("value", "value_or_end"):
        if ch == "]" and s.expect == "value_or_end":
            return _close(s, "[")
        return _start_value(s, ch)
    return False


def _string_char(s: JsonState, ch: str, keys) -> bool:
    if s.escape:
        s.escape = False
        s.text += ch
        return ch in '"\\/bfnrtu'
    if ch == "\\":
        s.escape = True
        return True
    if ch == '"':
        if s.in_key:
            if keys is not None and s.text not in keys:
                return False
            s.expect, s.in_key = "colon", False
        else:
            _after_value(s)
        return True
    if ord(ch) < 0x20:
        return False
    s.text += ch
    return keys is None or not s.in_key or any(k.startswith(s.text) for k in keys)


def _start_value(s: JsonState, ch: str) -> bool:
    if ch == "{":
        s.stack.append("{")
        s.expect = "key_or_end"
    elif ch == "[":
        s.stack.append("[")
        s.expect = "value_or_end"
    elif ch == '"':
        s.expect, s.in_key, s.text = "string", False, ""
    elif ch in "-0123456789":
        s.expect, s.text = "number", ch
    elif ch in "tfn":
        s.expect, s.text = "literal", ch
    else:
        return False
    return True


def _number_ok(text: str) -> bool:
    """A whole JSON number: a valid prefix that ends on a digit."""
    return NUMBER_PREFIX.fullmatch(text) is not None and text[-1:].isdigit()


def _close(s: JsonState, opener: str) -> bool:
    if not s.stack or s.stack[-1] != opener:
        return False
    s.stack.pop()
    _after_value(s)
    return True


def _after_value(s: JsonState) -> None:
    s.text = ""
    s.expect = "comma_or_end" if s.stack else "done"


def is_complete(state: JsonState) -> bool:
    """The object is closed (a number at the very end cannot be: an object ends with `}`)."""
    return state.expect == "done"


class JsonAfterMarker:
    """Logits processor: once a row's completion starts with `marker`, the rest must be a
    JSON object (keys from `keys` if given) and the row may stop only when it is complete.

    `prompt_width` is the (left-padded) prompt length: the completion is what follows it.
    """

    def __init__(self, tokenizer, marker: str, stop_ids: Iterable[int], prompt_width: int,
                 keys: Sequence[str] | None = None, top_k: int = 20):
        self.tokenizer = tokenizer
        self.marker = marker
        self.stop_ids = set(stop_ids)
        self.width = prompt_width
        self.keys = frozenset(keys) if keys else None
        self.top_k = top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row in range(input_ids.shape[0]):
            completion = input_ids[row, self.width:].tolist()
            text = self.tokenizer.decode(completion, skip_special_tokens=False)
            if not text.startswith(self.marker):
                continue
            state = JsonState()
            if not feed(state, _complete_chars(text[len(self.marker):]), self.keys):
                continue  # already off the rails (e.g. before the constraint applied): leave it
            allowed = self._allowed(completion, text, state, scores[row])
            if allowed:
                keep = scores[row, allowed].clone()
                scores[row] = float("-inf")
                scores[row, allowed] = keep
        return scores

    def _allowed(self, completion: list[int], text: str, state: JsonState, row_scores: torch.Tensor) -> list[int]:
        allowed = []
        for token in row_scores.topk(min(self.top_k, row_scores.numel())).indices.tolist():
            if token in self.stop_ids:
                ok = is_complete(state)
            else:
                piece = self.tokenizer.decode(completion + [token], skip_special_tokens=False)[len(text):]
                ok = bool(piece) and feed(state.copy(), _complete_chars(piece), self.keys)
            if ok:
                allowed.append(token)
        return allowed


def _complete_chars(text: str) -> str:
    """Text as the JSON check reads it: a character still being spelled in bytes (a CJK
    character split across tokens decodes as U+FFFD) counts as one string character."""
    return text.replace("\ufffd", "\u00b7")
