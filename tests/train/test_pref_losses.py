"""Each preference loss against its paper's formula, on log-probs worked out by hand."""

import math

import pytest
import torch

from tunelab.train.pref_losses import dpo_loss, kto_kl_estimate, kto_loss, orpo_loss, simpo_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# policy log pi(y_w) = -5, log pi(y_l) = -7; reference -6 for both:
# chosen log-ratio +1, rejected -1, so h = 2.
PAIR = dict(policy_chosen=t(-5.0), policy_rejected=t(-7.0), ref_chosen=t(-6.0), ref_rejected=t(-6.0))


def test_dpo_sigmoid_is_minus_log_sigmoid_of_beta_h_and_rewards_are_beta_log_ratios():
    losses, r_chosen, r_rejected = dpo_loss(**PAIR, beta=0.1)
    assert losses.item() == pytest.approx(-log_sigmoid(0.2))
    assert r_chosen.item() == pytest.approx(0.1) and r_rejected.item() == pytest.approx(-0.1)


def test_dpo_sigmoid_with_label_smoothing_is_conservative_dpo():
    eps = 0.2
    losses, _, _ = dpo_loss(**PAIR, beta=0.1, label_smoothing=eps)
    assert losses.item() == pytest.approx(-(1 - eps) * log_sigmoid(0.2) - eps * log_sigmoid(-0.2))
    # Smoothing makes a confidently right pair cost more than without it.
    assert losses.item() > dpo_loss(**PAIR, beta=0.1)[0].item()


def test_ipo_is_squared_distance_of_h_to_one_over_two_beta():
    losses, _, _ = dpo_loss(**PAIR, beta=0.1, loss_type="ipo")
    assert losses.item() == pytest.approx((2 - 1 / 0.2) ** 2)  # 9


def test_hinge_is_relu_of_one_minus_beta_h():
    assert dpo_loss(**PAIR, beta=0.1, loss_type="hinge")[0].item() == pytest.approx(0.8)
    assert dpo_loss(**PAIR, beta=1.0, loss_type="hinge")[0].item() == 0.0  # margin met: no loss


def test_dpo_at_policy_equal_reference_is_log_two_and_pushes_chosen_up():
    policy_chosen = t(-3.0).requires_grad_()
    policy_rejected = t(-4.0).requires_grad_()
    losses, _, _ = dpo_loss(policy_chosen, policy_rejected, t(-3.0), t(-4.0), beta=0.5)
    assert losses.item() == pytest.approx(math.log(2))
    losses.sum().backward()
    # d/dh -log s(b h) at h = 0 is -b/2: raise chosen, lower rejected.
    assert policy_chosen.grad.item() == pytest.approx(-0.25)
    assert policy_rejected.grad.item() == pytest.approx(0.25)


def test_simpo_uses_length_normalised_log_probs_and_the_margin_gamma():
    # chosen: -10 over 5 tokens = -2 per token; rejected: -12 over 4 tokens = -3.
    losses, r_chosen, r_rejected = simpo_loss(t(-10 / 5), t(-12 / 4), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(-log_sigmoid(2.0 * 1 - 0.5))
    assert (r_chosen.item(), r_rejected.item()) == pytest.approx((-4.0, -6.0))
    smoothed, _, _ = simpo_loss(t(-2.0), t(-3.0), beta=2.0, gamma=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(-0.9 * log_sigmoid(1.5) - 0.1 * log_sigmoid(-1.5))


def test_kto_losses_use_the_kl_reference_point_and_class_weights():
    # Mismatched pairs: log-ratios +0.5 and -0.3 -> z = mean = 0.1.
    z = kto_kl_estimate(t(-7.0, -9.0), t(-7.5, -8.7))
    assert z.item() == pytest.approx(0.1)
    losses, rewards = kto_loss(t(-4.0, -6.0), t(-5.0, -5.0), torch.tensor([True, False]), z, beta=0.5,
                               desirable_weight=1.0, undesirable_weight=2.0)
    # desirable r = +1: 1 - s(b (r - z)); undesirable r = -1: 2 (1 - s(b (z - r))).
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.5 * 0.9), 2 * (1 - sigmoid(0.5 * 1.1))])
    assert rewards.tolist() == pytest.approx([0.5, -0.5])


def test_kto_kl_estimate_is_clamped_at_zero_and_carries_no_gradient():
    policy = t(-9.0, -9.0).requires_grad_()
    z = kto_kl_estimate(policy, t(-8.0, -8.0))
    assert z.item() == 0.0 and not z.requires_grad


def test_orpo_is_nll_plus_beta_times_odds_ratio_loss():
    # p(chosen) = 0.5 per token -> odds 1; p(rejected) = 0.2 -> odds 0.25; odds ratio 4.
    losses, r_chosen, _, log_odds = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), beta=0.1)
    assert log_odds.item() == pytest.approx(math.log(4))
    assert losses.item() == pytest.approx(math.log(2) - 0.1 * log_sigmoid(math.log(4)))
    assert r_chosen.item() == pytest.approx(0.1 * math.log(0.5))


def test_losses_are_per_pair():
    # second pair: chosen ratio 0, rejected ratio -1 -> h = 1
    losses, _, _ = dpo_loss(t(-5.0, -1.0), t(-7.0, -2.0), t(-6.0, -1.0), t(-6.0, -1.0), beta=0.1)
    assert losses.tolist() == pytest.approx([-log_sigmoid(0.2), -log_sigmoid(0.1)])
