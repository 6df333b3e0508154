"""BLEU, two ways: the hotel recipe's character-level sentence BLEU-4, and corpus BLEU.

They answer different questions and their numbers are not comparable:
`sentence_bleu4_chars` averages a smoothed per-sample score (what the FineTuningLab hotel
recipe reports, so our numbers line up with its tables); `corpus_bleu` pools n-gram counts
over the whole set (what machine-translation papers report, through sacrebleu).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from tunelab.evaluate.metrics.text import has_cjk


def _smoothing():
    from nltk.translate.bleu_score import SmoothingFunction

    return SmoothingFunction().method3


def sentence_bleu4_char(prediction: str, reference: str, *, strip: bool = True) -> float:
    """One sample's character-level BLEU-4 in [0, 1], exactly as the hotel recipe computes it.

    nltk `sentence_bleu([list(ref)], list(pred))`, cumulative 1-4-gram with equal weights and
    `SmoothingFunction().method3`; 0 when either side is empty. The recipe strips both
    sides first (`strip=True`), so a trailing newline from generation costs nothing.
    """
    from nltk.translate.bleu_score import sentence_bleu

    if strip:
        prediction, reference = prediction.strip(), reference.strip()
    if not prediction or not reference:
        return 0.0
    with warnings.catch_warnings():
        # nltk warns when a short sample has no 4-grams; smoothing already handles that.
        warnings.simplefilter("ignore")
        return float(sentence_bleu([list(reference)], list(prediction), smoothing_function=_smoothing()))


def sentence_bleu4_chars(predictions: Sequence[str], references: Sequence[str], *, strip: bool = True) -> float:
    """The hotel recipe's BLEU-4: `sentence_bleu4_char` averaged over samples, x100.

    Empty predictions score 0 and stay in the average (dropping them would reward a model
    that answers nothing when unsure).
    """
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    total = sum(sentence_bleu4_char(p, r, strip=strip) for p, r in zip(predictions, references))
    return 100.0 * total / len(predictions)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str], *, tokenize: str = "auto") -> float:
    """Corpus BLEU (0-100) through sacrebleu, one reference per prediction.

    `tokenize="auto"` picks sacrebleu's "zh" tokenizer when any reference holds CJK text
    (it splits Chinese into characters) and its standard "13a" otherwise.
    """
    import sacrebleu

    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    if tokenize == "auto":
        tokenize = "zh" if any(has_cjk(r) for r in references) else "13a"
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize).score)


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
