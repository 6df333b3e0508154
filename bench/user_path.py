"""The user's path: the documented `tunelab train examples/hotel_lora.yaml`, timed from its own log.

The harness (`bench/train_throughput.py`) times tunelab's step function; a user runs the CLI.
This script runs the CLI itself, with the example config unchanged except for where the
model and data are and how many steps to take, and reads real tokens/s from the run's
`trainer_log.jsonl` (which counts training time only: evaluations and saves are excluded).

    # on any machine: the hotel files and the real tokenizers, into bench_data/ (git-ignored)
    python bench/user_path.py prepare
    # on the GPU (one call): a local model folder with the real config and random weights, then the CLI
    python bench/user_path.py run --model qwen2.5-7b --steps 40 --out $OUT/user_path.json

Reported: the mean tokens/s over the log windows after `--skip` steps (compilation happens in
the first ones), the peak memory line the run prints, and the speed line (which levers it took).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "bench_data"
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

TOKENIZERS = {"qwen2.5-7b": "qwen2", "llama3-8b": "llama3", "tiny": "qwen2"}


def prepare(args) -> None:
    """Copy the hotel files and save each real tokenizer as an HF folder (the GPU machine has neither)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import shared_tokenizer

    (DATA / "hotel").mkdir(parents=True, exist_ok=True)
    for name in ("train.jsonl", "test.jsonl"):
        shutil.copy(REPO.parent / "shared/data/hotel" / name, DATA / "hotel" / name)
    for vocab in sorted(set(TOKENIZERS.values())):
        shared_tokenizer(vocab).save_pretrained(DATA / f"tokenizer-{vocab}")
    print(f"hotel data and tokenizers in {DATA}")


def build_model_folder(shape: str, folder: Path) -> None:
    """A local HF folder: the real config of `shape`, random bf16 weights, the real tokenizer."""
    import torch
    from train_throughput import build_model

    model = build_model(shape, "cuda" if torch.cuda.is_available() else "cpu")
    model.save_pretrained(folder)
    del model
    for path in (DATA / f"tokenizer-{TOKENIZERS[shape]}").iterdir():
        shutil.copy(path, folder / path.name)


def run(args) -> None:
    folder = Path(args.model_dir) / args.model
    started = time.perf_counter()
    if not (folder / "config.json").exists():
        build_model_folder(args.model, folder)
    built = time.perf_counter() - started
    run_dir = Path(args.model_dir) / f"run-{args.model}"
    shutil.rmtree(run_dir, ignore_errors=True)
    profiler = ["-m", "cProfile", "-o", args.profile] if args.profile else []  # host time by function
    command = [sys.executable, *profiler, "-m", "tunelab.cli", "train", args.config, f"model_name_or_path={folder}",
               f"dataset={DATA / 'hotel/train.jsonl'}", f"max_steps={args.steps}", f"output_dir={run_dir}",
               *args.overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1")
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log = proc.stderr + proc.stdout
    (Path(args.out).with_suffix(".log") if args.out else Path(os.devnull)).write_text(log)
    rows = [json.loads(line) for line in (run_dir / "trainer_log.jsonl").read_text().splitlines()] \
        if (run_dir / "trainer_log.jsonl").exists() else []
    windows = [r for r in rows if "tokens_per_second" in r and r["step"] > args.skip]
    result = {
        "model": args.model, "config": args.config, "overrides": args.overrides, "steps": args.steps,
        "returncode": proc.returncode, "wall_s": round(wall, 1), "build_s": round(built, 1),
        "tokens_per_second": round(statistics.mean(r["tokens_per_second"] for r in windows), 1) if windows else None,
        "windows": [(r["step"], round(r["tokens_per_second"]), round(r["loss"], 4)) for r in windows],
        "speed_line": next((line for line in log.splitlines() if line.startswith("speed:")), None),
        "done_line": next((line for line in log.splitlines() if line.startswith("done:")), None),  # where the time went
        "memory_lines": [line for line in log.splitlines() if "GPU memory" in line or "out of memory" in line],
        "eval": [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r],
    }
    if proc.returncode:
        result["error_tail"] = log[-3000:]
    print(json.dumps(result, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare")
    r = sub.add_parser("run")
    r.add_argument("--model", default="qwen2.5-7b", choices=sorted(TOKENIZERS))
    r.add_argument("--config", default="examples/hotel_lora.yaml")
    r.add_argument("--steps", type=int, default=40, help="max_steps; -1: the config's epochs (the whole recipe)")
    r.add_argument("--skip", type=int, default=10, help="steps left out of the mean (compilation, warm-up)")
    r.add_argument("--model-dir", default="/tmp/tunelab-bench-models")
    r.add_argument("--out", default=None)
    r.add_argument("--profile", default=None, help="run the CLI under cProfile, its stats to this file "
                   "(`python -m pstats FILE`: where the host's time goes; slows Python-bound runs)")
    r.add_argument("overrides", nargs="*", help="extra key=value for the config (none for the documented run)")
    args = parser.parse_args()
    prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    main()
