"""`tunelab train CONFIG.yaml [key=value ...]`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from tunelab.config import describe_keys, is_chain, load_config
from tunelab.errors import TunelabError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a model (SFT, pre-training, DPO/SimPO/KTO/ORPO, reward models, GRPO/PPO)",
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
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the first training sample as the model sees it, the "
                        "[[trained-on tokens]] marked; then exit (reads the tokenizer and data, no weights)")
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
    if is_chain(config_path):  # `stages:`: several runs in a row (tunelab/chain.py, lent by the top-level CLI)
        if args.nproc is not None:
            raise TunelabError("--nproc with a chain of stages", where="command line",
                               fix="chains run on one process for now: drop --nproc")
        args.run_chain(config_path, overrides, getattr(args, "eval_callbacks", None))
        return 0
    cfg = load_config(config_path, overrides)
    if args.dry_run:
        print(dry_run(cfg))
        return 0
    nproc = args.nproc if args.nproc is not None else cfg.nproc_per_node
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        return relaunch(args, nproc)
    if args.nproc is not None and "WORLD_SIZE" in os.environ:
        raise TunelabError("--nproc was given to a process a launcher already started", where="command line",
                           fix="drop --nproc: torchrun / accelerate launch decide the process count")
    # Task metrics during training come from a later stage (evaluate), which the top-level
    # CLI lends this command as `args.eval_callbacks(cfg)`: train never imports evaluate.
    factory = getattr(args, "eval_callbacks", None)
    # reward: TASK or judge (grpo / ppo) optimises a task's score or a judge's, lent like the task metrics.
    lend = getattr(args, "task_reward", None)
    run_training(cfg, factory(cfg) if factory and cfg.eval_task else [], lend)
    return 0


def run_training(cfg, callbacks: list, lend_reward=None):
    """One run of the configured stage: the loop with the stage's objective (train/objectives, one
    table). `lend_reward(cfg)`: the CLI's reward for `reward: TASK` or `reward: judge` (grpo / ppo),
    which live in a later stage (evaluate)."""
    from tunelab.train.loop import train
    from tunelab.train.objectives.rl import reward_kind

    reward = lend_reward(cfg) if lend_reward and reward_kind(cfg.reward) in ("task", "judge") else None
    return train(cfg, eval_callbacks=callbacks, reward=reward)


def dry_run(cfg) -> str:
    """The resolved config (YAML) and the first training record rendered and masked exactly as
    training encodes it (template, cutoff_len, truncation, train_on); loads no weights."""
    import yaml

    from tunelab.data.collate import IGNORE_INDEX
    from tunelab.data.templates import lock_template, mark_trained
    from tunelab.model.loader import load_tokenizer
    from tunelab.train.objectives import objective_class

    stage = objective_class(cfg.stage)  # each stage encodes its first record as its training does
    tokenizer = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    template = lock_template(tokenizer, cfg.template, cfg.system_prompt) if stage.chat else None
    source, ids, labels = stage.first_sample(cfg, tokenizer, template)
    trained = sum(label != IGNORE_INDEX for label in labels)
    return (f"=== resolved config ===\n{yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)}"
            f"=== {source}: {len(ids)} tokens, {trained} trained on ([[marked]]) ===\n"
            f"{mark_trained(ids, labels, tokenizer)}\n=== dry run: no weights loaded, nothing trained ===")


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
