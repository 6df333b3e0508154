"""Text helpers shared by the metrics: CJK detection, normalisation, exact match."""

from __future__ import annotations

import re
from collections.abc import Sequence

# CJK ideographs (basic, extension A, compatibility) and Japanese kana: scripts written
# without spaces, where a "word" tokenizer built for English sees nothing at all.
CJK_CHAR = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RE = re.compile(f"[{CJK_CHAR}]")
_SPACES_RE = re.compile(r"\s+")


def has_cjk(text: str) -> bool:
    return bool(_CJK_RE.search(text))


def normalize_text(text: str, *, ignore_case: bool = False, ignore_space: bool = False) -> str:
    """Strip; optionally lower-case and collapse runs of whitespace to one space."""
    text = text.strip()
    if ignore_space:
        text = _SPACES_RE.sub(" ", text)
    if ignore_case:
        text = text.casefold()
    return text


def exact_match(predictions: Sequence[str], references: Sequence[str], *,
                ignore_case: bool = False, ignore_space: bool = False) -> float:
    """Share of predictions equal to their reference (after `normalize_text`), x100.

    Leading/trailing whitespace never counts; `ignore_space` also treats any run of inner
    whitespace as one space, `ignore_case` compares case-insensitively.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return 0.0
    hits = sum(
        normalize_text(p, ignore_case=ignore_case, ignore_space=ignore_space)
        == normalize_text(r, ignore_case=ignore_case, ignore_space=ignore_space)
        for p, r in zip(predictions, references)
    )
    return 100.0 * hits / len(predictions)
