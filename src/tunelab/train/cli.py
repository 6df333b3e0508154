"""`tunelab train CONFIG.yaml [key=value ...]`."""

from __future__ import annotations

import argparse

from tunelab.config import describe_keys, load_config


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a model (SFT, continued pre-training, DPO/SimPO/KTO)",
        description="Fine-tune a model as a YAML config says; any key can be overridden as key=value.",
        epilog="example: tunelab train examples/hotel_lora.yaml lora_rank=16 learning_rate=1e-4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value",
                   help="an optional YAML config first, then key=value overrides")
    p.add_argument("--help-config", action="store_true", help="list every config key with its type and default")
    p.set_defaults(func=run)


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
    # Task metrics during training come from a later stage (evaluate), which the top-level
    # CLI lends this command as `args.eval_callbacks(cfg)`: train never imports evaluate.
    factory = getattr(args, "eval_callbacks", None)
    callbacks = factory(cfg) if factory and cfg.eval_task else []
    if cfg.stage in ("dpo", "simpo", "kto", "orpo"):
        from tunelab.train.preference import train_preference

        train_preference(cfg, eval_callbacks=callbacks)
    else:
        from tunelab.train.loop import train

        train(cfg, eval_callbacks=callbacks)
    return 0
