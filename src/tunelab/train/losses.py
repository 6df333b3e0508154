"""Causal-LM loss as (sum, count), so accumulation averages over the same tokens.

Averaging each micro-batch on its own and then averaging the averages weights a
short batch like a long one; summing token losses and dividing once by the number
of target tokens in the whole optimizer step is the loss a single big batch gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.data.collate import IGNORE_INDEX, packed_attention_mask


def model_inputs(batch: dict) -> dict:
    """The tensors the model's forward takes (packed rows get a block-diagonal mask)."""
    inputs = {"input_ids": batch["input_ids"]}
    if "seq_lens" in batch:
        inputs["position_ids"] = batch["position_ids"]
        width = batch["input_ids"].shape[1]
        inputs["attention_mask"] = packed_attention_mask(batch["seq_lens"], width).to(batch["input_ids"].device)
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


def shifted_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (fp32) of predicting labels[t+1] from position t, and its mask."""
    logits = logits[:, :-1, :]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax in >= fp32
    targets = labels[:, 1:]
    losses = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    return losses, targets != IGNORE_INDEX


def causal_lm_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of target-token losses over the batch, and how many target tokens there were."""
    logits = model(**model_inputs(batch), use_cache=False).logits
    losses, mask = shifted_token_losses(logits, batch["labels"])
    return losses.sum(), int(mask.sum())
