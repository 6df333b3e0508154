"""The training recipe, top to bottom.

    config -> tokenizer + samples -> model (+ LoRA) -> optimizer + schedule
           -> for each optimizer step: accumulate micro-batches, clip, step, log
              every eval_steps: validation loss; best model; early stopping
              every save_steps: atomic checkpoint (exact resume)
           -> final weights, tokenizer, config, logs, loss plot

No Trainer subclasses: everything the loop does is on this page or one call away.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunelab.config import TunelabConfig, save_config
from tunelab.data.collate import batch_order
from tunelab.errors import TunelabError
from tunelab.train.checkpoint import (
    TrainerState, checkpoint_path, load_checkpoint, load_trainable_state, resolve_resume, rotate_checkpoints,
    save_checkpoint,
)
from tunelab.train.objective import SFTObjective
from tunelab.train.tracking import Tracker, plot_loss


@dataclass
class RunResult:
    output_dir: Path
    global_step: int
    train_loss: float | None  # mean loss over the last logging window
    eval_loss: float | None  # last validation loss
    best_metric: float | None
    stopped_early: bool = False


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TunelabConfig, objective_factory=None, eval_callbacks=()) -> RunResult:
    """Run one fine-tuning job as the config says.

    `objective_factory(cfg, tokenizer)` builds the stage's objective (see objective.py);
    the default is next-token loss on the target turns (SFT / pt). Each of `eval_callbacks`
    is called at every evaluation as `callback(model, tokenizer, step) -> {name: value}`;
    its values are logged as `eval_NAME` and can be `metric_for_best_model` (the task
    metrics of `eval_task` come this way, from the evaluate stage: see DEVELOPERS.md).
    """
    if cfg.eval_task and not eval_callbacks:
        raise TunelabError(f"eval_task={cfg.eval_task} but no task-metric callback was given", where="config",
                           fix="run `tunelab train`, or pass eval_callbacks=[TaskMetrics(cfg)] "
                               "(tunelab.evaluate.in_training) to train()")
    from tunelab.model.adapters import count_parameters, prepare_for_training
    from tunelab.model.loader import load_model, load_tokenizer, resolve_device

    run_dir = Path(cfg.output_dir)
    resume_path = resolve_resume(run_dir, cfg.resume_from_checkpoint)
    prepare_run_dir(run_dir, cfg, resuming=resume_path is not None)
    set_seed(cfg.seed)

    # 1. Data: read, split, render with the chat template, mask everything but the answers.
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    objective = (objective_factory or SFTObjective)(cfg, tokenizer)
    train_rows, eval_rows = objective.load_data()

    # 2. Model: base weights, then LoRA / freeze / full.
    device = resolve_device(cfg.device)
    model = load_model(cfg.model_name_or_path, dtype=_load_dtype(cfg), device=device,
                       quantization_bit=cfg.quantization_bit,
                       gradient_checkpointing=cfg.gradient_checkpointing)
    model = prepare_for_training(model, cfg)
    objective.setup(model, device)
    trainable, total = count_parameters(model)
    print(f"trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.3f}%) on {device}",
          file=sys.stderr)

    # 3. Optimizer and schedule.
    micro_per_epoch = math.ceil(len(train_rows) / cfg.per_device_train_batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    scaler = torch.amp.GradScaler(device.type) if cfg.fp16 else None

    state = TrainerState()
    if resume_path is not None:
        state = load_checkpoint(resume_path, model, optimizer, scheduler)
        print(f"resumed from {resume_path} at step {state.global_step}", file=sys.stderr)
    save_config(cfg, run_dir / "config.yaml")

    tracker = Tracker(run_dir, cfg.report_to, total_steps, state.global_step, cfg.disable_tqdm)
    window = new_window()
    last_eval, last_eval_step = None, None
    stopped_early = False

    def checkpoint() -> Path:
        # LoRA checkpoints also hold the PEFT adapter, so any of them can be evaluated as is.
        extra = (lambda folder: _save_weights(model, tokenizer, folder)) if cfg.finetuning_type == "lora" else None
        path = save_checkpoint(run_dir, model, optimizer, scheduler, state, extra_save=extra)
        rotate_checkpoints(run_dir, cfg.save_total_limit, keep=state.best_checkpoint)
        return path

    def evaluate_and_track() -> bool:
        """Validation loss; best-model bookkeeping; returns True when early stopping triggers."""
        nonlocal last_eval, last_eval_step
        eval_loss, eval_metrics = evaluate(model, objective, eval_rows, cfg, device)
        last_eval, last_eval_step = eval_loss, state.global_step
        row = {"step": state.global_step, "epoch": round(_epoch_float(state, micro_per_epoch), 4),
               "eval_loss": eval_loss}
        if cfg.stage in ("sft", "pt"):
            row["eval_perplexity"] = _perplexity(eval_loss)
        row |= {f"eval_{k}": v for k, v in eval_metrics.items()}
        for callback in eval_callbacks:
            row |= {f"eval_{k}": v for k, v in callback(model, tokenizer, state.global_step).items()}
        tracker.log(row)
        value = _best_metric_value(row, cfg.metric_for_best_model)
        if _improves(value, state.best_metric, cfg):
            state.best_metric = value
            state.evals_without_improvement = 0
            if cfg.load_best_model_at_end:
                # Named before saving, so the checkpoint's own state already knows it is the best.
                state.best_checkpoint = str(checkpoint_path(run_dir, state.global_step))
                checkpoint()
        else:
            state.evals_without_improvement += 1
        patience = cfg.early_stopping_patience
        return patience is not None and state.evals_without_improvement >= patience

    try:
        if cfg.eval_strategy != "no" and cfg.eval_on_start and state.global_step == 0:
            evaluate_and_track()  # the untuned model's validation loss: what training must beat
        model.train()
        while state.global_step < total_steps and not stopped_early:
            order = batch_order([len(r) for r in train_rows], cfg.per_device_train_batch_size, cfg.seed,
                                state.epoch, group_by_length=cfg.group_by_length and not cfg.packing)
            while state.batch_in_epoch < len(order) and state.global_step < total_steps:
                # One optimizer step = up to gradient_accumulation_steps micro-batches.
                step_ids = order[state.batch_in_epoch:state.batch_in_epoch + cfg.gradient_accumulation_steps]
                micro_batches = [objective.collate([train_rows[i] for i in ids]) for ids in step_ids]
                with _ctrl_c_after_step():  # weights and counters must agree in the checkpoint Ctrl-C writes
                    step = optimizer_step(model, objective, micro_batches, optimizer, scheduler, scaler, cfg, device)
                    state.global_step += 1
                    state.batch_in_epoch += len(step_ids)
                    state.tokens_seen += step.real_tokens
                window["loss_sum"] += step.loss_sum
                window["real_tokens"] += step.real_tokens
                for key, value in step.metrics.items():
                    window["metrics"][key] = window["metrics"].get(key, 0.0) + value
                window["weight"] += step.weight
                window["grad_norms"].append(step.grad_norm)
                tracker.advance()

                if not math.isfinite(window["loss_sum"]):
                    raise TunelabError(f"the loss became {window['loss_sum']} at step {state.global_step}",
                                       where=str(run_dir),
                                       fix="lower learning_rate, use bf16 instead of fp16, or check max_grad_norm")
                if state.global_step % cfg.logging_steps == 0 or state.global_step == total_steps:
                    _log_window(tracker, window, state, scheduler, micro_per_epoch)
                if cfg.eval_strategy == "steps" and state.global_step % cfg.eval_steps == 0:
                    stopped_early = evaluate_and_track()
                    model.train()
                if cfg.save_strategy == "steps" and state.global_step % cfg.save_steps == 0:
                    checkpoint()
                if stopped_early:
                    break
            if state.batch_in_epoch >= len(order):  # epoch finished
                if cfg.eval_strategy == "epoch" and not stopped_early:
                    stopped_early = evaluate_and_track()
                    model.train()
                state.epoch += 1
                state.batch_in_epoch = 0
                if cfg.save_strategy == "epoch":
                    checkpoint()
        if stopped_early:
            tracker.bar.write(f"early stopping at step {state.global_step}: no improvement of "
                              f"{cfg.metric_for_best_model} in {cfg.early_stopping_patience} evaluations "
                              f"(best {state.best_metric:.4f})")
        elif cfg.eval_strategy != "no" and last_eval_step != state.global_step:
            evaluate_and_track()  # the final model is always evaluated
    except KeyboardInterrupt:
        path = checkpoint()
        plot_loss(run_dir)
        print(f"\ninterrupted: checkpoint saved to {path}; continue with resume_from_checkpoint=latest",
              file=sys.stderr)
        raise
    finally:
        tracker.close()

    # 4. Final weights: the best checkpoint's if asked, else the last step's.
    if cfg.load_best_model_at_end and state.best_checkpoint:
        from safetensors.torch import load_file

        load_trainable_state(model, load_file(Path(state.best_checkpoint) / "trainable.safetensors"))
        print(f"loaded the best model ({cfg.metric_for_best_model}={state.best_metric:.4f}) from "
              f"{state.best_checkpoint}", file=sys.stderr)
    _save_weights(model, tokenizer, run_dir)
    if cfg.plot_loss:
        plot_loss(run_dir)
    train_losses = [r["loss"] for r in state.log_history if "loss" in r]
    print(f"done: {state.global_step} steps; weights, tokenizer, config and logs in {run_dir}", file=sys.stderr)
    return RunResult(run_dir, state.global_step, train_losses[-1] if train_losses else None, last_eval,
                     state.best_metric, stopped_early)


# --- pieces of the recipe ---------------------------------------------------------------

@contextlib.contextmanager
def _ctrl_c_after_step():
    """Hold Ctrl-C until the optimizer step and the step counters are both done.

    An interrupt between `optimizer.step()` and `global_step += 1` would save updated
    weights under the old step number, and the resumed run would repeat a step.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


def prepare_run_dir(run_dir: Path, cfg: TunelabConfig, resuming: bool) -> None:
    """Refuse to mix a new run into an old one's folder unless told to."""
    previous = run_dir.is_dir() and any((run_dir / n).exists() for n in ("trainer_log.jsonl", "checkpoints"))
    if previous and not resuming:
        if not cfg.overwrite_output_dir:
            raise TunelabError(f"output_dir {run_dir} already holds a run", where="config",
                               fix="continue it with resume_from_checkpoint=latest, start over with "
                                   "overwrite_output_dir=true, or pick another output_dir")
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def _load_dtype(cfg: TunelabConfig) -> str:
    # bf16 weights with fp32 trainable params; fp16 keeps fp32 master weights (GradScaler).
    return "bfloat16" if cfg.bf16 else "float32"


def _best_metric_value(row: dict, name: str) -> float:
    key = name if name.startswith("eval_") else f"eval_{name}"
    if key not in row:
        raise TunelabError(f"metric_for_best_model={name} is not among the evaluation metrics "
                           f"({', '.join(k for k in row if k.startswith('eval_'))})", where="config",
                           fix="use metric_for_best_model=eval_loss, or set eval_task (hotel, generic) "
                               "for task metrics such as slot_f1 or bleu4")
    return row[key]


def _improves(value: float, best: float | None, cfg: TunelabConfig) -> bool:
    """Lower is better for losses and perplexities, higher for everything else (accuracies)."""
    if best is None:
        return True
    lower_is_better = "loss" in cfg.metric_for_best_model or "perplexity" in cfg.metric_for_best_model
    margin = cfg.early_stopping_threshold
    return value < best - margin if lower_is_better else value > best + margin


@dataclass
class StepStats:
    loss_sum: float  # summed loss of the step's target tokens (or pairs)
    weight: int  # what the loss is averaged over
    real_tokens: int  # non-pad tokens
    grad_norm: float
    metrics: dict


def optimizer_step(model, objective, micro_batches: list[dict], optimizer, scheduler, scaler,
                   cfg: TunelabConfig, device) -> StepStats:
    """One optimizer step: accumulate the micro-batches' gradients, clip, step, schedule.

    A function of its own so benchmarks time exactly the code the trainer runs.
    """
    step_weight = sum(objective.weight(b) for b in micro_batches)
    loss_total, real_tokens, metrics = 0.0, 0, {}
    for batch in micro_batches:
        batch = _to_device(batch, device)
        with _autocast(cfg, device):
            loss_sum, batch_metrics = objective.loss(model, batch)
        # Divide by the weight of the whole step: the loss one big batch would give.
        loss = loss_sum / max(step_weight, 1)
        (scaler.scale(loss) if scaler else loss).backward()
        loss_total += float(loss_sum.detach())
        real_tokens += int(batch["attention_mask"].sum())
        for key, value in batch_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + value
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad],
        cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss_total, step_weight, real_tokens, float(grad_norm), metrics)


def build_optimizer(model, cfg: TunelabConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (as transformers does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, fused=device.type == "cuda")


def build_scheduler(optimizer, cfg: TunelabConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


@torch.no_grad()
def evaluate(model, objective, rows: list, cfg: TunelabConfig, device) -> tuple[float, dict[str, float]]:
    """Mean validation loss (per token for SFT, per pair for preferences) and mean metrics."""
    model.eval()
    total, weight, metrics = 0.0, 0, {}
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths: little padding
    for start in range(0, len(order), cfg.per_device_eval_batch_size):
        batch = objective.collate([rows[i] for i in order[start:start + cfg.per_device_eval_batch_size]])
        weight += objective.weight(batch)
        with _autocast(cfg, device):
            loss_sum, batch_metrics = objective.loss(model, _to_device(batch, device))
        total += float(loss_sum)
        for key, value in batch_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + value
    weight = max(weight, 1)
    return total / weight, average_metrics(metrics, weight)


def average_metrics(sums: dict[str, float], weight: float) -> dict[str, float]:
    """Mean of each summed metric over the step weight. A metric `group/name` for which the
    objective also reports `count/name` averages over that count instead (KTO's chosen
    rewards average over its desirable examples only); counts are not logged themselves."""
    out = {}
    for key, value in sums.items():
        if key.startswith("count/"):
            continue
        count = sums.get(f"count/{key.rsplit('/', 1)[-1]}", weight) if "/" in key else weight
        if count > 0:
            out[key] = value / count
    return out


def _autocast(cfg: TunelabConfig, device: torch.device):
    if cfg.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if cfg.fp16:
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _epoch_float(state: TrainerState, micro_per_epoch: int) -> float:
    return state.epoch + state.batch_in_epoch / max(micro_per_epoch, 1)


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def new_window() -> dict:
    """Running sums between two log lines."""
    return {"loss_sum": 0.0, "weight": 0, "real_tokens": 0, "time": time.perf_counter(), "grad_norms": [],
            "metrics": {}}


def _log_window(tracker: Tracker, window: dict, state: TrainerState, scheduler, micro_per_epoch: int) -> None:
    elapsed = max(time.perf_counter() - window["time"], 1e-9)
    weight = max(window["weight"], 1)
    row = {
        "step": state.global_step,
        "epoch": round(_epoch_float(state, micro_per_epoch), 4),
        "loss": window["loss_sum"] / weight,
        "learning_rate": scheduler.get_last_lr()[0],
        "grad_norm": sum(window["grad_norms"]) / max(len(window["grad_norms"]), 1),
        "tokens_per_second": window["real_tokens"] / elapsed,
    }
    row.update(average_metrics(window["metrics"], weight))
    tracker.log(row)
    state.log_history.append(row)
    window.update(new_window())


def _save_weights(model, tokenizer, out_dir: Path) -> None:
    """Adapter (LoRA) or full weights + tokenizer into `out_dir`, file by file atomically.

    Saved into a temporary folder first, then each file is renamed into `out_dir`, so
    the logs and checkpoints already there are kept and no file is ever half-written.
    """
    from tunelab.model.adapters import save_trained

    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".weights.", dir=out_dir))
    try:
        save_trained(model, tokenizer, tmp / "w")
        for path in (tmp / "w").iterdir():
            target = out_dir / path.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(path, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
