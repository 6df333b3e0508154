"""Run several training jobs in one torchrun launch (tests/train/test_distributed.py).

    torchrun --standalone --nproc-per-node 2 tests/train/dist_worker.py jobs.json

One process group for all jobs (starting Python, torch and transformers twice per job
would cost more than the training); each job is a dict of config keys. Every collective call
tunelab's own code makes is counted, inside optimizer steps and outside, into
`collectives-RANK.json` beside jobs.json: a step must issue none (the engines' gradient
reductions are not tunelab's calls and are not counted).
"""

import json
import sys
from pathlib import Path

import torch

from tunelab.config import load_config
from tunelab.train import loop

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


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    counts = count_collectives()
    jobs = Path(sys.argv[1])
    for values in json.loads(jobs.read_text(encoding="utf-8")):
        run(load_config(None, values))
    (jobs.parent / f"collectives-{torch.distributed.get_rank()}.json").write_text(json.dumps(counts))
    torch.distributed.destroy_process_group()
