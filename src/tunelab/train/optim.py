"""The optimizer the `optim` key names, with transformers' names and parameter groups.

adamw_torch (default; fused on CUDA), adamw_torch_fused (fused everywhere), adamw_8bit / paged_adamw_8bit (bitsandbytes:
8-bit blockwise states, the paged one spilling to host memory under pressure),
adafactor (transformers' Adafactor with a fixed learning rate, as the Trainer's
`optim=adafactor`), sgd (plain SGD, as the Trainer's). No weight decay on biases and
norms (as transformers does).

The schedule is transformers' `get_scheduler` for every name it knows, with
`lr_scheduler_kwargs` as its own arguments; the two that follow the validation loss
(reduce_lr_on_plateau, greedy) step after each evaluation instead of each step.
"""

from __future__ import annotations

import math

import torch

from tunelab.config import METRIC_SCHEDULERS, TunelabConfig
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
    "adamw_torch_fused": lambda groups, fused, **kw: torch.optim.AdamW(groups, fused=True, **kw),
    "adamw_8bit": lambda groups, fused, **kw: _bitsandbytes_optim("adamw_8bit")(groups, **kw),
    "paged_adamw_8bit": lambda groups, fused, **kw: _bitsandbytes_optim("paged_adamw_8bit")(groups, **kw),
    "adafactor": _adafactor,
    "sgd": lambda groups, lr, **_: torch.optim.SGD(groups, lr=lr),
}


def build_optimizer(model, cfg: TunelabConfig, device: torch.device) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optim](param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                 betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                 fused=device.type == "cuda")


class MetricScheduler:
    """A schedule that follows the validation loss: `step()` after an optimizer step does
    nothing, `step(loss)` after an evaluation steps it (as transformers' Trainer does)."""

    def __init__(self, inner):
        self.inner = inner

    def step(self, metrics: float | None = None) -> None:
        if metrics is not None:
            self.inner.step(metrics)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.inner.optimizer.param_groups]

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def build_scheduler(optimizer, cfg: TunelabConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)
    try:
        scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=total_steps,
                                  scheduler_specific_kwargs=dict(cfg.lr_scheduler_kwargs))
    except (TypeError, ValueError) as exc:  # an argument the schedule does not take, or one it needs
        raise TunelabError(f"lr_scheduler_type={cfg.lr_scheduler_type} with lr_scheduler_kwargs="
                           f"{cfg.lr_scheduler_kwargs}: {exc}", where="config",
                           fix="give only that schedule's own arguments (see transformers.get_scheduler), e.g. "
                               "lr_scheduler_kwargs={min_lr_rate: 0.1} for cosine_with_min_lr") from None
    return MetricScheduler(scheduler) if cfg.lr_scheduler_type in METRIC_SCHEDULERS else scheduler


def after_evaluation(scheduler, eval_loss: float) -> None:
    if isinstance(scheduler, MetricScheduler):
        scheduler.step(eval_loss)
