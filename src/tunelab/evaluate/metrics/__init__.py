"""Evaluation metrics: small pure functions over predictions and references.

Every corpus-level score is reported x100 (as the recipes we compare with report them).
`text_scores` is the one-call summary for generated text; the task code picks the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

from tunelab.evaluate.metrics.bleu import corpus_bleu, sentence_bleu4_char, sentence_bleu4_chars
from tunelab.evaluate.metrics.rouge import rouge_f1, rouge_scores
from tunelab.evaluate.metrics.slots import (
    SlotCounts, parse_arguments, prf, slot_counts, slot_counts_by_key, slot_scores,
)
from tunelab.evaluate.metrics.text import exact_match, has_cjk, normalize_text
from tunelab.evaluate.metrics.tokens import perplexity, token_accuracy, token_accuracy_from_logits

__all__ = [
    "SlotCounts", "corpus_bleu", "count_empty", "exact_match", "has_cjk", "normalize_text",
    "parse_arguments", "perplexity", "prf", "rouge_f1", "rouge_scores", "sentence_bleu4_char",
    "sentence_bleu4_chars", "slot_counts", "slot_counts_by_key", "slot_scores", "text_scores", "token_accuracy",
    "token_accuracy_from_logits",
]


def count_empty(predictions: Sequence[str | None]) -> int:
    """Predictions that are None or only whitespace (a generation that said nothing)."""
    return sum(1 for p in predictions if p is None or not p.strip())


def text_scores(predictions: Sequence[str | None], references: Sequence[str], *,
                rouge_tokenizer: str = "auto", with_corpus_bleu: bool = True) -> dict[str, float | int]:
    """Named scores for generated text against references, plus how many were empty.

    Empty predictions (None or blank) are scored 0 and counted in `empty_predictions`,
    never dropped: a model that stays silent must not look better for it.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    preds = ["" if p is None else p for p in predictions]
    scores: dict[str, float | int] = {"bleu4": sentence_bleu4_chars(preds, references)}
    if with_corpus_bleu:
        scores["corpus_bleu"] = corpus_bleu(preds, references)
    scores.update(rouge_scores(preds, references, tokenizer=rouge_tokenizer))
    scores["exact_match"] = exact_match(preds, references)
    scores["samples"] = len(preds)
    scores["empty_predictions"] = count_empty(predictions)
    return scores
