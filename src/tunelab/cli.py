"""`tunelab` command line: one subcommand per pipeline stage.

Each stage package owns its subcommands in its own `cli.py` (a `register(subparsers)`
function), so a reader finds `tunelab eval` under `tunelab/evaluate/cli.py`. This file
only wires them together and turns user errors into clean messages.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tunelab.errors import TunelabError

# Stage modules that add subcommands, in pipeline order. A module that is missing
# (a stage not built yet) is skipped, so the CLI never breaks on a partial install.
STAGE_CLIS = (
    "tunelab.data.cli",
    "tunelab.train.cli",
    "tunelab.evaluate.cli",
    "tunelab.export.cli",
    "tunelab.serve.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunelab",
        description="Fine-tune, evaluate, merge and serve LLMs from your conversation data.",
    )
    from tunelab import __version__

    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in STAGE_CLIS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(subparsers)
    _lend_task_metrics(parser)
    return parser


def _lend_task_metrics(parser: argparse.ArgumentParser) -> None:
    """`tunelab train` with eval_task scores the task during training. The scorer lives
    in evaluate, which train must not import; this file sits above every stage, so it
    hands train the factory (DEVELOPERS.md, "Hooks between stages")."""
    try:
        from tunelab.evaluate.in_training import task_metric_callbacks
    except ModuleNotFoundError:  # evaluate not installed: eval_task then fails with a clear error
        return
    parser.set_defaults(eval_callbacks=task_metric_callbacks)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except TunelabError as exc:
        print(f"error: {exc.message()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tunelab ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
