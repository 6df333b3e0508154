"""QLoRA at bf16 speed: NF4 weights dequantized in plain torch, so torch.compile fuses it.

bitsandbytes' Linear4bit dequantizes each weight to bf16 with its own CUDA kernel on
every forward and again in backward, a separate launch and a full bf16 copy of the
weight written to and read back from memory for every linear layer. Inside a compiled
decoder layer (`torch_compile=true`) those calls are opaque. Here the dequantization
is written in torch ops (nibble unpacking, the 16-entry code lookup, the per-block
absmax, and the double-quantized absmax's own 8-bit lookup and offset), so inductor
fuses it into one elementwise kernel feeding the matmul.

An autograd Function keeps only the packed weight and its constants for backward
and dequantizes again there, as bitsandbytes does: saving the bf16 weight would
hold a full-precision copy of every layer between forward and backward.

The storage format is bitsandbytes' (`Params4bit` + `QuantState`), read, never
written: two 4-bit codes per byte, the first in the high nibble; one absmax per
`blocksize` weights; with double quantization (kept) the absmax values are 8-bit
codes with their own fp32 absmax per 256 and an offset.
"""

from __future__ import annotations

import torch

from tunelab.train.fast.varlen import base_model


def _blockwise(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = values.numel()
    if n % blocksize == 0:
        return (values.view(-1, blocksize) * scales.view(-1, 1)).view(-1)
    return values * scales.repeat_interleave(blocksize)[:n]


def dequantize_absmax(state) -> torch.Tensor:
    """The fp32 per-block absmax of a QuantState (undoing double quantization)."""
    nested = getattr(state, "state2", None)
    if nested is None:
        return state.absmax.float()
    values = nested.code[state.absmax.long()]
    return _blockwise(values, nested.absmax, nested.blocksize) + state.offset


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' 4-bit layout -> a `shape` tensor in `dtype` (absmax already fp32)."""
    packed = packed.view(torch.uint8).reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).view(-1)  # high nibble first
    n = 1
    for size in shape:
        n *= size
    values = code[codes[:n].long()]
    return _blockwise(values, absmax, blocksize).view(shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """x @ W.T with W dequantized in forward and again in backward; nothing full-size saved."""

    @staticmethod
    def forward(ctx, x, packed, absmax, code, blocksize: int, shape: tuple[int, ...]):
        weight = dequantize_4bit(packed, absmax, code, blocksize, shape, x.dtype)
        ctx.save_for_backward(packed, absmax, code)
        ctx.blocksize, ctx.shape = blocksize, shape
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        packed, absmax, code = ctx.saved_tensors
        weight = dequantize_4bit(packed, absmax, code, ctx.blocksize, ctx.shape, grad_out.dtype)
        return grad_out @ weight, None, None, None, None, None


class CompiledNF4Forward:
    """Replaces a bitsandbytes Linear4bit's forward (same dtypes in and out as bitsandbytes')."""

    def __init__(self, module):
        # Plain-tensor views taken once the model is placed: bitsandbytes' Params4bit overrides
        # torch functions, which would break the compiled graph.
        self.packed, self.state = module.weight.data, module.weight.quant_state
        # The bias is read from the module at each call: FSDP2 shards it (a plain float parameter) and
        # puts the gathered one on the module only for the forward; a copy taken here would stay sharded.
        self.module = module
        self.compute_dtype = getattr(module, "compute_dtype", None) or self.state.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        state, compute = self.state, self.compute_dtype
        if torch.is_autocast_enabled(x.device.type):
            compute = torch.get_autocast_dtype(x.device.type)
        absmax = dequantize_absmax(state)
        out = _NF4Matmul.apply(x.to(compute), self.packed, absmax, state.code.float(), state.blocksize,
                               tuple(state.shape))
        bias = self.module.bias
        if bias is not None:
            out = out + bias.to(compute)
        return out.to(x.dtype)


def is_4bit_linear(module) -> bool:
    # The weight must be the module's own parameter: PEFT's LoRA wrapper shows its base layer's
    # weight as a property, and patching the wrapper would drop the adapter.
    state = getattr(module._parameters.get("weight"), "quant_state", None)
    return state is not None and getattr(state, "quant_type", None) in ("nf4", "fp4")


def use_compiled_nf4(model) -> int:
    """Route every 4-bit bitsandbytes linear through the torch dequantization; returns how many.
    Call it once the model is on its device (it keeps views of the packed weights)."""
    count = 0
    for module in base_model(model).modules():
        if is_4bit_linear(module) and not isinstance(module.__dict__.get("forward"), CompiledNF4Forward):
            module.forward = CompiledNF4Forward(module)  # instance attribute: Module.__call__ uses it
            count += 1
    return count
