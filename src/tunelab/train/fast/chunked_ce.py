"""Linear + cross-entropy in chunks of tokens: the full [tokens, vocab] logits never exist.

For a 152k vocabulary the plain path holds bf16 logits, their fp32 copy, the fp32
softmax and its gradient: about 14 bytes x 152k = 2 MB for every token, more than
the whole activation memory of a checkpointed 7B model. Here each chunk of tokens
computes its logits, its loss and its gradient with respect to the hidden states
(and to the head's weight when that is trained) in the forward pass, keeps only the
gradient ([tokens, hidden], tiny beside the logits) and drops the logits. The
backward pass then only scales the stored gradients by the incoming one.

Same math as `F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`: the
logits are computed in the weight's dtype and the softmax in fp32, as the plain
path under autocast does.
"""

from __future__ import annotations

import torch

from tunelab.data.types import IGNORE_INDEX

DEFAULT_CHUNK_TOKENS = 4096


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t()
    return logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax in >= fp32


def _token_losses(logits: torch.Tensor, targets: torch.Tensor):
    """Per-token cross-entropy (0 where ignored), the log-sum-exp and the clamped targets."""
    valid = targets != IGNORE_INDEX
    safe_targets = torch.where(valid, targets, 0)
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, safe_targets[:, None]).squeeze(1)
    return (lse - target_logit) * valid, lse, safe_targets, valid


def _grads_from_logits(logits, lse, safe_targets, scale, hidden, weight, want_weight_grad: bool):
    """Gradients of sum(scale * token_loss) w.r.t. hidden (and weight), consuming `logits` in place."""
    # d(loss)/d(logits) = (softmax - one_hot(target)) * scale, zero for ignored tokens.
    grad_logits = logits.sub_(lse[:, None]).exp_()
    grad_logits.scatter_add_(1, safe_targets[:, None], torch.full_like(lse[:, None], -1.0))
    grad_logits.mul_(scale[:, None])
    grad_logits = grad_logits.to(weight.dtype)
    grad_hidden = grad_logits @ weight
    grad_weight = grad_logits.t() @ hidden if want_weight_grad else None
    return grad_hidden, grad_weight


def _chunk_loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          want_weight_grad: bool):
    """Summed loss of one chunk, d(loss)/d(hidden) and (optionally) d(loss)/d(weight)."""
    logits = _chunk_logits(hidden, weight)
    losses, lse, safe_targets, valid = _token_losses(logits, targets)
    grad_hidden, grad_weight = _grads_from_logits(logits, lse, safe_targets, valid.to(logits.dtype), hidden,
                                                  weight, want_weight_grad)
    return losses.sum(), grad_hidden, grad_weight


def _head_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Under autocast the head's matmul runs in the autocast dtype, as nn.Linear would
    (QLoRA keeps the head in fp32; an fp32 vocab matmul would be many times slower)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return weight.to(torch.get_autocast_dtype(device_type))
    return weight


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int):
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        want_weight_grad = ctx.needs_input_grad[1]
        weight = _head_dtype(hidden, weight)
        hidden = hidden.to(weight.dtype)
        loss = torch.zeros((), dtype=torch.promote_types(weight.dtype, torch.float32), device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # fp32 accumulation: the head's gradient sums over every chunk.
        grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) \
            if want_weight_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            part_loss, part_grad_h, part_grad_w = _chunk_loss_and_grads(
                hidden[rows], weight, targets[rows], want_weight_grad)
            loss += part_loss
            if grad_hidden is not None:
                grad_hidden[rows] = part_grad_h
            if grad_weight is not None:
                grad_weight += part_grad_w
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        d_hidden = (grad_hidden * grad_loss).to(ctx.hidden_dtype) if grad_hidden is not None else None
        d_weight = (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None
        return d_hidden, d_weight, None, None


def chunked_linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                     chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Sum over tokens of cross-entropy(hidden @ weight.T, targets), ignoring IGNORE_INDEX.

    hidden: [tokens, hidden_size]; weight: [vocab, hidden_size] (the LM head's);
    targets: [tokens] (already shifted: the token each position must predict).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [N, H] and targets [N], got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens)


class _ChunkedTokenLogps(torch.autograd.Function):
    """Per-token log-probs of the targets, chunk by chunk; backward recomputes each chunk's logits
    (a sequence-level loss such as DPO's weighs every token by a factor known only after the forward,
    so the gradient cannot be taken in the forward as the summed cross-entropy does)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int):
        ctx.hidden_dtype, ctx.weight_dtype, ctx.chunk_tokens = hidden.dtype, weight.dtype, chunk_tokens
        head = _head_dtype(hidden, weight)
        logps = torch.empty(hidden.shape[0], dtype=torch.promote_types(head.dtype, torch.float32),
                            device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            losses, *_ = _token_losses(_chunk_logits(hidden[rows].to(head.dtype), head), targets[rows])
            logps[rows] = -losses
        ctx.save_for_backward(hidden, weight, targets)
        ctx.head_dtype = head.dtype
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, targets = ctx.saved_tensors
        head = weight.to(ctx.head_dtype)
        grad_hidden = torch.empty_like(hidden, dtype=ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        want_w = ctx.needs_input_grad[1]
        grad_weight = torch.zeros_like(head, dtype=torch.promote_types(head.dtype, torch.float32)) if want_w else None
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            h = hidden[rows].to(head.dtype)
            logits = _chunk_logits(h, head)
            _, lse, safe_targets, valid = _token_losses(logits, targets[rows])
            scale = -grad_logps[rows].to(logits.dtype) * valid  # d logp = -d loss
            part_h, part_w = _grads_from_logits(logits, lse, safe_targets, scale, h, head, want_w)
            if grad_hidden is not None:
                grad_hidden[rows] = part_h.to(ctx.hidden_dtype)
            if grad_weight is not None:
                grad_weight += part_w
        return grad_hidden, grad_weight.to(ctx.weight_dtype) if want_w else None, None, None


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[target] per token (>= fp32, 0 where ignored), in chunks:
    the [tokens, vocab] logits never exist at once, in the forward or the backward."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [N, H] and targets [N], got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    return _ChunkedTokenLogps.apply(hidden, weight, targets, chunk_tokens)
