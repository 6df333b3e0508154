"""LoRA dropout with masks recomputed in backward: PEFT's distribution, its gradients, no stored copy."""

import pytest
import torch

from tunelab.train.fast.lora_dropout import dropped_linear, keep_mask, lean_lora_forward


def test_keep_mask_is_bernoulli_and_a_function_of_the_seed():
    p = 0.1
    masks = [keep_mask(torch.tensor(seed), torch.Size([1000, 1000]), p, "cpu") for seed in (1, 2)]
    for mask in masks:
        assert mask.float().mean().item() == pytest.approx(1 - p, abs=2e-3)
        rows = mask.float().mean(1)  # no structure along an axis either
        assert rows.std().item() == pytest.approx((p * (1 - p) / 1000) ** 0.5, rel=0.2)
    assert torch.equal(masks[0], keep_mask(torch.tensor(1), torch.Size([1000, 1000]), p, "cpu"))
    agree = (masks[0] == masks[1]).float().mean().item()  # independent seeds: 0.9^2 + 0.1^2 agreement
    assert agree == pytest.approx((1 - p) ** 2 + p**2, abs=3e-3)


def test_expectation_equals_the_undropped_product():
    torch.manual_seed(0)
    x, w = torch.randn(64, 32, dtype=torch.float64), torch.randn(8, 32, dtype=torch.float64)
    draws = torch.stack([dropped_linear(x, w, 0.3) for _ in range(2000)])
    z = (draws.mean(0) - x @ w.t()) / (draws.std(0) / 2000**0.5)  # E[h] = x w^T: z-scores ~ N(0, 1)
    assert z.abs().max().item() < 5 and abs(z.mean().item()) < 0.2 and 0.8 < z.std().item() < 1.2


def test_gradients_equal_the_explicit_mask_and_repeat_bit_for_bit():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    seed, p = torch.tensor(12345), 0.25
    out = dropped_linear(x, w, p, seed)
    grad_out = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), grad_out)
    mask = keep_mask(seed, x.shape, p, "cpu").to(x.dtype) / (1 - p)
    ref = (x * mask) @ w.t()
    rx, rw = torch.autograd.grad(ref, (x, w), grad_out)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    again = torch.autograd.grad(dropped_linear(x, w, p, seed), (x, w), grad_out)
    assert torch.equal(again[0], gx) and torch.equal(again[1], gw)
    torch.autograd.gradcheck(lambda a, b: dropped_linear(a, b, p, seed), (x[:1, :2], w))


def _lora_model(dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def _saved_bytes(model, ids) -> int:
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()  # a shared tensor counts once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    return sum(saved.values())


def test_lora_layers_store_no_dropped_copy_and_eval_is_unchanged():
    ids = torch.randint(0, 64, (2, 24))
    no_dropout, peft_dropout, ours = _lora_model(0.0), _lora_model(0.1), _lora_model(0.1)
    assert lean_lora_forward(ours, recompute_dropout=True) == 7  # q k v o gate up down
    for m in (no_dropout, peft_dropout, ours):
        m.train()
    plain, peft_bytes, our_bytes = (_saved_bytes(m, ids) for m in (no_dropout, peft_dropout, ours))
    assert peft_bytes > plain * 1.1  # PEFT keeps a dropped copy of every LoRA input
    # ours: what dropout 0 keeps, plus a seed a module (and small [tokens, rank] intermediates)
    assert our_bytes - plain < 0.05 * (peft_bytes - plain), (plain, peft_bytes, our_bytes)
    ours.eval(), peft_dropout.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, peft_dropout(input_ids=ids).logits)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_lean_eager_forward_equals_peft_in_outputs_and_gradients(dropout):
    """Without recomputation the lean forward draws the same dropout masks as PEFT (same calls in the
    same order), so with one seed the loss and every LoRA gradient are PEFT's; evaluation and a
    disabled adapter go through PEFT's own forward."""
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    results = []
    for lean in (False, True):
        model = _lora_model(dropout)
        if lean:
            assert lean_lora_forward(model, recompute_dropout=False) == 7
        model.train()
        torch.manual_seed(3)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        model.eval()
        with torch.no_grad():
            evaluated = model(input_ids=ids).logits
            with model.disable_adapter():
                base = model(input_ids=ids).logits
        results.append((loss.detach(), grads, evaluated, base))
    (loss_a, grads_a, eval_a, base_a), (loss_b, grads_b, eval_b, base_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 14
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)
    torch.testing.assert_close(eval_b, eval_a)
    torch.testing.assert_close(base_b, base_a)
    assert not torch.allclose(eval_a, base_a)  # the adapter matters (lora_B is not zero here)
