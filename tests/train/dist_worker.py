"""Run several training jobs in one torchrun launch (tests/train/test_distributed.py).

    torchrun --standalone --nproc-per-node 2 tests/train/dist_worker.py jobs.json

One process group for all jobs (starting Python, torch and transformers twice per job
would cost more than the training); each job is a dict of config keys. Every collective call
tunelab's own code makes is counted, inside optimizer steps and outside, into
`collectives-RANK.json` beside jobs.json: a step must issue none (the engines' gradient
reductions are not tunelab's calls and are not counted).
"""

import contextlib
import json
import signal
import sys
from pathlib import Path

import torch
from torch import nn

from tunelab.config import load_config
from tunelab.model import loader
from tunelab.train import loop

INT8_STAND_IN = "int8_stand_in"  # a job key, not a config key: quantization_bit loads through `int8_base`
INTERRUPT = "interrupt_after_step"  # a job key: Ctrl-C reaches every rank during that optimizer step

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier")


def count_collectives() -> dict:
    counts = {"inside_step": [], "outside_step": 0}
    inside = []
    real_step = loop.optimizer_step

    def step(*args, **kwargs):
        inside.append(True)
        try:
            return real_step(*args, **kwargs)
        finally:
            inside.pop()

    def counted(name, real):
        def call(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("tunelab"):
                if inside:
                    counts["inside_step"].append(f"{name} from {caller}")
                else:
                    counts["outside_step"] += 1
            return real(*args, **kwargs)
        return call

    loop.optimizer_step = step
    for name in COLLECTIVES:
        setattr(torch.distributed, name, counted(name, getattr(torch.distributed, name)))
    return counts


def run(cfg):
    """As `tunelab train` runs it: the stage's objective from the table (train/objectives)."""
    return loop.train(cfg)


class Int8Linear(nn.Linear):
    """A frozen linear layer stored as int8 codes, its per-row scales kept on the weight as its
    quantization state and written into state dicts beside it (`weight.scale`), as bitsandbytes
    does (`weight.absmax`, ...): QLoRA's layout where bitsandbytes (CUDA only) is not."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        self.weight = nn.Parameter(torch.round(weight / scale).to(torch.int8), requires_grad=False)
        self.weight.quant_state = scale
        self.bias = linear.bias

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight.scale"] = self.weight.quant_state

    def forward(self, x):
        scale = self.weight.quant_state.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype) * scale, self.bias)


@contextlib.contextmanager
def interrupted_at(step: int):
    """SIGINT on every rank during optimizer step `step` (as a scheduler's SIGTERM reaches every
    process): the loop finishes the step, checkpoints and re-raises, which ends the job here."""
    real = loop.optimizer_step
    calls = []

    def step_then_interrupt(*args, **kwargs):
        calls.append(True)
        if len(calls) == step:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    loop.optimizer_step = step_then_interrupt
    try:
        yield
    except KeyboardInterrupt:
        pass
    finally:
        loop.optimizer_step = real


@contextlib.contextmanager
def int8_base():
    """`quantization_bit` loads the model with every decoder linear as an Int8Linear (CPU, no bitsandbytes)."""
    real = loader.load_model

    def load(*args, quantization_bit=None, **kwargs):
        model = real(*args, **kwargs)
        if quantization_bit:
            decoder = model.get_decoder()
            for parent in list(decoder.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Linear:
                        setattr(parent, name, Int8Linear(child))
            model.is_loaded_in_8bit = True  # what transformers marks: prepare_for_training's QLoRA set-up runs
        return model

    loader.load_model = load
    try:
        yield
    finally:
        loader.load_model = real


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    counts = count_collectives()
    jobs = Path(sys.argv[1])
    for values in json.loads(jobs.read_text(encoding="utf-8")):
        interrupt = values.pop(INTERRUPT, None)
        with int8_base() if values.pop(INT8_STAND_IN, False) else contextlib.nullcontext(), \
                interrupted_at(interrupt) if interrupt else contextlib.nullcontext():
            run(load_config(None, values))
    (jobs.parent / f"collectives-{torch.distributed.get_rank()}.json").write_text(json.dumps(counts))
    torch.distributed.destroy_process_group()
