"""Online RL losses as pure functions of per-token log-probabilities (tensors [batch, tokens]).

Every per-token tensor is aligned with the completion's tokens and comes with `mask`
(1 on completion tokens, 0 on prompt and padding). A sequence's loss is the mean over
its own tokens; the caller sums sequences and the loop divides by their number.

- GRPO (Shao et al. 2024, DeepSeekMath): advantages are rewards normalised within the
  group of completions of one prompt, A_i = (r_i - mean(r)) / (std(r) + eps), one value
  for every token of completion i; no value model.
- PPO (Schulman et al. 2017; Ouyang et al. 2022 for the LM form): per-token rewards
  r_t = -kl_coef (log pi_old - log ref)_t, plus the reward model's score on the last token;
  advantages by GAE over the value head's estimates, whitened over the batch.
- Both: the clipped surrogate -min(rho A, clip(rho, 1 - e, 1 + e) A), rho = pi / pi_old.
  GRPO adds the KL to the reference as a loss term with the k3 estimator
  exp(ref - logp) - (ref - logp) - 1 (unbiased, always >= 0; Schulman 2020).
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: each reward minus its group's mean, over the group's standard deviation.
    `rewards` holds the groups one after the other ([prompts * group_size]). A group whose
    completions all scored the same gets advantage 0 (it carries no signal)."""
    groups = rewards.view(-1, group_size)
    mean = groups.mean(-1, keepdim=True)
    std = groups.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((groups - mean) / (std + eps)).view(-1)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate on samples from pi: exp(d) - d - 1 with d = ref - logp."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate losses, and which tokens the clip bound (detached 0/1).
    `advantages` is [batch, tokens] (PPO) or [batch] (GRPO: one value per sequence)."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - cliprange, 1 + cliprange) * advantages
    losses = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).float() * mask
    return losses, was_clipped.detach()


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, cliprange: float, kl_coef: float
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sequence GRPO losses (clipped surrogate + kl_coef * k3 KL, each a mean over the
    sequence's tokens) and per-sequence stats: kl, clip fraction."""
    policy, clipped = clipped_policy_loss(logps, old_logps, advantages, mask, cliprange)
    kl = kl_k3(logps, ref_logps) if ref_logps is not None else torch.zeros_like(logps)
    losses = masked_mean(policy + kl_coef * kl, mask, dim=-1)
    return losses, {"kl": masked_mean(kl.detach(), mask, dim=-1), "clip_fraction": masked_mean(clipped, mask, dim=-1)}


def ppo_token_rewards(scores: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> torch.Tensor:
    """r_t = -kl_coef (log pi_old - log ref)_t on every completion token, + the score on the last one."""
    rewards = -kl_coef * (old_logps - ref_logps) * mask
    last = mask.long().cumsum(-1).argmax(-1)  # index of each row's last completion token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's completion tokens (the value after the
    last token is 0: the episode ends). Returns (advantages, returns = advantages + values)."""
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t] + running * (1 - mask[:, t])
        advantages[:, t] = running * mask[:, t]
        next_value = torch.where(mask[:, t].bool(), values[:, t], next_value)
    return advantages, advantages + values


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Advantages to mean 0, std 1 over the batch's completion tokens."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> torch.Tensor:
    """Per-sequence clipped value loss 0.5 max((V - R)^2, (V_clip - R)^2), mean over tokens."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return masked_mean(losses, mask, dim=-1)
