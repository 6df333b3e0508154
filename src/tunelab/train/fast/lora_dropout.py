"""A lean LoRA training forward, and LoRA dropout without the memory bill (its mask recomputed in backward).

PEFT computes `lora_B(lora_A(dropout(x)))`. `lora_A` must keep its input for its weight
gradient, and with dropout that input is a fresh copy of x for every wrapped module (q, k,
v, o, gate, up, down: seven copies a layer, the 18,944-wide down input among them), so a
recipe's `lora_dropout: 0.1` costs several GiB more than 0.0 and the fast path no longer
fits. Here `x -> dropout -> lora_A` is one autograd function that saves only x (the tensor
the layer already holds, shared by q/k/v) and a seed; the keep-mask is a counter-based hash
of (seed, element index), recomputed in backward. Under `torch.compile` the hash fuses into
one pointwise kernel with the multiply.

Same distribution as `nn.Dropout(p)`: each element kept with probability 1 - p, scaled by
1 / (1 - p), independently per module and per step (tests/train/test_fast_lora_dropout.py).
Uncompiled, that hash costs a dozen kernels a module, so the eager path keeps `F.dropout` (one
kernel, its mask stored) in the same lean forward: PEFT's per-call checks and module wrappers
were 10-25 % of an eager SmolLM2-135M hotel step on an H100 (docs/results.md, "Hotel with folding").
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

_MASK32 = 0xFFFFFFFF
_KEEP_BITS = 24  # the keep test compares 24 hash bits against p * 2^24


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix on int64 tensors (products stay below 2^63: no signed overflow)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def keep_mask(seed: torch.Tensor, shape: torch.Size, p: float, device) -> torch.Tensor:
    """Bernoulli(1 - p) keep-mask of `shape`, a pure function of (seed, element index)."""
    n = 1
    for d in shape:
        n *= d
    index = torch.arange(n, device=device, dtype=torch.int64)
    mixed = _hash32(_hash32(index & _MASK32) ^ seed)
    return ((mixed & ((1 << _KEEP_BITS) - 1)) >= int(p * (1 << _KEEP_BITS))).view(shape)


class _DroppedLinear(torch.autograd.Function):
    """h = dropout(x) @ weight.T with the mask recomputed from `seed` in backward."""

    @staticmethod
    def forward(ctx, x, weight, seed, p: float):
        scale = 1.0 / (1.0 - p)
        h = F.linear(x * keep_mask(seed, x.shape, p, x.device) * scale, weight)
        ctx.save_for_backward(x, weight, seed)
        ctx.p = p
        return h

    @staticmethod
    def backward(ctx, grad_h):
        x, weight, seed = ctx.saved_tensors
        p = ctx.p
        kept = keep_mask(seed, x.shape, p, x.device) * (1.0 / (1.0 - p))
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = ((grad_h @ weight.to(grad_h.dtype)) * kept).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = (x * kept).to(grad_h.dtype)
            grad_weight = (grad_h.reshape(-1, grad_h.shape[-1]).t()
                           @ dropped.reshape(-1, dropped.shape[-1])).to(weight.dtype)
        return grad_x, grad_weight, None, None


def dropped_linear(x: torch.Tensor, weight: torch.Tensor, p: float, seed: torch.Tensor | None = None):
    """dropout(x, p) @ weight.T, storing no dropped copy; `seed` drawn from torch's RNG if not given."""
    if seed is None:
        seed = torch.randint(0, 2**31 - 1, (), device=x.device, dtype=torch.int64)
    return _DroppedLinear.apply(x, weight, seed, p)


def _lora_forward(self, x: torch.Tensor, *args, **kwargs):
    """PEFT's Linear.forward for one active plain-LoRA adapter in training, as a few functional calls.
    PEFT's own forward checks and dispatches per call (mixed batches, variants, casts, its module
    wrappers): on SmolLM2-135M (210 LoRA modules a forward) that host time was 10-25 % of an eager step."""
    adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    plain = (self.training and not self.disable_adapters and not self.merged and not args and not kwargs
             and adapter in self.lora_A and adapter not in getattr(self, "lora_variant", {}))
    if not plain:
        return self._peft_forward(x, *args, **kwargs)
    result = self.base_layer(x)
    lora_a, lora_b, dropout = self.lora_A[adapter], self.lora_B[adapter], self.lora_dropout[adapter]
    if not torch.is_autocast_enabled(x.device.type):  # PEFT casts the input to the adapter's dtype too
        x = x.to(lora_a.weight.dtype)
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0
    if p > 0 and self._recompute_dropout:
        h = dropped_linear(x, lora_a.weight, p)
    else:
        h = F.linear(F.dropout(x, p, training=True) if p > 0 else x, lora_a.weight, lora_a.bias)
    return (result + F.linear(h, lora_b.weight, lora_b.bias) * self.scaling[adapter]).to(result.dtype)


def lean_lora_forward(model, recompute_dropout: bool) -> int:
    """Give every PEFT LoRA Linear the lean training forward; with `recompute_dropout` its dropout
    mask is recomputed in backward instead of stored. Returns how many modules were changed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    changed = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            if not hasattr(module, "_peft_forward"):
                module._peft_forward = module.forward
                module.forward = types.MethodType(_lora_forward, module)
            module._recompute_dropout = recompute_dropout
            changed += 1
    return changed
