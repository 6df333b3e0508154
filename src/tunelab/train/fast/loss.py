"""The SFT loss through the speed levers: padding-free varlen attention and/or the chunked head.

Returns (summed loss, target-token count) exactly as `train.losses.causal_lm_loss_sum`
does, so the loop's accumulation and averaging stay untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.data.collate import IGNORE_INDEX
from tunelab.train.fast.chunked_ce import DEFAULT_CHUNK_TOKENS, chunked_linear_cross_entropy_sum, chunked_token_logps
from tunelab.train.fast.varlen import base_model, flatten_batch, sample_lengths


def plain_head_weight(model) -> torch.Tensor | None:
    """The LM head's weight when the head is a bias-free linear with nothing after it, else None.

    A LoRA-wrapped head, a bias or logit soft-capping (Gemma-2) need the plain path.
    """
    base = base_model(model)
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if getattr(base.config, "final_logit_softcapping", None):
        return None
    return head.weight


def _hidden_and_targets(model, batch: dict, padding_free: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Final hidden states [N, H], the token each one predicts [N] and the batch row it belongs to [N]."""
    decoder = base_model(model).get_decoder()
    if padding_free:
        stream = flatten_batch(batch)
        out = decoder(input_ids=stream.input_ids, position_ids=stream.position_ids, use_cache=False,
                      **stream.attention_kwargs())
        lens = torch.diff(stream.cu_seqlens)
        rows = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)
        return out.last_hidden_state[0], stream.targets, rows
    from tunelab.train.losses import model_inputs

    hidden = decoder(**model_inputs(batch), use_cache=False).last_hidden_state[:, :-1]
    n_rows, width = hidden.shape[:2]
    rows = torch.arange(n_rows, device=hidden.device).repeat_interleave(width)
    return hidden.reshape(-1, hidden.shape[-1]), batch["labels"][:, 1:].reshape(-1), rows


def fast_causal_lm_loss_sum(model, batch: dict, padding_free: bool = True, fused_loss: bool = True,
                            chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, int]:
    """Sum of target-token losses and their count; the model needs varlen attention if padding_free."""
    hidden, targets, _ = _hidden_and_targets(model, batch, padding_free)
    # Only positions with a target need the head: prompts and padding skip the vocab matmul.
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
    weight = plain_head_weight(model) if fused_loss else None
    if weight is not None:
        total = chunked_linear_cross_entropy_sum(hidden, weight, targets, chunk_tokens)
    else:
        logits = base_model(model).get_output_embeddings()(hidden).float()
        total = F.cross_entropy(logits, targets, reduction="sum")
    return total, int(rows.numel())


def fast_sequence_logps(model, batch: dict, padding_free: bool = True, fused_loss: bool = True,
                        chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the batch: the sum of its labelled tokens' log-probs (fp32) and how many there are,
    as `train.preference.sequence_logps` gives them, through the padding-free and chunked-head levers."""
    n_rows = batch["input_ids"].shape[0]
    if padding_free and len(sample_lengths(batch)) != n_rows:
        raise ValueError("every row of a preference batch must hold tokens")
    hidden, targets, rows = _hidden_and_targets(model, batch, padding_free)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    hidden, targets, rows = hidden.index_select(0, keep), targets.index_select(0, keep), rows.index_select(0, keep)
    weight = plain_head_weight(model) if fused_loss else None
    if weight is not None:
        logps = chunked_token_logps(hidden, weight, targets, chunk_tokens)
    else:
        logits = base_model(model).get_output_embeddings()(hidden)
        logps = -F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                                 reduction="none")
    sums = torch.zeros(n_rows, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
    counts = torch.zeros(n_rows, dtype=torch.long, device=logps.device).index_add(0, rows, torch.ones_like(rows))
    return sums, counts
