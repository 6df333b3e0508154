"""The memory levers the config asks for, switched on after LoRA and compile (see apply_speed_levers).

- `activation_offload` (offload.py): checkpointed layer inputs in pinned host memory;
- `tiled_mlp` (tiled_mlp.py): the MLP over token tiles, recomputed tile by tile;
- QLoRA with `torch_compile` (nf4.py): NF4 dequantization in torch ops, fused by inductor.
"""

from __future__ import annotations

import sys

from tunelab.config import TunelabConfig
from tunelab.train.fast.nf4 import use_compiled_nf4
from tunelab.train.fast.offload import enable_activation_offload, offload_active, offload_wanted
from tunelab.train.fast.tiled_mlp import tile_mlps


def apply_memory_levers(model, cfg: TunelabConfig) -> None:
    if cfg.quantization_bit == 4 and cfg.torch_compile:
        use_compiled_nf4(model)
    # The longest micro-batch the run can see: what the automatic choice must fit.
    tokens = cfg.cutoff_len * cfg.per_device_train_batch_size
    if offload_wanted(cfg.activation_offload, model, tokens) and enable_activation_offload(model):
        print(f"activation offload on (activation_offload={cfg.activation_offload}): checkpointed layer inputs "
              f"wait in pinned host memory", file=sys.stderr)
    if cfg.tiled_mlp == "true" or (cfg.tiled_mlp == "auto" and offload_active(model)):
        tile_mlps(model)
