"""The optimizer the `optim` key names, with transformers' names and parameter groups.

adamw_torch (default; fused on CUDA), adamw_8bit / paged_adamw_8bit (bitsandbytes:
8-bit blockwise states, the paged one spilling to host memory under pressure),
adafactor (transformers' Adafactor with a fixed learning rate, as the Trainer's
`optim=adafactor`), sgd (plain SGD, as the Trainer's). No weight decay on biases and
norms (as transformers does).
"""

from __future__ import annotations

import torch

from tunelab.config import TunelabConfig
from tunelab.errors import TunelabError


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _bitsandbytes_optim(name: str):
    try:
        import bitsandbytes
    except ImportError:
        raise TunelabError(f"optim={name} needs the bitsandbytes package, which is not installed", where="config",
                           fix="pip install 'tunelab[quant]' (or pip install bitsandbytes), or use "
                               "optim=adamw_torch") from None
    return bitsandbytes.optim.PagedAdamW8bit if name.startswith("paged") else bitsandbytes.optim.AdamW8bit


def _adafactor(groups, lr, **_):
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)


OPTIMIZERS = {  # config.CHOICES["optim"] lists the same names
    "adamw_torch": lambda groups, fused, **kw: torch.optim.AdamW(groups, fused=fused, **kw),
    "adamw_8bit": lambda groups, fused, **kw: _bitsandbytes_optim("adamw_8bit")(groups, **kw),
    "paged_adamw_8bit": lambda groups, fused, **kw: _bitsandbytes_optim("paged_adamw_8bit")(groups, **kw),
    "adafactor": _adafactor,
    "sgd": lambda groups, lr, **_: torch.optim.SGD(groups, lr=lr),
}


def build_optimizer(model, cfg: TunelabConfig, device: torch.device) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optim](param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                 betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                 fused=device.type == "cuda")
