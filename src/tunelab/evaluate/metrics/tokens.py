"""Token-level metrics computed from model outputs: token accuracy and perplexity."""

from __future__ import annotations

import math

import torch

# exp(709.78) is the largest finite double; beyond it perplexity is reported as inf.
_MAX_EXP_ARG = math.log(torch.finfo(torch.float64).max)


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy in nats); inf instead of an OverflowError, NaN stays NaN."""
    if math.isnan(loss):
        return math.nan
    return math.exp(loss) if loss < _MAX_EXP_ARG else math.inf


def token_accuracy(predicted_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> float:
    """Share of labelled positions where the predicted id equals the label (already aligned).

    Positions whose label is `ignore_index` (prompt, padding) do not count. NaN when no
    position is labelled, so an empty batch can't pass for a perfect or a useless one.
    """
    if predicted_ids.shape != labels.shape:
        raise ValueError(f"predicted ids {tuple(predicted_ids.shape)} and labels {tuple(labels.shape)} differ")
    mask = labels != ignore_index
    count = int(mask.sum())
    if count == 0:
        return math.nan
    return float((predicted_ids[mask] == labels[mask]).sum()) / count


def token_accuracy_from_logits(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                               *, shift: bool = True) -> float:
    """Token accuracy of a causal LM's greedy next-token guesses.

    `logits` is (batch, seq, vocab) and `labels` (batch, seq) as fed to the model: the
    logits at position t predict token t+1, so by default both are shifted by one, the
    same alignment the training loss uses. Pass `shift=False` for pre-aligned tensors.
    """
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    return token_accuracy(logits.argmax(dim=-1), labels, ignore_index)
