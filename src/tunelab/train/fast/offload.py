"""Activation offload: checkpointed decoder-layer inputs wait in pinned host memory.

Gradient checkpointing keeps one tensor per decoder layer, the layer's input
([tokens, hidden]): 28 x 3584 x 2 bytes = 200 KB per token on a Qwen2.5-7B, 51 GB at
256k tokens, more than what is left of an 80 GB card beside the weights. Here each
layer runs without autograd in the forward pass while its input is copied to pinned
host memory on a side CUDA stream (the copy overlaps the layer's compute). In the
backward pass the input of the layer about to be recomputed comes back, and the input
of the layer after it (in backward order) starts coming back on the side stream while
this one recomputes, so the GPU holds the inputs of one or two layers at a time plus
one layer's activations.

The same scheme as Unsloth's offloaded checkpointer: a reentrant-style autograd
Function around the layer call that recomputes the layer with autograd on and
back-propagates through it inside `backward`. Trainable weights inside the layer
(LoRA, or every weight for full fine-tuning) get their gradients from that inner
backward. The CPU and CUDA random states and the autocast state of the forward pass
are replayed, so dropout masks and dtypes of the recomputation are the forward's.

The wrapper goes on top of whatever calls the layer (its compiled call when
`compile_decoder_layers` ran first), so per-layer torch.compile still applies inside.
On CPU the "offload" only keeps a reference (nothing to gain), which is what the tests use
to check that the recomputation gives the plain path's loss and gradients.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from functools import partial

import torch

from tunelab.train.fast.varlen import base_model


class _Saved:
    """One layer call's input, in host memory and/or back on the device."""

    __slots__ = ("host", "device_copy", "ready", "__weakref__")

    def __init__(self, host):
        self.host = host
        self.device_copy = None
        self.ready = None  # CUDA event: the host-to-device copy finished


class Offloader:
    """The side stream and the inputs waiting for their layer's backward, in forward order."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Weak references: a graph dropped without backward (an exception, eval) frees its inputs.
        self.pending: list[weakref.ref] = []

    def save(self, hidden: torch.Tensor) -> _Saved:
        """Start copying `hidden` to pinned host memory; the copy overlaps the layer's compute."""
        if self.stream is None:  # CPU: the activation already lives in host memory
            saved = _Saved(hidden.detach())
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # hidden is computed
            with torch.cuda.stream(self.stream):
                host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
                host.copy_(hidden.detach(), non_blocking=True)
            # The allocator must not hand hidden's memory to another tensor before the copy has read it.
            hidden.record_stream(self.stream)
            saved = _Saved(host)
        self.pending = [ref for ref in self.pending if ref() is not None] + [weakref.ref(saved)]
        return saved

    def _start_fetch(self, saved: _Saved) -> None:
        if saved.device_copy is not None:
            return
        if self.stream is None:
            saved.device_copy = saved.host
            return
        with torch.cuda.stream(self.stream):  # same stream as the offload copy: ordered after it
            saved.device_copy = saved.host.to(self.device, non_blocking=True)
            saved.ready = torch.cuda.Event()
            saved.ready.record(self.stream)

    def fetch(self, saved: _Saved) -> torch.Tensor:
        """`saved` back on the device (waiting for its copy), and the next one in backward order
        starting its way back."""
        self._start_fetch(saved)
        index = next((i for i, ref in enumerate(self.pending) if ref() is saved), None)
        if index is not None:
            del self.pending[index]
            earlier = self.pending[index - 1]() if index > 0 else None
            if earlier is not None:
                self._start_fetch(earlier)
        hidden = saved.device_copy
        if saved.ready is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(saved.ready)
            hidden.record_stream(main)  # allocated on the side stream, used on the main one
        saved.host = saved.device_copy = saved.ready = None
        return hidden


class ForwardState:
    """What a recomputation in backward must replay of its forward: the RNG states (LoRA dropout
    then draws the forward's masks) and the autocast setting. Offloaded layers and tiled MLPs use it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.autocast = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)

    @contextlib.contextmanager
    def rng(self):
        """The forward's RNG states inside the block; the caller's come back after it."""
        devices = [self.device] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            yield

    @contextlib.contextmanager
    def grad_and_autocast(self):
        """Autograd on, autocast as the forward had it: wrap each recomputed forward in this."""
        enabled, dtype = self.autocast
        with torch.enable_grad(), torch.autocast(self.device.type, dtype=dtype, enabled=enabled):
            yield


class _OffloadedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, offloader: Offloader, hidden: torch.Tensor):
        ctx.run, ctx.offloader = run, offloader
        ctx.forward_state = ForwardState(hidden.device)
        ctx.saved = offloader.save(hidden)
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, grad_out):
        hidden = ctx.offloader.fetch(ctx.saved).detach().requires_grad_(True)
        state = ctx.forward_state
        with state.rng():
            with state.grad_and_autocast():
                out = ctx.run(hidden)
        torch.autograd.backward(out, grad_out)
        ctx.run = ctx.saved = None
        return None, None, hidden.grad


class OffloadedCall:
    """Replaces a decoder layer's call: the layer (compiled or not) runs inside `_OffloadedLayer`."""

    def __init__(self, inner, offloader: Offloader):
        self.inner, self.offloader = inner, offloader

    def __call__(self, hidden, *args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to offload
            return self.inner(hidden, *args, **kwargs)
        extra = []

        def run(h):
            out = self.inner(h, *args, **kwargs)
            if isinstance(out, tuple):  # older layers return (hidden, ...): only hidden carries gradients
                extra[:] = out[1:]
                return out[0]
            return out

        if not hidden.requires_grad:
            # The first layer's input comes from a frozen embedding: without an input that needs a
            # gradient autograd would never call backward, and LoRA inside the layer would learn nothing.
            hidden = hidden.detach().requires_grad_(True)
        out = _OffloadedLayer.apply(run, self.offloader, hidden)
        return (out, *extra) if extra else out


def decoder_layers(model):
    return base_model(model).get_decoder().layers


def _model_device(model) -> torch.device:
    return next(base_model(model).parameters()).device


def install_activation_offload(model) -> int:
    """Wrap every decoder layer's call (after compile_decoder_layers, if used); returns how many."""
    offloader = Offloader(_model_device(model))
    layers = decoder_layers(model)
    for layer in layers:
        if isinstance(layer._compiled_call_impl, OffloadedCall):
            continue
        # The layer's own checkpointing would recompute a second time inside ours.
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = False
        inner = layer._compiled_call_impl or partial(type(layer)._call_impl, layer)
        # Module.__call__ dispatches to _compiled_call_impl when set (what Module.compile uses).
        layer._compiled_call_impl = OffloadedCall(inner, offloader)
    return len(layers)


def remove_activation_offload(model) -> None:
    """Undo install_activation_offload (the compiled call, if any, stays)."""
    for layer in decoder_layers(model):
        call = layer._compiled_call_impl
        if isinstance(call, OffloadedCall):
            layer._compiled_call_impl = None if isinstance(call.inner, partial) else call.inner


def offload_active(model) -> bool:
    return any(isinstance(layer._compiled_call_impl, OffloadedCall) for layer in decoder_layers(model))


def enable_activation_offload(model) -> bool:
    """Offload the checkpointed layer inputs to host memory (what an out-of-memory back-off calls).

    Returns True when offload is (now) on; on a CPU/MPS model it is a no-op that says so.
    """
    device = _model_device(model)
    if device.type != "cuda":
        print(f"activation_offload: nothing to do on {device.type} (activations already live in host memory)",
              file=sys.stderr)
        return False
    install_activation_offload(model)
    return True


def checkpointed_input_bytes(model_config, tokens: int, dtype_bytes: int = 2) -> int:
    """What gradient checkpointing keeps on the device for `tokens` tokens: one [tokens, hidden]
    input per decoder layer (what offload moves to host memory)."""
    return model_config.num_hidden_layers * tokens * model_config.hidden_size * dtype_bytes


def offload_wanted(setting: bool | None, model, tokens: int) -> bool:
    """True / False as set; None (auto): on a CUDA model when the checkpointed layer inputs of a micro-batch
    of `tokens` tokens would take more than a quarter of the GPU's memory."""
    if setting is not None:
        return setting
    device = _model_device(model)
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    return checkpointed_input_bytes(base_model(model).config, tokens) > total / 4
