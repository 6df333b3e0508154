"""`tunelab sweep` (a parameter study) and `tunelab board` (the web page over the run folders).

This stage sits above every other (it trains, evaluates, estimates and chats), so nothing
imports it; `tunelab report A B` reaches board/compare.py through the top-level CLI.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tunelab.errors import TunelabError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="train a grid (or random sample) of configs and compare them",
        description="Train one run per combination of the swept values, each a normal run folder under one "
                    "sweep folder; ends with a comparison ranked by --metric. Running it again resumes.",
        epilog="examples:\n  tunelab sweep examples/quickstart.yaml learning_rate=2e-4,5e-4 max_steps=10\n"
               "  tunelab sweep cfg.yaml learning_rate=1e-4,2e-4 lora_rank=8,16 --metric eval_slot_f1\n"
               "  tunelab sweep cfg.yaml learning_rate=1e-5:1e-3 lora_dropout=0:0.1 --samples 8 --seed 1\n"
               "  tunelab sweep cfg.yaml 'lora_target=q_proj,v_proj;all-linear'   # list keys: ; between values",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="+", metavar="CONFIG.yaml | key=v1,v2 | key=v",
                   help="an optional YAML config first, then swept (key=v1,v2 or key=lo:hi) and fixed (key=v) values")
    p.add_argument("--samples", type=int, help="random search: train N trials drawn from the grid / ranges")
    p.add_argument("--seed", type=int, default=0, help="seed of the random search (default 0)")
    p.add_argument("--metric", default="eval_loss",
                   help="what ranks the trials: eval_loss (default), eval_perplexity, loss or a task metric "
                        "logged during training such as eval_slot_f1 (higher is better unless it is a loss)")
    p.add_argument("-o", "--output-dir", help="the sweep folder (default: the config's output_dir + '-sweep')")
    p.set_defaults(func=run_sweep)

    b = subparsers.add_parser(
        "board", help="a local web page: runs, live curves, comparisons, examples, chat, launch",
        description="Serve a web page over the run folders under --runs-dir: status, live curves, config diffs, "
                    "metrics, evaluation examples, data preview, memory estimate, chat, and a launch form.")
    b.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    b.add_argument("--port", type=int, default=7860)
    b.add_argument("--token", default=os.environ.get("TUNELAB_BOARD_TOKEN"),
                   help="require this token on every API call (default: $TUNELAB_BOARD_TOKEN); open the page "
                        "as http://HOST:PORT/?token=T")
    b.add_argument("--runs-dir", default="runs", help="the folder holding run and sweep folders (default runs)")
    b.set_defaults(func=run_board)


def run_sweep(args) -> int:
    from tunelab.board.sweep import run_sweep as sweep
    from tunelab.train.cli import split_args

    config, overrides = split_args(args.args)
    return sweep(config, overrides, samples=args.samples, seed=args.seed, metric=args.metric,
                 sweep_dir=Path(args.output_dir) if args.output_dir else None)


def run_board(args) -> int:
    from tunelab.errors import require_extra
    from tunelab.serve.cli import SERVE_MODULES

    require_extra(SERVE_MODULES, "serve", "tunelab board")
    import uvicorn

    from tunelab.board.app import create_app
    from tunelab.serve.server import check_port_free

    if args.host not in LOOPBACK and not args.token:
        raise TunelabError(f"--host {args.host} opens the board (which can start training) to other machines "
                           "without a token", where="--host",
                           fix="add --token SECRET (or $TUNELAB_BOARD_TOKEN), or keep --host 127.0.0.1")
    check_port_free(args.host, args.port)
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    url = f"http://{args.host}:{args.port}/" + (f"?token={args.token}" if args.token else "")
    print(f"tunelab board over {runs_dir.resolve()}: {url}", file=sys.stderr)
    # Bound to this machine: only its own names may reach the page (no DNS rebinding onto it).
    hosts = list(LOOPBACK) if args.host in LOOPBACK else None
    uvicorn.run(create_app(runs_dir, token=args.token, allowed_hosts=hosts), host=args.host, port=args.port,
                log_level="warning")
    return 0


def compare_report(run_dirs: list[str], out_dir: str | None, metric: str) -> int:
    """`tunelab report A B ...` / `tunelab report SWEEP_DIR`, lent to evaluate/cli.py."""
    from tunelab.board.compare import compare_runs, format_ranking
    from tunelab.board.runs import read_sweep, resolve_runs

    runs = resolve_runs([Path(p) for p in run_dirs])
    if len(runs) < 2:
        raise TunelabError(f"{len(runs)} finished or running run(s) to compare in {' '.join(run_dirs)}",
                           where="command line", fix="give two or more run folders, or a sweep folder")
    if out_dir:
        out = Path(out_dir)
    elif len(run_dirs) == 1 and read_sweep(Path(run_dirs[0])) is not None:
        out = Path(run_dirs[0])
    else:
        out = Path(os.path.commonpath([p.resolve() for p in runs])) / "compare"
    summaries, report = compare_runs(runs, out, metric)
    print(format_ranking(summaries, metric, report))
    return 0
