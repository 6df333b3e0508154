"""Preference losses as pure functions of per-sequence log-probabilities.

Every function takes 1-D tensors (one value per pair or example) and returns the
per-example losses plus the implicit rewards, so the caller can sum them (the loop
divides by the number of pairs of the whole optimizer step) and log the rewards.

- DPO (Rafailov et al. 2023): h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
    sigmoid: -(1-e) log s(b h) - e log s(-b h)   (e = label smoothing: conservative DPO)
    ipo:     (h - 1/(2b))^2                        (Azar et al. 2023)
    hinge:   max(0, 1 - b h)                       (SLiC, Zhao et al. 2023)
- SimPO (Meng et al. 2024): -log s(b/|y_w| log pi(y_w) - b/|y_l| log pi(y_l) - gamma)
- KTO (Ethayarajh et al. 2024): v = l_D s(b (r - z)) for desirable, l_U s(b (z - r))
  for undesirable, loss = l - v with r = log pi(y|x) - log ref(y|x) and z the KL estimate.
- ORPO (Hong et al. 2024): -avg log pi(y_w) - b log s(log odds(y_w) - log odds(y_l)),
  odds(y) = p / (1 - p) with p = exp(avg log pi(y)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses, and the chosen / rejected rewards b (log pi - log ref) (detached)."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {DPO_LOSSES}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO losses from length-normalised log-probs (no reference model); rewards b * avg."""
    logits = beta * (chosen_avg - rejected_avg) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def kto_kl_estimate(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """The reference point z: mean log-ratio on mismatched (prompt, other completion) pairs,
    clamped at 0 and detached: the paper treats it as a constant, not a training signal."""
    return (policy_kl - ref_kl).mean().clamp(min=0).detach()


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO losses l_y (1 - s(...)) and rewards b (log pi - log ref) (detached)."""
    ratio = policy - ref
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    losses = torch.where(desirable.bool(), chosen, rejected)
    return losses, beta * ratio.detach()


def orpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ORPO losses (NLL of chosen + b * odds-ratio loss), rewards b * avg, and the log odds ratio."""
    log_odds = _log_odds(chosen_avg) - _log_odds(rejected_avg)
    losses = -chosen_avg - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach(), log_odds.detach()


def _log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) with p = exp(a): a - log(1 - exp(a)). expm1 keeps precision as p -> 0;
    the clamp keeps p = 1 (a = 0, a memorised answer) finite."""
    a = avg_logp.clamp(max=-1e-6)
    return a - torch.log(-torch.expm1(a))
