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
    "tunelab.compat",  # `tunelab config convert`
    "tunelab.data.cli",
    "tunelab.train.cli",
    "tunelab.evaluate.cli",
    "tunelab.export.cli",
    "tunelab.serve.cli",
    "tunelab.board.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunelab",
        description="Fine-tune, evaluate, merge and serve LLMs from your conversation data.",
    )
    from tunelab import __version__

    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    parser.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS,
                        help="how much tunelab says on stderr (default info)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors (= --log-level warning)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    completion = subparsers.add_parser("completion", help="print a shell completion script (bash or zsh)",
                                       description="Tab completion of commands and options.",
                                       epilog="bash: eval \"$(tunelab completion bash)\"   (add it to ~/.bashrc)\n"
                                              "zsh:  eval \"$(tunelab completion zsh)\"    (add it to ~/.zshrc)",
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    completion.add_argument("shell", choices=("bash", "zsh"))
    completion.set_defaults(func=lambda args: print(completion_script(parser, args.shell)) or 0)
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


LOG_LEVELS = ("debug", "info", "warning", "error")


def set_log_level(args) -> None:
    """tunelab's notes (config translations, dry runs...) go through `logging` as one
    `tunelab: ...` line each on stderr; --quiet keeps only warnings and errors."""
    import logging

    level = "warning" if args.quiet else args.log_level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tunelab: %(message)s"))
    logger = logging.getLogger("tunelab")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def _words(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Every command path ("", "data", "data check", ...) -> the words that may follow it."""
    out: dict[str, list[str]] = {}

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        words = [o for action in p._actions for o in action.option_strings]
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    words.append(name)
                    walk(sub, f"{path} {name}".strip())
            elif action.choices and not action.option_strings:
                words += [str(c) for c in action.choices]
        out[path] = words
    walk(parser, "")
    return out


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """A bash (or zsh, through bashcompinit) completion function with every command and
    option of this parser written in: nothing runs Python at TAB time."""
    cases = "\n".join(f'        "{path}") words="{" ".join(words)}" ;;' for path, words in _words(parser).items())
    script = f"""_tunelab_complete() {{
    local cur path="" i w words
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        case "$w" in -*) ;; *) case " $(_tunelab_words "${{path:+$path }}$w") " in "  ") ;; *) path="${{path:+$path }}$w" ;; esac ;; esac
    done
    words="$(_tunelab_words "$path")"
    COMPREPLY=($(compgen -W "$words" -f -- "$cur"))
}}
_tunelab_words() {{
    local words=""
    case "$1" in
{cases}
    esac
    echo "$words"
}}
complete -o filenames -F _tunelab_complete tunelab
"""
    if shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    return script


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
    """Commands of early stages need a later stage: `tunelab train` with eval_task scores the
    task during training (and with `reward: TASK` optimises the task's score as a reward,
    stages grpo / ppo), `tunelab data mine-pairs` decodes and scores with a model,
    `tunelab data check/stats --model` loads a tokenizer, `tunelab train chain.yaml` runs
    stages, merges and tabulates (tunelab/chain.py), and `tunelab report A B` compares runs
    (board/compare.py). Their code lives in later stages, which data, train and evaluate must
    not import; this file sits above every stage, so it hands them the entry points
    (DEVELOPERS.md, "Hooks between stages"). Imported only when called: the CLI stays quick to start."""
    def eval_callbacks(cfg):
        from tunelab.evaluate.in_training import task_metric_callbacks

        return task_metric_callbacks(cfg)

    def mine_pairs(args):
        from tunelab.evaluate.mine import run_mine_pairs

        return run_mine_pairs(args)

    def run_chain(path, overrides, callbacks):
        from tunelab.chain import run_chain as run

        return run(path, overrides, callbacks)

    def task_reward(cfg):
        from tunelab.evaluate.tasks import lend_reward

        return lend_reward(cfg)

    def compare_runs(run_dirs, out_dir, metric):
        from tunelab.board.cli import compare_report

        return compare_report(run_dirs, out_dir, metric)

    def load_tokenizer(name_or_path):
        from tunelab.model.loader import load_tokenizer

        return load_tokenizer(name_or_path)

    parser.set_defaults(eval_callbacks=eval_callbacks, mine_pairs=mine_pairs, run_chain=run_chain,
                        task_reward=task_reward, compare_runs=compare_runs, load_tokenizer=load_tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    set_log_level(args)
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
