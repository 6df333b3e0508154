"""Several processes (gloo on CPU, 2 ranks, one torchrun launch) train the one-process math.

The two-process jobs run once per session (`two_process_runs`); the tests compare their logs,
weights and checkpoints against one-process runs with the same global batch.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_loop import config, losses

from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.train import loop
from tunelab.train.distributed import init_distributed, launcher_env, rank_share
from tunelab.train.runlog import read_log

REPO = Path(__file__).resolve().parents[2]
# Global batch 4 either way: one process 2 x 2 accumulation, two processes 2 x 1 each. The fast
# path (padding-free stream, chunked LM head + loss) runs under both engines, as on GPUs.
COMMON = dict(max_steps=4, per_device_train_batch_size=2, lora_dropout=0.0, save_steps=2, eval_steps=2,
              save_total_limit=None, eval_on_start=False, padding_free=True, fused_loss=True)
ONE = dict(COMMON, gradient_accumulation_steps=2)
FULL = dict(finetuning_type="full", learning_rate=1e-3, eval_strategy="no")  # the LoRA runs check validation
TWO = dict(COMMON, gradient_accumulation_steps=1)


def values(tmp_path, model_dir, out, **overrides) -> dict:
    cfg = config(tmp_path, model_dir, out=out, **overrides)
    return {k: v for k, v in cfg.to_dict().items()}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, tiny_model_dir):
    """DDP LoRA, FSDP LoRA, FSDP full (checkpoints at 2 and 4), FSDP full resumed from step 2."""
    tmp = tmp_path_factory.mktemp("dist")
    jobs = {
        "ddp_lora": values(tmp, tiny_model_dir, "ddp_lora", **TWO),
        "fsdp_lora": values(tmp, tiny_model_dir, "fsdp_lora", distributed_strategy="fsdp", **TWO),
        "fsdp_full": values(tmp, tiny_model_dir, "fsdp_full", **FULL, **TWO),
    }
    jobs["fsdp_resume"] = dict(jobs["fsdp_full"], output_dir=str(tmp / "fsdp_resume"),
                               resume_from_checkpoint=str(tmp / "fsdp_full/checkpoints/checkpoint-2"))
    jobs_file = tmp / "jobs.json"
    jobs_file.write_text(json.dumps(list(jobs.values())))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(REPO / "tests/train/dist_worker.py"), str(jobs_file)],
                          env=env, capture_output=True, text=True, timeout=300)
    # The first rank that failed says why; the other ranks' tracebacks only say a peer went away.
    first_error = next((line for line in proc.stderr.splitlines() if "Error" in line and "rank" in line), "")
    assert proc.returncode == 0, first_error + "\n" + proc.stderr[-4000:]
    return {name: Path(job["output_dir"]) for name, job in jobs.items()}, tmp


def close_losses(a: Path, b: Path, steps=None, tol=2e-4) -> None:
    got, want = dict(losses(a)), dict(losses(b))
    steps = steps or sorted(want)
    assert steps and all(abs(got[s] - want[s]) < tol for s in steps), (got, want)


def eval_losses(run: Path) -> list[float]:
    return [r["eval_loss"] for r in read_log(run / "trainer_log.jsonl") if "eval_loss" in r]


def close_weights(a: Path, b: Path, name: str, atol=1e-4) -> None:
    got, want = load_file(a / name), load_file(b / name)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], atol=atol), key


def test_ddp_and_fsdp_lora_train_the_one_process_math(two_process_runs, tmp_path, tiny_model_dir):
    torch.set_num_threads(1)
    runs, _ = two_process_runs
    single = Path(loop.train(load_config(None, values(tmp_path, tiny_model_dir, "one", **ONE))).output_dir)
    for name in ("ddp_lora", "fsdp_lora"):
        close_losses(runs[name], single)
        # Validation is split across the ranks and summed: the same numbers as one process.
        assert eval_losses(runs[name]) == pytest.approx(eval_losses(single), abs=2e-4)
        # The consolidated adapter is a plain PEFT folder, as a one-process run writes it.
        close_weights(runs[name], single, "adapter_model.safetensors")
        assert (runs[name] / "checkpoints/checkpoint-2/adapter_model.safetensors").exists()
    assert (runs["ddp_lora"] / "checkpoints/checkpoint-2/trainable.safetensors").exists()  # rank 0's checkpoint
    assert (runs["fsdp_lora"] / "checkpoints/checkpoint-2/dcp").is_dir()  # sharded


def test_fsdp_full_matches_one_process_and_loads_on_one_device(two_process_runs, tmp_path, tiny_model_dir):
    torch.set_num_threads(1)
    runs, _ = two_process_runs
    single = Path(loop.train(load_config(None, values(tmp_path, tiny_model_dir, "one", **FULL, **ONE))).output_dir)
    close_losses(runs["fsdp_full"], single)
    close_weights(runs["fsdp_full"], single, "model.safetensors")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs["fsdp_full"])  # what merge / eval / serve do
    assert model.config.num_hidden_layers == 2
    # No temporary folder is left behind by the atomic publish.
    assert sorted(p.name for p in (runs["fsdp_full"] / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_sharded_resume_equals_the_uninterrupted_run(two_process_runs):
    runs, _ = two_process_runs
    close_losses(runs["fsdp_resume"], runs["fsdp_full"], steps=[3, 4], tol=1e-6)
    close_weights(runs["fsdp_resume"], runs["fsdp_full"], "model.safetensors", atol=1e-6)


def test_one_process_resumes_a_two_process_checkpoint(two_process_runs, tmp_path, tiny_model_dir):
    torch.set_num_threads(1)
    runs, tmp = two_process_runs
    checkpoint = runs["fsdp_full"] / "checkpoints/checkpoint-2"
    cfg = load_config(None, values(tmp_path, tiny_model_dir, "one_resumed", resume_from_checkpoint=str(checkpoint),
                                   **FULL, **ONE))
    run = Path(loop.train(cfg).output_dir)
    close_losses(run, runs["fsdp_full"], steps=[3, 4])
    close_weights(run, runs["fsdp_full"], "model.safetensors")


# --- launch and data split (no processes started) --------------------------------------------

def test_rank_share_keeps_the_global_order_and_balances_ranks():
    step = [[5, 1], [7, 3], [0, 2], [6, 4]]
    assert rank_share(step, 0, 2) == [[5, 1], [7, 3]] and rank_share(step, 1, 2) == [[0, 2], [6, 4]]
    assert rank_share(step, 0, 1) == step
    short = [[5, 1], [7]]  # the epoch's last step: 3 samples on 2 ranks
    shares = [rank_share(short, r, 2) for r in range(2)]
    assert shares == [[[5, 1]], [[7]]]
    assert rank_share([[9]], 1, 2) == []  # nothing left for rank 1: it pads with a zero-weight pass


def test_foreign_or_broken_launchers_fail_at_once(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(TunelabError, match="srun"):
        launcher_env()
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TunelabError, match="RANK"):
        launcher_env()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(TunelabError, match="DeepSpeed"):
        launcher_env()


def test_settings_one_process_cannot_honour_are_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(TunelabError, match="fsdp_cpu_offload"):
        init_distributed(load_config(None, {"fsdp_cpu_offload": True}))
    with pytest.raises(TunelabError, match="not started by a launcher"):  # loop.train called directly
        init_distributed(load_config(None, {"nproc_per_node": 2}))


def test_nproc_reexecutes_through_torchrun_with_the_rendezvous_flags(monkeypatch, tmp_path):
    import subprocess

    from tunelab.cli import main

    started = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda command: started.append(command) or subprocess.CompletedProcess(
        command, 0))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("lora_rank: 4\n")
    assert main(["train", str(cfg), "max_steps=3", "--nproc", "2", "--nnodes", "2", "--node-rank", "1",
                 "--rdzv-endpoint", "host:29400"]) == 0
    assert started == [[sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=2",
                        "--node-rank=1", "--rdzv-endpoint=host:29400", "-m", "tunelab.cli", "train", str(cfg),
                        "max_steps=3", "nproc_per_node=2"]]
    started.clear()
    assert main(["train", str(cfg), "nproc_per_node=4"]) == 0  # the config key alone, one node
    assert started[0][3:5] == ["--nproc-per-node=4", "--standalone"]


# --- the real launch lines, end to end (slow: a launcher and two fresh processes each) ---------

@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["tunelab --nproc", "accelerate launch --use_fsdp"])
def test_launch_lines_train_one_run_on_two_processes(launcher, tmp_path, tiny_model_dir):
    import yaml

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(values(tmp_path, tiny_model_dir, "run", max_steps=2, eval_strategy="no",
                                         save_strategy="no", **{k: v for k, v in TWO.items() if k != "max_steps"})))
    if launcher.startswith("tunelab"):
        command = [sys.executable, "-m", "tunelab.cli", "train", str(cfg), "--nproc", "2"]
    else:  # accelerate's --multi_gpu / --use_fsdp run torchrun underneath, on CPU too
        command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--use_fsdp", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", "tunelab.cli", "train", str(cfg)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert "x 2 processes (" + ("fsdp" if "fsdp" in launcher else "ddp") + ")" in proc.stderr
    assert [step for step, _ in losses(run)] == [1, 2]  # one log, written once
    assert (run / "adapter_model.safetensors").exists()
