"""`tunelab train CONFIG.yaml [key=value ...]`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from tunelab.config import describe_keys, load_config
from tunelab.errors import TunelabError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a model (SFT, continued pre-training, DPO/SimPO/KTO)",
        description="Fine-tune a model as a YAML config says; any key can be overridden as key=value.",
        epilog="example: tunelab train examples/hotel_lora.yaml lora_rank=16 learning_rate=1e-4\n"
               "several GPUs: tunelab train cfg.yaml --nproc 2   (or torchrun --nproc-per-node 2 -m tunelab.cli "
               "train cfg.yaml)\nseveral nodes: the same line on every node with --nnodes N --node-rank I "
               "--rdzv-endpoint HOST:PORT",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value",
                   help="an optional YAML config first, then key=value overrides")
    p.add_argument("--help-config", action="store_true", help="list every config key with its type and default")
    dist = p.add_argument_group("several GPUs / nodes (tunelab restarts itself through torchrun)")
    dist.add_argument("--nproc", type=int, default=None, metavar="N",
                      help="processes (GPUs) on this node; overrides the config's nproc_per_node")
    for flag in RENDEZVOUS_FLAGS:
        dist.add_argument(f"--{flag}", default=None, help="passed to torchrun")
    p.set_defaults(func=run)


RENDEZVOUS_FLAGS = ("nnodes", "node-rank", "rdzv-backend", "rdzv-endpoint", "rdzv-id", "master-addr", "master-port")


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """The first argument is the config file unless it is a key=value override."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, list(args)


def run(args) -> int:
    if args.help_config:
        print(describe_keys())
        return 0
    config_path, overrides = split_args(args.args)
    cfg = load_config(config_path, overrides)
    nproc = args.nproc if args.nproc is not None else cfg.nproc_per_node
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        return relaunch(args, nproc)
    if args.nproc is not None and "WORLD_SIZE" in os.environ:
        raise TunelabError("--nproc was given to a process a launcher already started", where="command line",
                           fix="drop --nproc: torchrun / accelerate launch decide the process count")
    # Task metrics during training come from a later stage (evaluate), which the top-level
    # CLI lends this command as `args.eval_callbacks(cfg)`: train never imports evaluate.
    factory = getattr(args, "eval_callbacks", None)
    callbacks = factory(cfg) if factory and cfg.eval_task else []
    train_stage(cfg, callbacks)
    return 0


def train_stage(cfg, eval_callbacks=()):
    """Train as `cfg.stage` says (the CLI and the Python API both come here); returns the RunResult."""
    if cfg.stage in ("dpo", "simpo", "kto", "orpo"):
        from tunelab.train.preference import train_preference

        return train_preference(cfg, eval_callbacks=eval_callbacks)
    from tunelab.train.loop import train

    return train(cfg, eval_callbacks=eval_callbacks)


def relaunch(args, nproc: int) -> int:
    """Start this same command through torchrun with `nproc` processes; wait for them."""
    from tunelab.train.distributed import torchrun_command

    rendezvous = [f"--{flag}={getattr(args, flag.replace('-', '_'))}" for flag in RENDEZVOUS_FLAGS
                  if getattr(args, flag.replace("-", "_")) is not None]
    if not rendezvous:
        rendezvous = ["--standalone"]  # one node: torchrun picks a free local port
    # The processes must agree with the count they were started with (init_distributed checks).
    command = torchrun_command(nproc, rendezvous, [*args.args, f"nproc_per_node={nproc}"])
    print("starting: " + " ".join(command), file=sys.stderr)
    return subprocess.run(command).returncode
