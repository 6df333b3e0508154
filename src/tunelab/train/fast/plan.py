"""Which speed levers a run takes: the fastest correct path on CUDA, the plain one elsewhere.

A lever the user left unset (`auto`) is decided here, once, from the device and the model;
a lever set to true/false is honoured as given. Every decision has a reason, and the run
log prints them in one line:

    speed: bf16 on; padding-free on; fused loss on; compiled layers on; checkpointing off
    (memory back-off turns it on if needed); micro-batches of <= 15,872 tokens (sized to 61.3 GiB free)

Nothing here changes the math: each lever has a test that it gives the plain path's loss
and gradients (tests/train/test_fast_*.py, tests/train/test_speed_plan.py).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import time

import torch

from tunelab.config import TunelabConfig
from tunelab.errors import TunelabError

# bf16 activations a decoder layer keeps for backward, per token, in units of hidden_size and
# intermediate_size (measured on the Qwen2.5-7B shape eager, without checkpointing: 66.1 GiB peak for
# 4.2k tokens with 15.2 GiB of weights, i.e. ~12 MB per token; this formula gives 11.4 MB). Compiled
# layers keep less (~4.4 MB measured): the first step measures it and raises the budget to fit
# (train/memory.py, MemoryBackoff.calibrate), so the formula only has to be safe, not tight.
ACTIVATION_PER_TOKEN = (20, 7)
# What part of the free memory the token budget may plan to fill (the rest: allocator slack,
# the loss chunks, the optimizer's temporary buffers).
FREE_MEMORY_SHARE = 0.85
MIN_TOKEN_BUDGET = 2048
# torch.compile of the decoder layers repays itself only on a long enough run. Measured on one H100
# (docs/benchmarks.md): compiling took 80-100 s (the training graph; the validation graph ~13 s more),
# then made steps 1.6x faster on the Qwen2.5-7B shape (9,934 -> 15,976 tok/s) and 1.5x on SmolLM2-135M
# (the hotel recipe's 125 steps: 33 -> 21 s). So on auto the layers are compiled when the eager run is
# estimated to take long enough that the third compiling saves repays the COMPILE_SECONDS it costs.
COMPILE_SECONDS = 100
COMPILE_PAYS_AFTER_SECONDS = 300
EAGER_MFU = 0.4  # share of the measured matmul peak an eager padding-free run reaches (7B shape: 38 %)


@dataclasses.dataclass
class SpeedPlan:
    cfg: TunelabConfig  # the run's config with every auto lever resolved to a value
    notes: list[str]

    def describe(self) -> str:
        return "speed: " + "; ".join(self.notes)


def resolve_precision(cfg: TunelabConfig, device: torch.device) -> TunelabConfig:
    """bf16 and checkpointing, needed before the model loads (bf16 auto: on where the device has it)."""
    from tunelab.model.loader import bf16_supported

    bf16 = cfg.bf16
    if bf16 is None:
        bf16 = device.type == "cuda" and not cfg.fp16 and bf16_supported(device)
    checkpointing = bool(cfg.gradient_checkpointing)  # auto: off; the memory back-off may turn it on
    return dataclasses.replace(cfg, bf16=bf16, gradient_checkpointing=checkpointing)


def _auto(cfg: TunelabConfig, device: torch.device) -> bool:
    return cfg.speed == "auto" and device.type == "cuda"


def varlen_unsupported(model) -> str | None:
    """Why the padding-free attention cannot serve this model, or None when it can."""
    from tunelab.train.fast.varlen import base_model, varlen_kernel

    if varlen_kernel() is None:
        return "this torch has no torch.nn.attention.varlen kernel"
    base = base_model(model)
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if not getattr(type(base), "_supports_attention_backend", False):
        return f"{type(base).__name__} does not take custom attention functions"
    if getattr(config, "attn_logit_softcapping", None):
        return "the model soft-caps attention logits"
    layer_types = getattr(config, "layer_types", None) or []
    if any("sliding" in str(t) for t in layer_types) or (
            getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)):
        return "the model uses sliding-window attention"
    return None


def resolve_speed(cfg: TunelabConfig, model, device: torch.device, train_tokens: int | None = None,
                  agree=None) -> SpeedPlan:
    """Decide every auto lever for this model on this device (after LoRA is applied).
    `train_tokens`: the tokens this process will train on, when known: compiling is left out of
    runs too short to repay it. `agree(seconds) -> seconds`: several processes decide on one estimate."""
    from tunelab.model.adapters import is_quantized
    from tunelab.train.fast.loss import plain_head_weight

    auto = _auto(cfg, device)
    why_plain = "off (speed=off)" if cfg.speed == "off" else f"off (plain path on {device.type})"
    notes = [f"bf16 {'on' if cfg.bf16 else 'off'}"]

    def decide(key: str, label: str, blocker: str | None) -> bool:
        value = getattr(cfg, key)
        if value is not None:
            notes.append(f"{label} {'on' if value else 'off'} ({key}={str(value).lower()})")
            return value
        on = auto and blocker is None
        notes.append(f"{label} on" if on else f"{label} {why_plain if not auto else f'off ({blocker})'}")
        return on

    padding_free = decide("padding_free", "padding-free", varlen_unsupported(model) if auto else None)
    head_blocker = None if plain_head_weight(model) is not None else \
        "the LM head is trained, biased or soft-capped"
    fused = decide("fused_loss", "fused loss", head_blocker if auto else None)
    compile_blocker = None
    if zero3_gathers_in_layers(cfg):
        if cfg.torch_compile:
            raise TunelabError("torch_compile=true cannot run under DeepSpeed ZeRO-3: it gathers each layer's "
                               "weights inside the layer, which inductor cannot compile", where="config",
                               fix="leave torch_compile unset (auto: off under ZeRO-3), use deepspeed=zero2, or "
                                   "distributed_strategy=fsdp (FSDP2 gathers outside the compiled layers)")
        compile_blocker = "DeepSpeed ZeRO-3 gathers each layer's weights inside it; inductor cannot compile that"
    elif auto and not triton_installed():
        compile_blocker = "triton is not installed"
    elif auto and is_quantized(model):
        compile_blocker = "bitsandbytes layers do not compile"
    elif auto and cfg.torch_compile is None and train_tokens is not None:
        compile_blocker = too_short_to_compile(model, train_tokens, device, agree)
    compiled = decide("torch_compile", "compiled layers", compile_blocker)
    group = cfg.group_by_length if cfg.group_by_length is not None else not padding_free
    notes.append("checkpointing " + ("on" if cfg.gradient_checkpointing else
                                     "off (memory back-off turns it on if needed)" if cfg.oom_backoff and auto
                                     else "off"))
    resolved = dataclasses.replace(cfg, padding_free=padding_free, fused_loss=fused, torch_compile=compiled,
                                   group_by_length=group)
    budget = cfg.max_tokens_per_batch
    if budget is not None:
        notes.append(f"micro-batches of <= {budget:,} tokens (max_tokens_per_batch)")
    elif auto and not cfg.packing:
        budget, free = token_budget(resolved, model, device)
        notes.append(f"micro-batches of <= {budget:,} tokens (sized to {free / 2**30:.1f} GiB free)")
    else:
        notes.append(f"micro-batches of {cfg.per_device_train_batch_size} samples")
    resolved = dataclasses.replace(resolved, max_tokens_per_batch=budget)
    if lora_dropout_recomputed(resolved, device):
        notes.append(f"LoRA dropout {cfg.lora_dropout} with masks recomputed in backward (no stored copies)")
    return SpeedPlan(resolved, notes)


def zero3_gathers_in_layers(cfg: TunelabConfig) -> bool:
    """DeepSpeed ZeRO-3 gathers a layer's weights with `set_` inside its forward: torch 2.11's inductor
    fails to lower it (LoweringException on aten.set_.source_Tensor, 2 x H100, docs/benchmarks.md)."""
    from tunelab.train.deepspeed import zero_stage

    return bool(cfg.deepspeed) and zero_stage(cfg) == 3


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def too_short_to_compile(model, train_tokens: int, device: torch.device, agree=None) -> str | None:
    """Why compiling would not pay on a run of `train_tokens` tokens, or None when it would."""
    seconds = eager_seconds(model, train_tokens, device)
    seconds = agree(int(seconds)) if agree is not None else seconds
    if seconds >= COMPILE_PAYS_AFTER_SECONDS:
        return None
    return (f"a short run: ~{seconds:.0f} s of training would not repay ~{COMPILE_SECONDS} s of compiling; "
            "torch_compile=true forces it")


def training_flops_per_token(model) -> float:
    """Forward 2N, gradients of the activations 2N, of the trained weights 2 x trained: 4N for LoRA, 6N full."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * total + 2 * trained


def eager_seconds(model, train_tokens: int, device: torch.device) -> float:
    """Rough training time of an uncompiled run on this device (FLOPs at EAGER_MFU of the measured peak).
    A small model is launch-bound and takes longer: the estimate errs towards not compiling it, which
    is what its measurement says (docs/benchmarks.md)."""
    return training_flops_per_token(model) * train_tokens / (EAGER_MFU * matmul_peak_flops(str(device)))


@functools.cache
def matmul_peak_flops(device: str) -> float:
    """bf16 matrix-product FLOP/s of this GPU, measured (a few milliseconds, once per process)."""
    n, reps = 4096, 20
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def lean_lora_applies(cfg: TunelabConfig, device) -> bool:
    """The lean LoRA forward (train/fast/lora_dropout.py) replaces PEFT's on the fast path (CUDA, auto).
    DoRA keeps PEFT's (its magnitude vector is a variant the lean forward does not compute), and so does
    DeepSpeed ZeRO-3, which gathers a module's weights in a hook on that module's own call: the lean
    forward reads lora_A's and lora_B's weights without calling them."""
    return (device is not None and _auto(cfg, torch.device(device)) and cfg.finetuning_type == "lora"
            and not cfg.use_dora and not zero3_gathers_in_layers(cfg))


def lora_dropout_recomputed(cfg: TunelabConfig, device) -> bool:
    """The memory-free LoRA dropout (train/fast/lora_dropout.py) replaces PEFT's on the compiled path
    (compiled, its mask hash is one fused kernel; eager, it would cost several passes per module)."""
    return (device is not None and _auto(cfg, torch.device(device)) and bool(cfg.torch_compile)
            and cfg.finetuning_type == "lora" and cfg.lora_dropout > 0 and not cfg.use_dora)


def activation_bytes_per_token(model, checkpointing: bool, fused_loss: bool) -> float:
    """bf16 activation bytes one training token costs (forward kept for backward), by a formula
    calibrated on the Qwen2.5-7B shape (ACTIVATION_PER_TOKEN)."""
    from tunelab.train.fast.varlen import base_model

    config = base_model(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    per_layer = (ACTIVATION_PER_TOKEN[0] * hidden + ACTIVATION_PER_TOKEN[1] * intermediate) * 2
    total = hidden * 2 * layers + per_layer if checkpointing else per_layer * layers
    if not fused_loss:  # bf16 logits, their fp32 copy, softmax and its gradient (~14 bytes a vocab entry)
        total += 14 * config.vocab_size
    return total


def token_budget(cfg: TunelabConfig, model, device: torch.device) -> tuple[int, int]:
    """Tokens per micro-batch that fit the free GPU memory, and the free bytes it was sized to."""
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch: usable
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    free_for_activations = free - trainable * 12  # fp32 gradient + two AdamW moments, not allocated yet
    per_token = activation_bytes_per_token(model, bool(cfg.gradient_checkpointing), bool(cfg.fused_loss))
    budget = int(FREE_MEMORY_SHARE * max(free_for_activations, 0) / per_token) // 256 * 256
    return max(budget, MIN_TOKEN_BUDGET), free
