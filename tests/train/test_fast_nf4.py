"""The torch NF4 dequantization reads bitsandbytes' layout exactly; the linear it drives has the
gradients of a plain linear on the dequantized weight, eager and under torch.compile."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tunelab.train.fast.nf4 import CompiledNF4Forward, dequantize_4bit, dequantize_absmax, use_compiled_nf4

# The NF4 code (QLoRA paper, appendix E; bitsandbytes' get_4bit_type("nf4")).
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
CODE8 = torch.linspace(-1, 1, 256)  # stands in for bitsandbytes' dynamic 8-bit map of the absmax


def quantize(weight: torch.Tensor, blocksize: int = 64, nested_blocksize: int = 2):
    """A reference NF4 + double quantization, written from bitsandbytes' format description."""
    flat = weight.reshape(-1)
    absmax = flat.view(-1, blocksize).abs().amax(dim=1)
    codes = (flat.view(-1, blocksize) / absmax[:, None]).reshape(-1, 1).sub(NF4).abs().argmin(dim=1)
    packed = (codes[0::2] << 4 | codes[1::2]).to(torch.uint8)[:, None]
    offset = absmax.mean()
    centred = (absmax - offset).view(-1, nested_blocksize)
    absmax2 = centred.abs().amax(dim=1)
    absmax_q = (centred / absmax2[:, None]).reshape(-1, 1).sub(CODE8).abs().argmin(dim=1).to(torch.uint8)
    state2 = SimpleNamespace(absmax=absmax2, code=CODE8, blocksize=nested_blocksize)
    state = SimpleNamespace(absmax=absmax_q, code=NF4, blocksize=blocksize, shape=weight.shape,
                            dtype=weight.dtype, quant_type="nf4", offset=offset, state2=state2)
    return packed, state


def reference_dequantize(packed, state) -> torch.Tensor:
    """Element by element: weight i = code[nibble i] * absmax[i // blocksize]."""
    out = []
    for i in range(state.shape[0] * state.shape[1]):
        byte = int(packed[i // 2, 0])
        nibble = byte >> 4 if i % 2 == 0 else byte & 0xF
        block = i // state.blocksize
        q = int(state.absmax[block])
        absmax = float(state.state2.code[q]) * float(state.state2.absmax[block // state.state2.blocksize]) \
            + float(state.offset)
        out.append(float(state.code[nibble]) * absmax)
    return torch.tensor(out).view(state.shape)


def test_dequantize_reads_nibbles_high_first_blocks_and_the_double_quantized_absmax():
    torch.manual_seed(0)
    weight = torch.randn(8, 32)
    packed, state = quantize(weight)
    got = dequantize_4bit(packed, dequantize_absmax(state), state.code, state.blocksize, tuple(state.shape),
                          torch.float32)
    torch.testing.assert_close(got, reference_dequantize(packed, state))
    assert (got - weight).abs().max() < 0.25 * weight.abs().max()  # and it is a quantization of the weight
    # One hand-made byte: 0x1F holds code 1 then code 15.
    one = dequantize_4bit(torch.tensor([[0x1F]], dtype=torch.uint8), torch.tensor([2.0]), NF4, 2, (1, 2),
                          torch.float32)
    assert one.tolist() == [[2 * NF4[1].item(), 2.0]]


class Fake4bitLinear(torch.nn.Module):
    """The attributes of a bitsandbytes Linear4bit that the compiled path reads."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        packed, state = quantize(weight)
        self.weight = torch.nn.Parameter(packed, requires_grad=False)
        self.weight.quant_state = state
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.compute_dtype = torch.float32

    def dequantized(self) -> torch.Tensor:
        state = self.weight.quant_state
        return dequantize_4bit(self.weight, dequantize_absmax(state), state.code, state.blocksize,
                               tuple(state.shape), torch.float32)


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_nf4_linear_with_lora_matches_a_linear_on_the_dequantized_weight(backend):
    torch.manual_seed(1)
    layer = Fake4bitLinear(torch.randn(16, 64), torch.randn(16))
    lora_a, lora_b = (torch.randn(4, 64, requires_grad=True), torch.randn(16, 4, requires_grad=True))
    x = torch.randn(3, 5, 64, requires_grad=True)

    def block(inp):  # a LoRA-wrapped quantized linear, as PEFT builds it
        return layer(inp) + inp @ lora_a.t() @ lora_b.t()

    ref_out = F.linear(x, layer.dequantized(), layer.bias) + x @ lora_a.t() @ lora_b.t()
    ref_grads = torch.autograd.grad(ref_out.square().sum(), (x, lora_a, lora_b))
    class LoraWrapper(torch.nn.Module):  # as PEFT wraps a Linear4bit: the base weight shown as a property
        def __init__(self, base):
            super().__init__()
            self.base_layer = base

        @property
        def weight(self):
            return self.base_layer.weight

    wrapper = LoraWrapper(layer)
    assert use_compiled_nf4(wrapper) == 1 and isinstance(layer.forward, CompiledNF4Forward)
    assert "forward" not in wrapper.__dict__  # the wrapper (and its adapter) untouched
    assert use_compiled_nf4(layer) == 0  # once
    run = torch.compile(block, backend=backend, fullgraph=True) if backend else block
    out = run(x)
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(torch.autograd.grad(out.square().sum(), (x, lora_a, lora_b)), ref_grads):
        torch.testing.assert_close(got, want)


def test_the_bias_is_the_one_on_the_module_at_call_time():
    """FSDP2 shards the float bias of a quantized linear and sets the gathered one on the module for
    the forward only (on 2 H100s a bias captured at patch time stayed a sharded DTensor and failed)."""
    torch.manual_seed(2)
    layer = Fake4bitLinear(torch.randn(8, 16), torch.randn(8))
    use_compiled_nf4(layer)
    x = torch.randn(2, 16)
    layer.bias = torch.nn.Parameter(torch.randn(8), requires_grad=False)  # what FSDP2's unshard does
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantized(), layer.bias))


def test_nf4_backward_saves_only_the_packed_weight():
    layer = Fake4bitLinear(torch.randn(16, 64), None)
    use_compiled_nf4(layer)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(2, 64, requires_grad=True))
    assert all(t.numel() < 16 * 64 for t in saved), [tuple(t.shape) for t in saved]


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available(),
                    reason="needs bitsandbytes and a CUDA GPU")
def test_matches_bitsandbytes_own_dequantization():
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    torch.manual_seed(2)
    layer = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4").cuda()
    state = layer.weight.quant_state
    want = bnbf.dequantize_4bit(layer.weight.data, state)
    got = dequantize_4bit(layer.weight, dequantize_absmax(state), state.code, state.blocksize, tuple(state.shape),
                          want.dtype)
    torch.testing.assert_close(got, want)
    x = torch.randn(7, 256, device="cuda", dtype=torch.bfloat16)
    plain = layer(x)
    use_compiled_nf4(layer)
    torch.testing.assert_close(layer(x), plain, rtol=2e-2, atol=2e-2)
