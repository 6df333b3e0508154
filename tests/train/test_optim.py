"""The optim key builds the optimizer it names; 8-bit ones need bitsandbytes and say so."""

import importlib.util

import pytest
import torch

from tunelab.config import CHOICES, TunelabConfig, load_config
from tunelab.errors import TunelabError
from tunelab.train.optim import OPTIMIZERS, build_optimizer


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))


def test_every_optim_choice_has_a_builder():
    assert set(OPTIMIZERS) == set(CHOICES["optim"])


@pytest.mark.parametrize("name,cls", [("adamw_torch", torch.optim.AdamW), ("sgd", torch.optim.SGD),
                                      ("adafactor", None)])
def test_builds_and_steps(name, cls):
    model = _model()
    opt = build_optimizer(model, TunelabConfig(optim=name, weight_decay=0.1, learning_rate=1e-2), torch.device("cpu"))
    if cls is not None:
        assert type(opt) is cls
    else:
        assert type(opt).__name__ == "Adafactor"
    # No decay on biases and norms.
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert len(opt.param_groups[0]["params"]) == 1  # the Linear weight only
    before = model[0].weight.detach().clone()
    model(torch.randn(3, 4)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, before)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_without_bitsandbytes_names_the_extra(name):
    with pytest.raises(TunelabError, match=r"tunelab\[quant\]"):
        build_optimizer(_model(), TunelabConfig(optim=name), torch.device("cpu"))


def test_unknown_optim_is_refused_with_a_hint():
    with pytest.raises(TunelabError, match="adamw_8bit"):
        load_config(overrides=["optim=adamw8bit"])


# --- schedules ---------------------------------------------------------------------------------

def _lrs(cfg: TunelabConfig, steps: int = 10, losses: dict | None = None) -> list[float]:
    """The learning rate after each of `steps` optimizer steps (and evaluations at `losses` steps)."""
    from tunelab.train.optim import after_evaluation, build_scheduler

    model = _model()
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    scheduler = build_scheduler(opt, cfg, steps)
    out = []
    for step in range(1, steps + 1):
        opt.step()
        scheduler.step()
        if losses and step in losses:
            after_evaluation(scheduler, losses[step])
        out.append(scheduler.get_last_lr()[0])
    return out


def test_scheduler_names_are_transformers_own():
    from transformers import SchedulerType

    assert set(CHOICES["lr_scheduler_type"]) == {s.value for s in SchedulerType}


@pytest.mark.parametrize("name", [n for n in CHOICES["lr_scheduler_type"] if n not in ("reduce_lr_on_plateau", "greedy")])
def test_every_step_scheduler_builds_and_runs(name):
    kwargs = {"min_lr_rate": 0.1} if "min_lr" in name else {"num_decay_steps": 3} if name == "warmup_stable_decay" \
        else {}
    lrs = _lrs(TunelabConfig(lr_scheduler_type=name, lr_scheduler_kwargs=kwargs, warmup_steps=2, learning_rate=1.0))
    assert len(lrs) == 10 and all(0 <= lr <= 1.0 for lr in lrs)


def test_scheduler_kwargs_reach_the_schedule():
    plain = _lrs(TunelabConfig(lr_scheduler_type="cosine_with_restarts", learning_rate=1.0))
    two = _lrs(TunelabConfig(lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 2},
                             learning_rate=1.0))
    assert plain != two and two[3] < 0.1 and two[4] == 1.0  # the second cycle restarts at the top
    floor = _lrs(TunelabConfig(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                               learning_rate=1.0))
    assert floor[-1] == pytest.approx(0.1)


def test_scheduler_kwargs_from_the_command_line():
    cfg = load_config(overrides=["lr_scheduler_type=cosine_with_min_lr", "lr_scheduler_kwargs={min_lr: 1.0e-6}"])
    assert cfg.lr_scheduler_kwargs == {"min_lr": 1e-6}


def test_wrong_scheduler_kwargs_are_a_clear_error():
    with pytest.raises(TunelabError, match="lr_scheduler_kwargs"):
        _lrs(TunelabConfig(lr_scheduler_type="linear", lr_scheduler_kwargs={"num_cycles": 2}))
    with pytest.raises(TunelabError, match="cosine_with_min_lr"):
        _lrs(TunelabConfig(lr_scheduler_type="cosine_with_min_lr"))  # needs min_lr or min_lr_rate


def test_plateau_follows_the_validation_loss():
    cfg = TunelabConfig(lr_scheduler_type="reduce_lr_on_plateau", lr_scheduler_kwargs={"patience": 0, "factor": 0.5},
                        eval_strategy="steps", learning_rate=1.0)
    lrs = _lrs(cfg, steps=6, losses={2: 1.0, 4: 2.0, 6: 3.0})
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25]  # steps alone change nothing; each worse loss halves it


def test_plateau_without_evaluations_is_refused():
    with pytest.raises(TunelabError, match="eval_strategy"):
        TunelabConfig(lr_scheduler_type="reduce_lr_on_plateau")


def test_fused_adamw_steps_on_this_device():
    model = _model()
    opt = build_optimizer(model, TunelabConfig(optim="adamw_torch_fused", learning_rate=1e-2), torch.device("cpu"))
    assert opt.defaults["fused"] is True
    before = model[0].weight.detach().clone()
    model(torch.randn(3, 4)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, before)
