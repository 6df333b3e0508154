"""Evaluation metrics: small pure functions over predictions and references.

Every corpus-level score is reported x100 (as the recipes we compare with report them).
The task code (`evaluate/tasks/`) picks which to report; perplexity lives with the run log
(`tunelab.train.runlog.perplexity`), which training logs it with.
"""

from __future__ import annotations

from tunelab.evaluate.metrics.bleu import (
    bleu_unit,
    corpus_bleu,
    sentence_bleu4,
    sentence_bleu4_char,
    sentence_bleu4_chars,
)
from tunelab.evaluate.metrics.rouge import rouge_f1, rouge_scores
from tunelab.evaluate.metrics.slots import (
    SlotCounts,
    parse_arguments,
    prf,
    slot_counts,
    slot_counts_by_key,
    slot_scores,
)
from tunelab.evaluate.metrics.text import exact_match, has_cjk, normalize_text

__all__ = [
    "SlotCounts", "bleu_unit", "corpus_bleu", "exact_match", "has_cjk", "normalize_text", "parse_arguments", "prf",
    "rouge_f1", "rouge_scores", "sentence_bleu4", "sentence_bleu4_char", "sentence_bleu4_chars", "slot_counts",
    "slot_counts_by_key", "slot_scores",
]
