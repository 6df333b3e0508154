"""The chunked LM head + cross-entropy gives the plain path's loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from tunelab.train.fast.chunked_ce import IGNORE_INDEX, chunked_linear_cross_entropy_sum


def _inputs(n=37, hidden=16, vocab=101, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::5] = IGNORE_INDEX  # some positions carry no target
    return h, w, targets


def _plain(h, w, targets):
    return F.cross_entropy((h @ w.t()).float() if h.dtype != torch.float64 else h @ w.t(), targets,
                           ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_loss_and_both_gradients_match_the_plain_path(chunk):
    h, w, targets = _inputs()
    ref = _plain(h, w, targets)
    ref_gh, ref_gw = torch.autograd.grad(ref * 0.7, (h, w))
    got = chunked_linear_cross_entropy_sum(h, w, targets, chunk_tokens=chunk)
    gh, gw = torch.autograd.grad(got * 0.7, (h, w))  # a scaled upstream gradient must flow through
    torch.testing.assert_close(got.double(), ref.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-6, atol=1e-8)


def test_frozen_head_gets_no_gradient_and_bf16_stays_close():
    h, w, targets = _inputs(n=64, hidden=32, vocab=257, seed=1, dtype=torch.float32)
    w = w.detach()
    ref = _plain(h, w, targets)
    (ref_gh,) = torch.autograd.grad(ref, h)
    hb = h.detach().bfloat16().requires_grad_()
    got = chunked_linear_cross_entropy_sum(hb, w.bfloat16(), targets, chunk_tokens=16)
    (gh,) = torch.autograd.grad(got, hb)
    assert gh.dtype == torch.bfloat16
    assert abs(got.item() - ref.item()) / ref.item() < 1e-2
    assert torch.linalg.norm(gh.float() - ref_gh) / torch.linalg.norm(ref_gh) < 2e-2


def test_all_ignored_gives_zero_loss_and_zero_gradient():
    h, w, targets = _inputs(n=6)
    targets[:] = IGNORE_INDEX
    got = chunked_linear_cross_entropy_sum(h, w, targets, chunk_tokens=4)
    gh, gw = torch.autograd.grad(got, (h, w))
    assert got.item() == 0 and gh.abs().sum() == 0 and gw.abs().sum() == 0


def test_shape_mistakes_are_refused():
    h, w, targets = _inputs()
    with pytest.raises(ValueError, match="expected hidden"):
        chunked_linear_cross_entropy_sum(h[None], w, targets)


def test_under_autocast_the_head_runs_in_the_autocast_dtype_like_nn_linear():
    # QLoRA keeps the head in fp32; under bf16 autocast both paths must do a bf16 matmul.
    h, w, targets = _inputs(n=48, hidden=32, vocab=211, seed=3, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        got = chunked_linear_cross_entropy_sum(h, w, targets, chunk_tokens=16)
    ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))
    gh, gw = torch.autograd.grad(got, (h, w))
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gh, ref_gh, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(gw, ref_gw, rtol=2e-2, atol=1e-3)
