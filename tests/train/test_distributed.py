"""Several processes (gloo on CPU, 2 ranks, one torchrun launch) train the one-process math.

The two-process jobs run once per session (`two_process_runs`); the tests compare their logs,
weights and checkpoints against one-process runs with the same global batch.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_worker import INT8_STAND_IN, INTERRUPT, Int8Linear, int8_base, run
from safetensors.torch import load_file
from test_loop import config, losses
from test_streaming import corpus, settings

from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.train import loop
from tunelab.train.distributed import Dist, init_distributed, launcher_env, rank_share
from tunelab.train.runlog import read_log

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
# Global batch 4 either way: one process 2 x 2 accumulation, two processes 2 x 1 each. The fast
# path (padding-free stream, chunked LM head + loss) runs under both engines, as on GPUs.
COMMON = dict(max_steps=4, per_device_train_batch_size=2, lora_dropout=0.0, save_steps=2, eval_steps=2,
              save_total_limit=None, eval_on_start=False, padding_free=True, fused_loss=True)
ONE = dict(COMMON, gradient_accumulation_steps=2)
FULL = dict(finetuning_type="full", learning_rate=1e-3, eval_strategy="no")  # the LoRA runs check validation
TWO = dict(COMMON, gradient_accumulation_steps=1)
# DPO under FSDP2: LoRA scores its reference with the adapter disabled inside the sharded forward; full
# fine-tuning precomputes it (one process: a frozen copy). Logged every 2 steps: sums of several steps
# and their reward metrics are read and all-reduced at once.
DPO = dict(stage="dpo", logging_steps=2, val_size=2, fused_loss=False, padding_free=False)
DPO_FULL = dict(DPO, finetuning_type="full", learning_rate=1e-4)


def pairs_file(folder: Path) -> Path:
    questions = [("What is 2+2?", "4.", "5."), ("Capital of France?", "Paris.", "Rome."),
                 ("Legs of a spider?", "Eight.", "Six."), ("Frozen water?", "Ice.", "Steam.")]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "chosen": c, "rejected": r}) + "\n"
                            for q, c, r in questions * 5), encoding="utf-8")
    return path


def values(tmp_path, model_dir, out, **overrides) -> dict:
    cfg = config(tmp_path, model_dir, out=out, **overrides)
    return {k: v for k, v in cfg.to_dict().items()}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, tiny_model_dir):
    """DDP LoRA, FSDP LoRA, FSDP full (checkpoints at 2 and 4), FSDP full resumed from step 2, FSDP QLoRA,
    and (deepspeed installed) ZeRO-2 / ZeRO-3 LoRA with checkpoints, each resumed from step 2."""
    tmp = tmp_path_factory.mktemp("dist")
    jobs = {
        "ddp_lora": values(tmp, tiny_model_dir, "ddp_lora", **TWO),
        "fsdp_lora": values(tmp, tiny_model_dir, "fsdp_lora", distributed_strategy="fsdp", **TWO),
        "fsdp_full": values(tmp, tiny_model_dir, "fsdp_full", **FULL, **TWO),
    }
    jobs["fsdp_resume"] = dict(jobs["fsdp_full"], output_dir=str(tmp / "fsdp_resume"),
                               resume_from_checkpoint=str(tmp / "fsdp_full/checkpoints/checkpoint-2"))
    # QLoRA: the base's linear layers stored as frozen int8 codes (bitsandbytes needs CUDA; dist_worker.py)
    jobs["fsdp_qlora"] = dict(values(tmp, tiny_model_dir, "fsdp_qlora", distributed_strategy="fsdp", quantization_bit=8,
                                     **TWO), **{INT8_STAND_IN: True})
    pairs = [str(pairs_file(tmp))]
    for name, keys in (("fsdp_dpo_lora", DPO), ("fsdp_dpo_full", DPO_FULL)):
        jobs[name] = values(tmp, tiny_model_dir, name, distributed_strategy="fsdp", dataset=pairs, save_strategy="no",
                            **dict(TWO, **keys))
    if DEEPSPEED:
        for stage in ("zero2", "zero3"):
            # ZeRO-3 keeps the best model, which the threshold makes step 2's: the final adapter is checkpoint-2's.
            best = dict(load_best_model_at_end=True, early_stopping_threshold=1.0) if stage == "zero3" else {}
            jobs[f"ds_{stage}_lora"] = values(tmp, tiny_model_dir, f"ds_{stage}_lora", deepspeed=stage, **best, **TWO)
        # ZeRO-2 resumes from the checkpoint an interrupt wrote, ZeRO-3 from one save_steps wrote.
        jobs["ds_zero2_interrupted"] = dict(jobs["ds_zero2_lora"], output_dir=str(tmp / "ds_zero2_interrupted"),
                                            save_strategy="no", **{INTERRUPT: 2})
        for stage, source in (("zero2", "ds_zero2_interrupted"), ("zero3", "ds_zero3_lora")):
            jobs[f"ds_{stage}_resume"] = dict(jobs[f"ds_{stage}_lora"], output_dir=str(tmp / f"ds_{stage}_resume"),
                                              resume_from_checkpoint=str(tmp / source / "checkpoints/checkpoint-2"))
    # Continued pre-training from a stream: every rank reads it and takes its share of each step.
    jobs["ddp_stream"] = settings(tmp, tiny_model_dir, corpus(tmp / "corpus.jsonl", 40), "ddp_stream").to_dict()
    jobs["ddp_after_deepspeed"] = dict(jobs["ddp_lora"], output_dir=str(tmp / "ddp_after_deepspeed"), max_steps=1,
                                       eval_strategy="no", save_strategy="no")  # accelerate's marks are undone
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


def test_two_processes_share_each_step_of_a_stream(two_process_runs, tmp_path, tiny_model_dir):
    torch.set_num_threads(1)
    runs, tmp = two_process_runs
    single = loop.train(settings(tmp_path, tiny_model_dir, tmp / "corpus.jsonl", "one", gradient_accumulation_steps=2))
    close_losses(runs["ddp_stream"], single.output_dir, steps=[1, 2, 3, 4])


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


def test_no_collective_call_inside_an_optimizer_step(two_process_runs):
    """Every rank computes the global step's weight and micro-batch count on the host; the
    logged sums are all-reduced at logging and checkpoint steps only (dist_worker counts)."""
    _, tmp = two_process_runs
    for rank in (0, 1):
        counts = json.loads((tmp / f"collectives-{rank}.json").read_text())
        assert counts["inside_step"] == []
        assert counts["outside_step"] > 0  # the counting sees tunelab's calls (validation, logging)


@pytest.mark.skipif(not DEEPSPEED, reason="deepspeed is not installed (pip install 'tunelab[deepspeed]')")
def test_deepspeed_zero2_and_zero3_lora_train_the_one_process_math(two_process_runs, tmp_path, tiny_model_dir):
    torch.set_num_threads(1)
    runs, _ = two_process_runs
    single = Path(loop.train(load_config(None, values(tmp_path, tiny_model_dir, "one", save_strategy="no",
                                                      **ONE))).output_dir)
    for name in ("ds_zero2_lora", "ds_zero3_lora"):
        close_losses(runs[name], single)
        assert eval_losses(runs[name]) == pytest.approx(eval_losses(single), abs=2e-4)
    close_weights(runs["ds_zero2_lora"], single, "adapter_model.safetensors")
    # ZeRO-3 gathers the adapter on rank 0, for every checkpoint too; its final one is the best (step 2).
    close_weights(runs["ds_zero3_lora"] / "checkpoints/checkpoint-4", single, "adapter_model.safetensors")


@pytest.mark.skipif(not DEEPSPEED, reason="deepspeed is not installed (pip install 'tunelab[deepspeed]')")
def test_deepspeed_checkpoints_resume_exactly_and_keep_the_best_model(two_process_runs, tmp_path, monkeypatch):
    runs, _ = two_process_runs
    for stage in ("zero2", "zero3"):
        run, resumed = runs[f"ds_{stage}_lora"], runs[f"ds_{stage}_resume"]
        close_losses(resumed, run, steps=[3, 4], tol=1e-6)
        assert eval_losses(resumed)[-1] == pytest.approx(eval_losses(run)[-1], abs=1e-6)
        # No temporary folder is left behind by the atomic publish.
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    close_weights(runs["ds_zero2_resume"], runs["ds_zero2_lora"], "adapter_model.safetensors", atol=1e-6)
    # Ctrl-C during step 2: the step ends and is checkpointed (its log row too, which the resumed run writes).
    interrupted = runs["ds_zero2_interrupted"]
    assert [step for step, _ in losses(interrupted)] == [1] and not (interrupted / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["checkpoint-2"]
    close_losses(runs["ds_zero2_resume"], runs["ds_zero2_lora"], steps=[2, 3, 4], tol=1e-6)
    # load_best_model_at_end: step 2's weights, restored from DeepSpeed's checkpoint (the resumed run's too).
    best = runs["ds_zero3_lora"] / "checkpoints/checkpoint-2"
    for name in ("ds_zero3_lora", "ds_zero3_resume"):
        close_weights(runs[name], best, "adapter_model.safetensors", atol=1e-6)
    last = load_file(runs["ds_zero3_lora"] / "checkpoints/checkpoint-4/adapter_model.safetensors")
    assert any(not torch.allclose(v, load_file(runs["ds_zero3_lora"] / "adapter_model.safetensors")[k], atol=1e-4)
               for k, v in last.items())  # the best is not simply the last

    from tunelab.train.checkpoint import checkpoint_problem, resolve_resume
    from tunelab.train.deepspeed import load_deepspeed_checkpoint

    checkpoint = runs["ds_zero2_lora"] / "checkpoints/checkpoint-4"
    assert resolve_resume(runs["ds_zero2_lora"], "latest") == checkpoint  # DeepSpeed's layout is a checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    (copy / "deepspeed/tunelab.json").unlink()  # a torn copy
    assert "missing deepspeed/tunelab.json" in checkpoint_problem(copy)
    # Another engine cannot read DeepSpeed's partitions, nor DeepSpeed another engine's checkpoint.
    with pytest.raises(TunelabError, match="written by a DeepSpeed run"):
        load_deepspeed_checkpoint(checkpoint, None, None, Dist(strategy="fsdp"))
    with pytest.raises(TunelabError, match="DeepSpeed reads only its own"):
        load_deepspeed_checkpoint(runs["fsdp_full"] / "checkpoints/checkpoint-2", None, None,
                                  Dist(strategy="deepspeed"))
    # ZeRO's partitions are per rank and per stage: another layout is refused before DeepSpeed reads them.
    from types import SimpleNamespace

    from tunelab.train.deepspeed import DeepSpeedObjective

    objective = DeepSpeedObjective(None, None, None)
    objective.engine = SimpleNamespace(zero_optimization_stage=lambda: 3)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    with pytest.raises(TunelabError, match="written by 2 processes under ZeRO-2; this run has 2 under ZeRO-3"):
        objective.load_weights(checkpoint)


def test_fsdp_qlora_trains_the_one_process_math_and_resumes_on_one_process(two_process_runs, tmp_path,
                                                                           tiny_model_dir):
    """QLoRA under FSDP2: the frozen quantized weights stay whole on every rank, the float ones are sharded."""
    torch.set_num_threads(1)
    runs, _ = two_process_runs
    checkpoint = runs["fsdp_qlora"] / "checkpoints/checkpoint-2"
    with int8_base():
        single = Path(run(load_config(None, values(tmp_path, tiny_model_dir, "one", quantization_bit=8,
                                                   **ONE))).output_dir)
        resumed = Path(run(load_config(None, values(tmp_path, tiny_model_dir, "one_resumed", quantization_bit=8,
                                                    resume_from_checkpoint=str(checkpoint), **ONE))).output_dir)
    close_losses(runs["fsdp_qlora"], single)
    assert eval_losses(runs["fsdp_qlora"]) == pytest.approx(eval_losses(single), abs=2e-4)
    close_weights(runs["fsdp_qlora"], single, "adapter_model.safetensors")  # a plain PEFT adapter
    close_losses(resumed, runs["fsdp_qlora"], steps=[3, 4])  # the sharded checkpoint, on one process
    close_weights(resumed, runs["fsdp_qlora"], "adapter_model.safetensors")


def test_fsdp_leaves_out_exactly_the_frozen_quantized_weights(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunelab.train.distributed import quantized_params

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert quantized_params(model) == set()  # a float model: everything is sharded
    layer = model.model.layers[0].mlp
    layer.up_proj = Int8Linear(layer.up_proj)
    layer.down_proj.weight.requires_grad_(False)  # frozen but float: sharded like any weight
    assert quantized_params(model) == {layer.up_proj.weight}


def test_fsdp_computes_in_the_precision_one_gpu_does():
    """bf16 gathers with fp32 reduction for float models; QLoRA's float weights stay fp32 (PEFT's k-bit
    preparation puts them there, and one GPU computes them so): on 2 x H100 bf16 gathers put QLoRA's
    loss curve 0.06 off the 1-GPU one, where LoRA under FSDP2 stayed within 0.005."""
    from tunelab.config import TunelabConfig
    from tunelab.train.distributed import fsdp_precision

    assert fsdp_precision(TunelabConfig(bf16=True), quantized=False) == (torch.bfloat16, torch.float32)
    assert fsdp_precision(TunelabConfig(fp16=True), quantized=False) == (torch.float16, torch.float32)
    assert fsdp_precision(TunelabConfig(bf16=True), quantized=True) == (None, None)
    assert fsdp_precision(TunelabConfig(bf16=False), quantized=False) == (None, None)


def test_dpo_under_fsdp_trains_the_one_process_math(two_process_runs, tmp_path, tiny_model_dir):
    torch.set_num_threads(1)
    runs, tmp = two_process_runs
    pairs = [str(tmp / "pairs.jsonl")]
    for name, keys in (("fsdp_dpo_lora", DPO), ("fsdp_dpo_full", DPO_FULL)):
        single = Path(run(load_config(None, values(tmp_path, tiny_model_dir, name, dataset=pairs, save_strategy="no",
                                                   **dict(ONE, **keys)))).output_dir)
        close_losses(runs[name], single)
        got, want = (read_log(run / "trainer_log.jsonl") for run in (runs[name], single))
        for key in ("rewards/margins", "rewards/accuracies", "eval_loss"):
            assert [r[key] for r in got if key in r] == pytest.approx([r[key] for r in want if key in r], abs=2e-4)


# --- launch and data split (no processes started) --------------------------------------------

def test_every_rank_computes_the_global_step_totals_on_the_host():
    """step_totals equals what each rank would count on its own share, summed (weight, tokens)
    and maxed (micro-batches) over ranks: the all-reduces it replaces."""
    import random
    from types import SimpleNamespace

    from tunelab.data.collate import IGNORE_INDEX, Sample, split_by_tokens
    from tunelab.train.distributed import RowTotals, step_totals
    from tunelab.train.objectives.sft import SFTObjective

    rng = random.Random(0)
    rows = []
    for _ in range(11):
        n = rng.randint(3, 30)
        prompt = rng.randint(1, n - 1)
        rows.append(Sample(list(range(1, n + 1)), [IGNORE_INDEX] * prompt + list(range(prompt, n))))
    objective = SFTObjective(load_config(None, {}), SimpleNamespace(pad_token_id=0, eos_token_id=0))
    lengths = [len(r) for r in rows]
    splits = {"as batched": lambda share: share,
              "by 40 tokens": lambda share: split_by_tokens([i for ids in share for i in ids], lengths, 40, True)}
    for world in (1, 2, 3):
        for step_ids in ([[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10]], [[3, 7]], [[10]]):
            for name, split in splits.items():
                per_rank = [[objective.collate([rows[i] for i in ids]) for ids in split(rank_share(step_ids, r, world))]
                            for r in range(world)]
                want = (sum(objective.weight(b) for batches in per_rank for b in batches),
                        sum(int(b["attention_mask"].sum()) for batches in per_rank for b in batches),
                        max(len(batches) for batches in per_rank))
                got = step_totals(step_ids, world, split, RowTotals(objective, rows))
                assert (got.weight, got.real_tokens, got.passes) == want, (world, step_ids, name)


def test_logged_sums_are_read_once_and_a_non_finite_loss_names_its_step(tmp_path):
    from tunelab.train.loop import _settle_window, new_window
    from tunelab.train.step import StepStats, settle_steps

    def step(losses, accuracy):
        return StepStats([torch.tensor(v) for v in losses], {"acc": [torch.tensor(accuracy)], "n": [1.0]},
                         weight=4, real_tokens=9, grad_norm=torch.tensor(0.5))

    steps = [step([0.1, 0.2], 1.0), step([0.3], 0.0)]
    settled = settle_steps(steps, "cpu")
    assert settled[0][0] == float(torch.tensor(0.1)) + float(torch.tensor(0.2))  # float64 sums, in order
    assert settled[1] == (float(torch.tensor(0.3)), {"acc": 0.0, "n": 1.0}, 0.5)
    window, pending = new_window(), [(7, steps[0]), (8, step([float("nan")], 0.0)), (9, steps[1])]
    with pytest.raises(TunelabError, match="loss became nan at step 8"):
        _settle_window(window, pending, "cpu", loop.SINGLE, tmp_path)


def test_rank_share_keeps_the_global_order_and_balances_ranks():
    step = [[5, 1], [7, 3], [0, 2], [6, 4]]
    assert rank_share(step, 0, 2) == [[5, 1], [7, 3]] and rank_share(step, 1, 2) == [[0, 2], [6, 4]]
    assert rank_share(step, 0, 1) == step
    short = [[5, 1], [7]]  # the epoch's last step: 3 samples on 2 ranks
    shares = [rank_share(short, r, 2) for r in range(2)]
    assert shares == [[[5, 1]], [[7]]]
    assert rank_share([[9]], 1, 2) == []  # nothing left for rank 1: it pads with a zero-weight pass


def test_rank_share_by_tokens_gives_ranks_equal_work():
    """Padding-free steps are dealt by tokens: equal sample counts of mixed lengths left one
    rank with most of the tokens while the other waited."""
    lengths = [3000, 2900, 100, 120, 90, 80, 2800, 110]
    step = [[0, 1, 2, 3], [4, 5, 6, 7]]  # by count: rank 0 holds 6,120 tokens, rank 1 3,080
    shares = [rank_share(step, r, 2, lengths) for r in range(2)]
    assert sorted(i for share in shares for ids in share for i in ids) == list(range(8))  # each sample once
    tokens = [sum(lengths[i] for ids in share for i in ids) for share in shares]
    assert max(tokens) - min(tokens) <= max(lengths)  # within one sample of equal
    assert max(tokens) < 6120 and all(len(share) == 1 for share in shares)  # one pass each, as the step had
    per_pass = [rank_share([[0, 1], [2, 3], [4, 5], [6, 7]], r, 2, lengths) for r in range(2)]
    assert all(len(share) == 2 for share in per_pass)  # accumulation kept: two passes a rank
    assert rank_share([[9]], 1, 2, [5] * 10) == []  # a short last step still leaves a rank empty


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
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate config'd for DeepSpeed, no key in ours
    with pytest.raises(TunelabError, match="no deepspeed key"):
        init_distributed(load_config(None, {}))


def test_deepspeed_key_becomes_a_deepspeed_config_or_a_clear_refusal(monkeypatch, tmp_path):
    import importlib.util

    from tunelab.train.deepspeed import ds_config

    made = ds_config(load_config(None, {"deepspeed": "zero3", "per_device_train_batch_size": 4, "max_grad_norm": 0.5,
                                        "bf16": True}))
    assert made["zero_optimization"]["stage"] == 3 and made["train_micro_batch_size_per_gpu"] == 4
    assert made["gradient_clipping"] == 0.5 and made["bf16"] == {"enabled": True} and made["fp16"] == {"enabled": False}
    assert made["gradient_accumulation_steps"] == 1  # the loop marks each step's boundary itself
    user = tmp_path / "ds.json"  # a LLaMA-Factory-style file: its own settings kept, "auto" filled
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto",
                                                      "offload_optimizer": {"device": "cpu"}},
                                "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 2.0,
                                "bf16": {"enabled": "auto"}, "train_batch_size": "auto"}))
    made = ds_config(load_config(None, {"deepspeed": str(user), "per_device_train_batch_size": 3}))
    assert made["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert made["train_micro_batch_size_per_gpu"] == 3 and made["gradient_clipping"] == 2.0
    assert "train_batch_size" not in made
    for content, message in ((json.dumps({"zero_optimization": {"stage": 1}}), "stage 1"),
                             (json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {}}), "its own optimizer"),
                             (json.dumps({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 8}),
                              "gradient_accumulation_steps=8"),
                             ("{not json", "not valid JSON")):
        user.write_text(content)
        with pytest.raises(TunelabError, match=message):
            ds_config(load_config(None, {"deepspeed": str(user)}))
    with pytest.raises(TunelabError, match="neither zero2"):
        ds_config(load_config(None, {"deepspeed": "zero4"}))

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(TunelabError, match="one process"):  # the key is never silently ignored
        init_distributed(load_config(None, {"deepspeed": "zero2"}))
    for var, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    real_find_spec = importlib.util.find_spec
    # The refusals below hold whether or not deepspeed is installed here (it is an extra): say it is.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed"
                        else real_find_spec(name, *a))
    for keys, message in (({"distributed_strategy": "fsdp"}, "two engines"), ({"quantization_bit": 4}, "QLoRA")):
        with pytest.raises(TunelabError, match=message):
            init_distributed(load_config(None, {"deepspeed": "zero2", **keys}))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed"
                        else real_find_spec(name, *a))
    with pytest.raises(TunelabError, match="pip install 'tunelab\\[deepspeed\\]'"):
        init_distributed(load_config(None, {"deepspeed": "zero2"}))


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
