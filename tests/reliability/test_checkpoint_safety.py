"""Checkpoints people share must be safe to resume: nothing in them may run code."""

import json
from pathlib import Path

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.train import checkpoint as ckpt


class _Payload:
    """Unpickling this object runs `Path.touch(marker)`: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _tiny_setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


@pytest.mark.parametrize("victim", ["rng_state.pt", "optimizer.pt", "scheduler.pt"])
def test_malicious_pickle_in_a_checkpoint_never_runs(tmp_path, victim):
    model, optimizer, scheduler = _tiny_setup()
    path = ckpt.save_checkpoint(tmp_path, model, optimizer, scheduler, ckpt.TrainerState(global_step=1))
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker)}, path / victim)
    with pytest.raises(TunelabError) as info:
        ckpt.load_checkpoint(path, *_tiny_setup())
    assert not marker.exists(), "unpickling the checkpoint executed code"
    assert victim in str(info.value) and "fix" in info.value.message()


def test_checkpoint_round_trip_restores_everything_with_safe_loading(tmp_path, monkeypatch):
    """Every file loads with weights_only=True and resumes exactly (RNG included)."""
    import random

    import numpy as np

    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))
    model, optimizer, scheduler = _tiny_setup()
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    path = ckpt.save_checkpoint(tmp_path, model, optimizer, scheduler, ckpt.TrainerState(global_step=7))
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    model2, optimizer2, scheduler2 = _tiny_setup()
    with torch.no_grad():
        model2.weight.zero_()
    state = ckpt.load_checkpoint(path, model2, optimizer2, scheduler2)
    assert state.global_step == 7
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert torch.equal(model2.weight, model.weight)
    assert optimizer2.state_dict()["state"][0]["exp_avg"].equal(optimizer.state_dict()["state"][0]["exp_avg"])
    assert scheduler2.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]
    assert loads and all(w is True for w in loads)
    # The RNG file holds plain data only (no numpy objects to allow-list).
    assert json.dumps(torch.load(path / "rng_state.pt", weights_only=True), default=lambda t: t.tolist())


def test_checkpoint_of_an_older_version_with_numpy_rng_state_still_resumes(tmp_path):
    import random

    import numpy as np

    model, optimizer, scheduler = _tiny_setup()
    path = ckpt.save_checkpoint(tmp_path, model, optimizer, scheduler, ckpt.TrainerState(global_step=2))
    np.random.seed(5)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               path / "rng_state.pt")
    expected = np.random.rand()
    np.random.seed(6)
    assert ckpt.load_checkpoint(path, *_tiny_setup()).global_step == 2
    assert np.random.rand() == expected
