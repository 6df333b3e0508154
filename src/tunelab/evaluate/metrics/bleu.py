"""BLEU, two ways: the hotel recipe's sentence BLEU-4 (by characters, or by words for text
written with spaces), and corpus BLEU.

They answer different questions and their numbers are not comparable:
`sentence_bleu4_chars` averages a smoothed per-sample score (what the FineTuningLab hotel
recipe reports, so our numbers line up with its tables); `corpus_bleu` pools n-gram counts
over the whole set (what machine-translation papers report, through sacrebleu).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from tunelab.evaluate.metrics.text import has_cjk


def _ngrams(tokens: str | tuple[str, ...], n: int) -> Counter:
    return Counter(tokens[i:i + n] for i in range(len(tokens) - n + 1))


def bleu_unit(reference: str) -> str:
    """What sentence BLEU counts for this reference: characters for CJK text (written without
    spaces, a character is the closest thing to a word), words for everything else (a
    character 4-gram of English matches inside unrelated words and flatters a wrong answer)."""
    return "char" if has_cjk(reference) else "word"


def sentence_bleu4(prediction: str, reference: str, *, unit: str = "char", strip: bool = True) -> float:
    """One sample's smoothed BLEU-4 in [0, 1] over characters (`unit="char"`, the hotel
    recipe's) or whitespace-separated words (`unit="word"`, nltk's usual call on `.split()`)."""
    if strip:
        prediction, reference = prediction.strip(), reference.strip()
    if unit == "word":
        return _bleu4(tuple(prediction.split()), tuple(reference.split()))
    return _bleu4(prediction, reference)


def sentence_bleu4_char(prediction: str, reference: str, *, strip: bool = True) -> float:
    """One sample's character-level BLEU-4 in [0, 1], exactly as the hotel recipe computes it.

    The recipe calls nltk `sentence_bleu([list(ref)], list(pred),
    smoothing_function=SmoothingFunction().method3)` (cumulative 1-4-gram, equal weights);
    this is the same arithmetic in plain floats, which spares every `tunelab eval` the
    multi-second `import nltk` (tests check equality with nltk to 1e-9). 0 when either
    side is empty; the recipe strips both sides first (`strip=True`), so a trailing
    newline from generation costs nothing.
    """
    return sentence_bleu4(prediction, reference, unit="char", strip=strip)


def _bleu4(prediction: str | tuple[str, ...], reference: str | tuple[str, ...]) -> float:
    """nltk's sentence_bleu with SmoothingFunction().method3 on two token sequences."""
    if not prediction or not reference:
        return 0.0
    log_sum, zero_matches = 0.0, 0
    for n in range(1, 5):
        hyp = _ngrams(prediction, n)
        ref = _ngrams(reference, n)
        matches = sum(min(count, ref[gram]) for gram, count in hyp.items())
        total = max(1, sum(hyp.values()))
        if matches == 0:
            if n == 1:
                return 0.0  # nltk: no unigram in common, no score
            # method3 (NIST geometric smoothing): the k-th empty order counts as 1 / (2^k * total)
            zero_matches += 1
            log_sum += math.log(1.0 / (2 ** zero_matches * total))
        else:
            log_sum += math.log(matches / total)
    hyp_len, ref_len = len(prediction), len(reference)
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_sum / 4)


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
