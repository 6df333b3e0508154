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
