"""ROUGE-1/2/L F1, matching the `rouge-score` package on English and usable on Chinese.

`rouge-score`'s tokenizer keeps only [a-z0-9] runs, so Chinese text becomes *no tokens*
and every Chinese sample would score 0. We therefore choose the tokenizer per sample:

- `"auto"` (default): when either side holds CJK characters, each CJK character is one
  token and Latin/digit runs (lower-cased) are one token each, punctuation dropped as
  rouge-score drops it; otherwise rouge-score's own tokenizer (identical numbers).
- `"jieba"`: CJK text is segmented into words by jieba (accurate mode); Latin as above.
- `"default"`: always rouge-score's tokenizer (English only).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence

from tunelab.evaluate.metrics.text import CJK_CHAR, has_cjk

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
TOKENIZERS = ("auto", "jieba", "default")
_CHAR_TOKEN_RE = re.compile(f"[{CJK_CHAR}]|[a-z0-9]+")
_LATIN_RE = re.compile(r"[a-z0-9]+")
_CJK_RUN_RE = re.compile(f"[{CJK_CHAR}]+")


class CharTokenizer:
    """One token per CJK character, one per lower-cased Latin/digit run."""

    def tokenize(self, text: str) -> list[str]:
        return _CHAR_TOKEN_RE.findall(text.lower())


class JiebaTokenizer:
    """jieba words for CJK runs, lower-cased Latin/digit runs for the rest."""

    def tokenize(self, text: str) -> list[str]:
        from tunelab.errors import require_extra

        require_extra(("jieba",), "zh", "ROUGE over Chinese words (jieba)")
        import jieba

        jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict" chatter in the eval output
        tokens: list[str] = []
        last = 0
        text = text.lower()
        for run in _CJK_RUN_RE.finditer(text):
            tokens += _LATIN_RE.findall(text[last:run.start()])
            tokens += [w for w in jieba.cut(run.group(), HMM=True) if w.strip()]
            last = run.end()
        tokens += _LATIN_RE.findall(text[last:])
        return tokens


@functools.lru_cache(maxsize=None)
def _scorer(tokenizer: str, use_stemmer: bool):
    from rouge_score import rouge_scorer

    custom = {"char": CharTokenizer(), "jieba": JiebaTokenizer()}.get(tokenizer)
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer, tokenizer=custom)


def rouge_f1(prediction: str, reference: str, *, tokenizer: str = "auto",
             use_stemmer: bool = False) -> dict[str, float]:
    """ROUGE-1/2/L F1 of one sample, each in [0, 1] (see the module doc for `tokenizer`).

    `use_stemmer` (Porter, English) applies only with rouge-score's own tokenizer.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer={tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
    cjk = has_cjk(prediction) or has_cjk(reference)
    kind = "default" if tokenizer == "default" or not cjk else "char" if tokenizer == "auto" else "jieba"
    scores = _scorer(kind, use_stemmer and kind == "default").score(reference, prediction)
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def rouge_scores(predictions: Sequence[str], references: Sequence[str], *, tokenizer: str = "auto",
                 use_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over samples, x100; an empty prediction scores 0 and is kept."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for p, r in zip(predictions, references):
        for name, value in rouge_f1(p, r, tokenizer=tokenizer, use_stemmer=use_stemmer).items():
            totals[name] += value
    n = max(len(predictions), 1)
    return {name: 100.0 * total / n for name, total in totals.items()}
