"""`tunelab` command line: one subcommand per pipeline stage.

Each stage package owns its subcommands in its own `cli.py` (a `register(subparsers)`
function), so a reader finds `tunelab eval` under `tunelab/evaluate/cli.py`. This file
only wires them together and turns user errors into clean messages.
"""

from __future__ import annotations

import argparse
import errno
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
    _lend_later_stages(parser)
    return parser


def os_error(exc: OSError) -> TunelabError:
    """What the operating system refused, where, and the usual fix."""
    fixes = {errno.EACCES: "check the file's permissions (ls -l), or run as a user who may read/write it",
             errno.EPERM: "check the file's permissions (ls -l)",
             errno.EROFS: "the folder is on a read-only file system: write the output somewhere else",
             errno.ENOSPC: "free disk space or write the output to another disk; files already written "
                           "are intact (outputs are replaced only when complete)",
             errno.EDQUOT: "your disk quota is used up: free space or write elsewhere",
             errno.ENOENT: "check the path",
             errno.EISDIR: "give a file, not a folder",
             errno.ENOTDIR: "a part of the path is a file, not a folder"}
    where = exc.filename if exc.filename is not None else None
    return TunelabError(exc.strerror or str(exc), where=str(where) if where else None,
                        fix=fixes.get(exc.errno, "check the path, its permissions and the free disk space"))


def _lend_later_stages(parser: argparse.ArgumentParser) -> None:
    """Commands of early stages that need a later stage: `tunelab train` with eval_task
    scores the task during training, `tunelab data mine-pairs` decodes and scores with a
    model, and `tunelab data check/stats --model` loads a tokenizer. Their code lives in
    model and evaluate, which data and train must not import; this file sits above every
    stage, so it hands them the entry points (DEVELOPERS.md, "Hooks between stages").
    Imported only when called: the CLI stays quick to start."""
    def eval_callbacks(cfg):
        from tunelab.evaluate.in_training import task_metric_callbacks

        return task_metric_callbacks(cfg)

    def mine_pairs(args):
        from tunelab.evaluate.mine import run_mine_pairs

        return run_mine_pairs(args)

    def load_tokenizer(name_or_path):
        from tunelab.model.loader import load_tokenizer

        return load_tokenizer(name_or_path)

    parser.set_defaults(eval_callbacks=eval_callbacks, mine_pairs=mine_pairs, load_tokenizer=load_tokenizer)


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
    except OSError as exc:  # unreadable input, read-only folder, full disk: one line, not a traceback
        print(f"error: {os_error(exc).message()}", file=sys.stderr)
        return 2
    except Exception as exc:  # last: out of GPU memory outside a training step (loading, evaluation, generation)
        if type(exc).__name__ != "OutOfMemoryError":
            raise
        from tunelab.train.memory import out_of_memory_message

        print(f"error: {out_of_memory_message(exc).message()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
