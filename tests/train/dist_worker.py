"""Run several training jobs in one torchrun launch (tests/train/test_distributed.py).

    torchrun --standalone --nproc-per-node 2 tests/train/dist_worker.py jobs.json

One process group for all jobs (starting Python, torch and transformers twice per job
would cost more than the training); each job is a dict of config keys.
"""

import json
import sys

import torch

from tunelab.config import load_config
from tunelab.train import loop

if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    for values in json.loads(open(sys.argv[1], encoding="utf-8").read()):
        loop.train(load_config(None, values))
    torch.distributed.destroy_process_group()
