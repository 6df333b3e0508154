"""GRPO, PPO and reward-model losses against cases worked by hand."""

import math

import pytest
import torch

from tunelab.train.objectives.rm import bradley_terry_loss
from tunelab.train.rl_losses import (
    clipped_policy_loss,
    gae,
    group_advantages,
    grpo_loss,
    kl_k3,
    ppo_token_rewards,
    value_loss,
    whiten,
)


def test_group_advantages_compare_each_reward_with_its_own_group():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    # group 1: mean 0.5, sample std sqrt(1/3); group 2 all equal: no signal
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert adv[:4].tolist() == pytest.approx([expected, -expected, -expected, expected])
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_clip_binds_only_where_the_ratio_would_gain_beyond_the_range():
    old = torch.zeros(2, 1)
    logps = torch.full((2, 1), math.log(1.5))  # ratio 1.5 on both rows
    mask = torch.ones(2, 1)
    losses, clipped = clipped_policy_loss(logps, old, torch.tensor([1.0, -1.0]), mask, cliprange=0.2)
    # A=+1: min(1.5, 1.2) = 1.2 -> loss -1.2, clipped; A=-1: min(-1.5, -1.2) = -1.5 -> loss 1.5, not clipped
    assert losses.squeeze(1).tolist() == pytest.approx([-1.2, 1.5])
    assert clipped.squeeze(1).tolist() == [1.0, 0.0]


def test_kl_k3_matches_its_formula_and_is_zero_on_the_reference():
    # d = log .25 - log .5 = -log 2: exp(d) - d - 1 = 0.5 + log 2 - 1
    assert float(kl_k3(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))) == pytest.approx(
        0.5 + math.log(2) - 1)
    assert float(kl_k3(torch.tensor(-3.0), torch.tensor(-3.0))) == 0.0


def test_grpo_sequence_loss_is_the_token_mean_of_surrogate_plus_kl():
    logps = torch.tensor([[math.log(0.5), math.log(0.5), 0.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third position is padding
    losses, stats = grpo_loss(logps, logps.detach(), ref, torch.tensor([2.0]), mask, cliprange=0.2, kl_coef=0.1)
    kl_first = 0.5 + math.log(2) - 1
    # on-policy: ratio 1, surrogate -A = -2 per token; KL on the first token only
    assert float(losses[0]) == pytest.approx((-2 + 0.1 * kl_first + -2) / 2)
    assert float(stats["kl"][0]) == pytest.approx(kl_first / 2)
    assert float(stats["clip_fraction"][0]) == 0.0
    # the gradient of an on-policy step is -A * grad log pi, averaged over the tokens
    leaf = logps.clone().requires_grad_(True)
    grpo_loss(leaf, leaf.detach(), None, torch.tensor([2.0]), mask, 0.2, 0.0)[0].sum().backward()
    assert leaf.grad[0].tolist() == pytest.approx([-1.0, -1.0, 0.0])


def test_ppo_rewards_put_the_kl_penalty_on_every_token_and_the_score_on_the_last():
    rewards = ppo_token_rewards(torch.tensor([2.0]), old_logps=torch.tensor([[-1.0, -1.0, 0.0]]),
                                ref_logps=torch.tensor([[-1.5, -1.0, 0.0]]), mask=torch.tensor([[1.0, 1.0, 0.0]]),
                                kl_coef=0.1)
    assert rewards[0].tolist() == pytest.approx([-0.05, 2.0, 0.0])


def test_gae_with_lambda_one_gives_returns_minus_values_and_with_lambda_zero_one_step_errors():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0]])  # 9.0 sits on padding: never read
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.5, 0.5, 0.0])
    assert returns[0, :3].tolist() == pytest.approx([1.0, 1.0, 1.0])
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)  # r_t + V_{t+1} - V_t, V after the end = 0
    assert adv[0].tolist() == pytest.approx([0.0, 0.0, 0.5, 0.0])
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    assert adv[0, :3].tolist() == pytest.approx([0.25 - 0.5, 0.5 - 0.5, 1.0 - 0.5])


def test_whitened_advantages_have_mean_zero_and_unit_variance_on_real_tokens():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    out = whiten(torch.tensor([[1.0, 2.0, 50.0], [3.0, 4.0, 5.0]]), mask)
    real = out[mask.bool()]
    assert float(real.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(real.pow(2).mean()) == pytest.approx(1.0, abs=1e-5)
    assert float(out[0, 2]) == 0.0


def test_value_loss_takes_the_worse_of_clipped_and_unclipped():
    # V = 0.5 from V_old = 0 clipped to 0.2; R = 1: 0.5 * max(0.25, 0.64) = 0.32
    loss = value_loss(torch.tensor([[0.5]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1), 0.2)
    assert float(loss[0]) == pytest.approx(0.32)


def test_bradley_terry_loss():
    assert float(bradley_terry_loss(torch.tensor(1.0), torch.tensor(0.0))) == pytest.approx(math.log(1 + math.exp(-1)))
