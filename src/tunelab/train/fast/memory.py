"""The memory levers the config asks for, switched on after LoRA and compile (see apply_speed_levers).

- `activation_offload` (offload.py): checkpointed layer inputs in pinned host memory;
- `tiled_mlp` (tiled_mlp.py): the MLP over token tiles, recomputed tile by tile;
- QLoRA with `torch_compile` (nf4.py): NF4 dequantization in torch ops, fused by inductor;
- QLoRA with bf16: the frozen LM head kept in bf16 (peft upcasts it to fp32);
- LoRA with bf16: adapters take their bf16 input as is (no fp32 round trip, no extra copies saved).
"""

from __future__ import annotations

import sys

import torch

from tunelab.config import TunelabConfig
from tunelab.train.fast.nf4 import use_compiled_nf4
from tunelab.train.fast.offload import enable_activation_offload, offload_active, offload_wanted
from tunelab.train.fast.tiled_mlp import mlps_tiled, tile_mlps
from tunelab.train.fast.varlen import base_model


def head_to_autocast_dtype(model, dtype: torch.dtype) -> bool:
    """Store a frozen, untied LM head in the autocast dtype; returns whether it did.

    QLoRA's set-up (peft's prepare_model_for_kbit_training) upcasts every unquantized weight to
    fp32; for the head that is 4 bytes x vocab x hidden (2.2 GB on Qwen2.5-7B) plus a bf16 copy
    that autocast makes on every call. Under autocast the head's matmul runs in bf16 anyway, from
    weights that were bf16 before the upcast, so storing them in bf16 changes no number.
    """
    base = base_model(model)
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    if type(head) is not torch.nn.Linear or head.weight.requires_grad or head.weight is embeddings.weight \
            or head.weight.dtype == dtype:  # a LoRA-wrapped, trained or tied head stays as it is
        return False
    if hasattr(head.weight, "to_local"):  # sharded by FSDP2, whose mixed precision gathers it in bf16 already
        return False
    head.to(dtype)
    return True


class _CastUnlessAutocast:
    """PEFT reads a LoRA layer's `cast_input_dtype_enabled` as a truth value on every call: this one
    is false while autocast is on (the adapter's matmul then runs in the autocast dtype anyway)
    and true otherwise (generation or evaluation without autocast still gets the cast)."""

    def __bool__(self) -> bool:
        return not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"))


def keep_lora_inputs_bf16(model) -> int:
    """Under autocast, let PEFT's LoRA layers take their input as it comes; returns how many layers.

    PEFT casts each adapter's input to the adapter's fp32 before `lora_A`; under bf16 autocast
    the matmul casts it straight back to bf16, and autograd keeps that bf16 copy, one per adapted
    module (q, k and v each keep their own copy of the same input). Without the round trip
    `lora_A` keeps the input itself, shared with the other adapters': the same numbers and up
    to 2 x (3h + q + 2h + i) bytes less per token per layer (82 KB on Qwen2.5-7B).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for module in base_model(model).modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = _CastUnlessAutocast()
            count += 1
    return count


def apply_memory_levers(model, cfg: TunelabConfig) -> None:
    if cfg.bf16 and cfg.finetuning_type == "lora" and not cfg.use_dora:  # DoRA's extra math is not only matmuls
        keep_lora_inputs_bf16(model)
    if cfg.quantization_bit and cfg.bf16:
        head_to_autocast_dtype(model, torch.bfloat16)
    if cfg.quantization_bit == 4 and cfg.torch_compile:
        use_compiled_nf4(model)
    # The longest micro-batch the run can see: what the automatic choice must fit.
    tokens = cfg.max_tokens_per_batch or cfg.cutoff_len * cfg.per_device_train_batch_size
    if offload_wanted(cfg.activation_offload, model, tokens) and enable_activation_offload(model):
        setting = "auto" if cfg.activation_offload is None else "true"
        print(f"activation offload on (activation_offload={setting}): checkpointed layer inputs "
              f"wait in pinned host memory", file=sys.stderr)
    if cfg.tiled_mlp or (cfg.tiled_mlp is None and offload_active(model)):
        tile_mlps(model)


def offload_for_memory(model, cfg: TunelabConfig) -> bool:
    """What an out-of-memory back-off calls: activation offload, and the tiled MLP unless the config
    says tiled_mlp=false. Returns whether anything new was switched on (False on CPU, when the
    config says activation_offload=false, or when both are already on)."""
    if cfg.activation_offload is False or (offload_active(model) and (mlps_tiled(model) or cfg.tiled_mlp is False)):
        return False
    if not enable_activation_offload(model):
        return False
    if cfg.tiled_mlp is not False:
        tile_mlps(model)
    return True
