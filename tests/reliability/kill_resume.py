"""Kill -9 a real `tunelab train` process at random points (mid-save included), resume it
until it finishes, and compare with an uninterrupted run: weights bit-identical, logged
train-loss curve and evaluation rows identical.

    PYTHONPATH=src python tests/reliability/kill_resume.py --kills 15 --seed 0

prints the cases tried / handled (the figures in docs/reliability.md); the test suite runs a
small version of the same function (test_kill_resume.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
QUICKSTART = REPO / "examples" / "data" / "quickstart.jsonl"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def train_args(model_dir: Path, data: Path, out: Path, resume: bool) -> list[str]:
    """The run: 12 steps, a checkpoint every 3, a log row every 2 (so windows span checkpoints)."""
    args = [sys.executable, "-m", "tunelab.cli", "train", f"model_name_or_path={model_dir}", f"dataset={data}",
            "cutoff_len=128", "max_steps=12", "per_device_train_batch_size=2", "gradient_accumulation_steps=2",
            "learning_rate=5e-3", "lora_rank=4", "lora_alpha=8", "lora_dropout=0.1", "logging_steps=2",
            "save_steps=3", "save_total_limit=2", f"output_dir={out}", "report_to=jsonl", "disable_tqdm=true",
            "device=cpu", "val_size=4", "eval_strategy=steps", "eval_steps=4", "plot_loss=false"]
    if resume:
        return args + ["resume_from_checkpoint=latest"]
    # Killed before its first checkpoint: start again, as a user would.
    return args + (["overwrite_output_dir=true"] if out.exists() else [])


def log_rows(run: Path) -> list[dict]:
    path = run / "trainer_log.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def curve(run: Path) -> tuple[list, list]:
    rows = log_rows(run)
    return ([(r["step"], r["loss"], r["grad_norm"], r["learning_rate"]) for r in rows if "loss" in r],
            [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r])


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter_model.safetensors")


def saving(run: Path) -> bool:
    folder = run / "checkpoints"
    return folder.is_dir() and any(p.name.startswith(".checkpoint-") for p in folder.iterdir())


def kill_at_random_point(cmd: list[str], run: Path, rng: random.Random, mid_save: bool) -> str:
    """Start `cmd`, kill -9 it at a random step (or while a checkpoint is being written)."""
    target_rows = rng.randint(1, 6)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if mid_save and saving(run):
            break
        if not mid_save and len(log_rows(run)) >= target_rows:
            time.sleep(rng.uniform(0, 0.5))
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        return "finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "killed mid-save" if mid_save and saving(run) else "killed"


def run_trial(model_dir: Path, data: Path, work: Path, kills: int, seed: int) -> dict:
    """One uninterrupted reference run, then one run killed `kills` times and resumed."""
    rng = random.Random(seed)
    reference, cut = work / "reference", work / "cut"
    subprocess.run(train_args(model_dir, data, reference, False), env=ENV, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    events = []
    for k in range(kills):
        resume = (cut / "checkpoints").is_dir() and any((cut / "checkpoints").glob("checkpoint-*"))
        cmd = train_args(model_dir, data, cut, resume)
        events.append(kill_at_random_point(cmd, cut, rng, mid_save=k % 3 == 2))
    resume = (cut / "checkpoints").is_dir() and any((cut / "checkpoints").glob("checkpoint-*"))
    done = subprocess.run(train_args(model_dir, data, cut, resume), env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        return {"events": events, "identical": False, "error": done.stderr[-2000:]}
    wa, wb = weights(reference), weights(cut)
    same_weights = wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    return {"events": events, "identical": same_weights and curve(reference) == curve(cut),
            "same_weights": same_weights, "same_curve": curve(reference) == curve(cut)}


def tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import shared_tokenizer, tiny_llama

    tokenizer = shared_tokenizer("qwen2")
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def small_data(path: Path) -> Path:
    path.write_text("\n".join(QUICKSTART.read_text(encoding="utf-8").splitlines()[:16]) + "\n", encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="tunelab-kill-"))
    model = tiny_model(work / "model")
    result = run_trial(model, small_data(work / "train.jsonl"), work, args.kills, args.seed)
    killed = [e for e in result["events"] if e.startswith("killed")]
    print(f"kills tried: {len(result['events'])}, landed: {len(killed)} "
          f"({sum(e == 'killed mid-save' for e in killed)} mid-save); "
          f"final run bit-identical weights: {result.get('same_weights')}, identical logged curve and evals: "
          f"{result.get('same_curve')}")
    sys.exit(0 if result["identical"] else 1)


if __name__ == "__main__":
    main()
