"""Speed levers for training; each keeps the math of the plain path (tests/train/test_fast_*.py).

- `varlen`: padding-free batches (one stream of real tokens) with per-sample attention
  through torch's FlashAttention varlen kernel (`padding_free=true`);
- `chunked_ce`: LM head + cross-entropy in token chunks, never the full logits (`fused_loss=true`);
- `loss.fast_causal_lm_loss_sum`: the SFT loss through both;
- `compile_decoder_layers`: regional torch.compile of each decoder layer (`torch_compile=true`);
- `lora_dropout`: a lean LoRA training forward (PEFT's without its per-call dispatch), with
  dropout masks recomputed in backward instead of stored on the compiled path;
- `plan`: which of these a run takes when the keys are left on auto (the default).
- `memory.apply_memory_levers`: activation offload, token-tiled MLP, compiled NF4 (QLoRA).
"""

from __future__ import annotations

import contextlib

from tunelab.config import TunelabConfig
from tunelab.train.fast.lora_dropout import lean_lora_forward
from tunelab.train.fast.loss import fast_causal_lm_loss_sum, fast_sequence_logps
from tunelab.train.fast.memory import apply_memory_levers
from tunelab.train.fast.varlen import base_model, use_varlen_attention

__all__ = ["apply_speed_levers", "compile_decoder_layers", "fast_causal_lm_loss_sum", "fast_sequence_logps",
           "lean_lora_forward"]


def compile_decoder_layers(model, backend: str = "inductor") -> int:
    """torch.compile each decoder layer in place; returns how many were compiled.

    Layer by layer rather than the whole model: every layer is the same graph, so it
    compiles once, and the loss and the Python around it stay eager. `dynamic=True`
    because padding-free batches change length every step.
    """
    layers = base_model(model).get_decoder().layers
    # Round fused intermediates to bf16 where eager would: without it inductor keeps them in
    # fp32, and on the 7B benchmark the loss curve drifted 0.07 from the eager one in 15 steps.
    options = {"emulate_precision_casts": True} if backend == "inductor" else None
    for layer in layers:
        layer.compile(dynamic=True, backend=backend, options=options)
    return len(layers)


@contextlib.contextmanager
def eager_layers(model):
    """Run the decoder layers uncompiled inside the block (generation during training: a KV cache
    changes shape every token, and compiled layers would recompile until dynamo gives up)."""
    layers = base_model(model).get_decoder().layers
    saved = [getattr(layer, "_compiled_call_impl", None) for layer in layers]
    for layer in layers:
        layer._compiled_call_impl = None
    try:
        yield
    finally:
        for layer, compiled in zip(layers, saved):
            layer._compiled_call_impl = compiled


def apply_speed_levers(model, cfg: TunelabConfig, device=None) -> None:
    """Switch the model to the levers `plan.resolve_speed` decided (after LoRA is applied)."""
    from tunelab.train.fast.plan import lean_lora_applies, lora_dropout_recomputed

    if cfg.padding_free:
        use_varlen_attention(model)
    if lean_lora_applies(cfg, device):
        lean_lora_forward(model, recompute_dropout=lora_dropout_recomputed(cfg, device))
    if cfg.torch_compile:
        compile_decoder_layers(model)
    apply_memory_levers(model, cfg)  # after compile: offload wraps the compiled layers
