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
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunelab.config import TunelabConfig, save_config
from tunelab.data.collate import batch_order, micro_batch_tokens, split_by_tokens
from tunelab.errors import TunelabError
from tunelab.io import clean_stale_temps, fsync_tree, publish, temp_dir
from tunelab.train import distributed
from tunelab.train.checkpoint import (
    TrainerState,
    checkpoint_path,
    load_checkpoint,
    load_trainable_state,
    resolve_resume,
    rotate_checkpoints,
    save_checkpoint,
)
from tunelab.train.distributed import SINGLE, Dist, rank_share
from tunelab.train.fast.plan import resolve_precision, resolve_speed
from tunelab.train.memory import MemoryBackoff, OptimizerOutOfMemory
from tunelab.train.objective import SFTObjective
from tunelab.train.optim import build_optimizer
from tunelab.train.runlog import LOG_NAME, perplexity, plot_run, read_log
from tunelab.train.tracking import Tracker


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
    dist = distributed.init_distributed(cfg)  # one process, or one of WORLD_SIZE under a launcher
    try:
        return _train(cfg, objective_factory, dist, eval_callbacks)
    finally:
        distributed.shutdown(dist)


def _train(cfg: TunelabConfig, objective_factory, dist: Dist, eval_callbacks=()) -> RunResult:
    from tunelab.model.adapters import count_parameters, prepare_for_training
    from tunelab.model.loader import enable_gradient_checkpointing, load_model, load_tokenizer, resolve_device
    from tunelab.train.fast import apply_speed_levers
    from tunelab.train.fast.memory import offload_for_memory

    run_dir = Path(cfg.output_dir)
    resume_path = resolve_resume(run_dir, cfg.resume_from_checkpoint)
    if dist.is_main:  # rank 0 alone writes into the run folder
        prepare_run_dir(run_dir, cfg, resuming=resume_path is not None)
    dist.barrier()
    set_seed(cfg.seed)
    user_cfg = cfg  # saved as given: `auto` levers are decided anew on whatever device a resume runs on

    # 1. Data: read, split, render with the chat template, mask everything but the answers.
    tokenizer = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    objective = (objective_factory or SFTObjective)(cfg, tokenizer)
    train_rows, eval_rows = objective.load_data()

    # 2. Model: base weights, then LoRA / freeze / full, then the speed levers (train/fast/plan.py).
    device = resolve_device(distributed.device_for(cfg, dist))
    cfg = resolve_precision(cfg, device)
    # FSDP shards from CPU memory: no GPU ever holds the whole model.
    load_device = torch.device("cpu") if dist.strategy == "fsdp" else device
    model = load_model(cfg.model_name_or_path, dtype=_load_dtype(cfg), device=load_device,
                       quantization_bit=cfg.quantization_bit, trust_remote_code=cfg.trust_remote_code,
                       rope_scaling=cfg.rope_scaling, cutoff_len=cfg.cutoff_len)
    model = prepare_for_training(model, cfg)
    plan = resolve_speed(cfg, model, device)
    cfg = objective.cfg = plan.cfg  # the objective batches and scores with the levers as decided
    if dist.is_main:
        print(plan.describe(), file=sys.stderr)
    trainable, total = count_parameters(model)
    # Several processes: DDP or FSDP2 around model + loss (compiled layers come after wrapping).
    objective = distributed.wrap(model, objective, cfg, dist, device)
    apply_speed_levers(model, cfg, device)
    objective.setup(model, device)
    if dist.is_main:
        print(f"trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.3f}%) on {device}"
              + (f" x {dist.world} processes ({dist.strategy})" if dist.enabled else ""), file=sys.stderr)

    # 3. Optimizer and schedule. A global step takes accumulation x processes micro-batches.
    step_micro = cfg.gradient_accumulation_steps * dist.world
    micro_per_epoch = math.ceil(len(train_rows) / cfg.per_device_train_batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / step_micro)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    scaler = torch.amp.GradScaler(device.type) if cfg.fp16 else None

    state = TrainerState()
    if resume_path is not None:
        state = _load_checkpoint(resume_path, model, optimizer, scheduler, dist)
        if dist.is_main:
            print(f"resumed from {resume_path} at step {state.global_step}", file=sys.stderr)
    if dist.is_main:
        save_config(user_cfg, run_dir / "config.yaml")

    tracker = (Tracker(run_dir, cfg.report_to, total_steps, state.global_step, cfg.disable_tqdm)
               if dist.is_main else distributed.SilentTracker(run_dir / LOG_NAME))
    start_step = state.global_step
    window = new_window()
    last_eval, last_eval_step = None, None
    if resume_path is not None:
        last_eval_step = _resume_logging(tracker, window, state, scheduler, micro_per_epoch,
                                         cfg.logging_steps, total_steps)
    stopped_early = False
    lengths = [len(r) for r in train_rows]
    # The back-off retries a step on its own: across processes the ranks would have to agree on it.
    if cfg.oom_backoff and dist.enabled and dist.is_main:
        print("out-of-memory back-off: off under several processes (an out-of-memory error ends the run "
              "with the keys to change)", file=sys.stderr)
    memory = MemoryBackoff(cfg.max_tokens_per_batch, enabled=cfg.oom_backoff and not dist.enabled,
                           enable_checkpointing=lambda: enable_gradient_checkpointing(model),
                           checkpointing=bool(cfg.gradient_checkpointing), log=tracker.note,
                           enable_offload=lambda: offload_for_memory(model, cfg))

    def micro_batches(step_ids: list[list[int]], budget: int | None) -> list[list[int]]:
        """The step's samples as micro-batches: by token budget, or as batch_order cut them."""
        if budget is None:
            return step_ids
        return split_by_tokens([i for ids in step_ids for i in ids], lengths, budget, padded=not cfg.padding_free)

    def micro_tokens(ids: list[int]) -> int:
        return micro_batch_tokens(ids, lengths, padded=not cfg.padding_free)

    def run_step(step_ids: list[list[int]]) -> StepStats:
        """One optimizer step (this process's share of it), retried in smaller pieces if it runs
        out of memory (train/memory.py)."""
        share = rank_share(step_ids, dist.rank, dist.world)
        spare = objective.collate([train_rows[step_ids[0][0]]]) if dist.enabled else None

        def attempt(budget):
            batches = [objective.collate([train_rows[i] for i in ids]) for ids in micro_batches(share, budget)]
            return optimizer_step(model, objective, batches, optimizer, scheduler, scaler, cfg, device, dist, spare)

        return memory.run(state.global_step + 1, max(lengths[i] for ids in share for i in ids),
                          largest_micro=lambda budget: max(map(micro_tokens, micro_batches(share, budget))),
                          attempt=attempt, reset=lambda: optimizer.zero_grad(set_to_none=True))

    previous_sigterm = _sigterm_as_ctrl_c()

    def checkpoint() -> Path:
        # LoRA checkpoints also hold the PEFT adapter, so any of them can be evaluated as is.
        extra = ((lambda folder: save_final_weights(model, tokenizer, folder, cfg, dist))
                 if cfg.finetuning_type == "lora" else None)
        state.log_window = dict(window)  # a resumed curve equals this one
        if dist.strategy == "fsdp":
            from tunelab.train.sharded_checkpoint import save_sharded_checkpoint

            path = save_sharded_checkpoint(run_dir, model, optimizer, scheduler, state, dist, extra_save=extra)
        else:  # DDP: every rank holds the same weights, rank 0 writes the usual checkpoint
            path = checkpoint_path(run_dir, state.global_step)
            if dist.is_main:
                save_checkpoint(run_dir, model, optimizer, scheduler, state, extra_save=extra)
        if dist.is_main:
            rotate_checkpoints(run_dir, cfg.save_total_limit, keep=state.best_checkpoint)
        dist.barrier()
        return path

    def evaluate_and_track() -> bool:
        """Validation loss; best-model bookkeeping; returns True when early stopping triggers."""
        nonlocal last_eval, last_eval_step
        eval_loss, eval_metrics = evaluate(model, objective, eval_rows, cfg, device, dist)
        last_eval, last_eval_step = eval_loss, state.global_step
        row = {"step": state.global_step, "epoch": round(_epoch_float(state, micro_per_epoch), 4),
               "eval_loss": eval_loss}
        if cfg.stage in ("sft", "pt"):
            row["eval_perplexity"] = perplexity(eval_loss)
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
        if cfg.eval_strategy != "no" and cfg.eval_on_start and state.global_step == 0 and last_eval_step != 0:
            evaluate_and_track()  # the untuned model's validation loss: what training must beat
        elif (resume_path is not None and cfg.eval_strategy == "steps" and state.global_step % cfg.eval_steps == 0
              and 0 < state.global_step < total_steps and last_eval_step != state.global_step):
            evaluate_and_track()  # interrupted during this step's evaluation: its row is still owed
        model.train()
        while state.global_step < total_steps and not stopped_early:
            order = batch_order(lengths, cfg.per_device_train_batch_size, cfg.seed,
                                state.epoch, group_by_length=cfg.group_by_length and not cfg.packing)
            while state.batch_in_epoch < len(order) and state.global_step < total_steps:
                # One optimizer step = up to gradient_accumulation_steps micro-batches per process.
                step_ids = order[state.batch_in_epoch:state.batch_in_epoch + step_micro]
                first_cuda_step = state.global_step == start_step and device.type == "cuda"
                if first_cuda_step:
                    torch.cuda.reset_peak_memory_stats(device)
                    base_bytes = torch.cuda.memory_allocated(device)
                started = time.perf_counter()
                with _ctrl_c_after_step():  # weights, counters and log window must agree in a checkpoint
                    step = run_step(step_ids)
                    state.global_step += 1
                    state.batch_in_epoch += len(step_ids)
                    state.tokens_seen += step.real_tokens
                    _add_to_window(window, step)
                    window["seconds"] += time.perf_counter() - started  # training only: evaluations, saves excluded
                tracker.advance()
                if first_cuda_step:
                    tracker.note(f"step {state.global_step}: peak GPU memory "
                                 f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} of "
                                 f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB")
                    if cfg.max_tokens_per_batch is not None and user_cfg.max_tokens_per_batch is None:
                        memory.calibrate(device, base_bytes, max(map(micro_tokens, micro_batches(
                            rank_share(step_ids, dist.rank, dist.world), memory.budget))))

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
        _restore_sigterm(signal.SIG_IGN)  # a scheduler's second SIGTERM must not cut this checkpoint short
        path = checkpoint()
        if not dist.is_main:
            raise
        plot_run(run_dir)
        print(f"\ninterrupted: checkpoint saved to {path}; continue with resume_from_checkpoint=latest",
              file=sys.stderr)
        raise
    finally:
        tracker.close()
        _restore_sigterm(previous_sigterm)

    # 4. Final weights: the best checkpoint's if asked, else the last step's.
    if cfg.load_best_model_at_end and state.best_checkpoint:
        _load_best(Path(state.best_checkpoint), model)
        if dist.is_main:
            print(f"loaded the best model ({cfg.metric_for_best_model}={state.best_metric:.4f}) from "
                  f"{state.best_checkpoint}", file=sys.stderr)
    save_final_weights(model, tokenizer, run_dir, cfg, dist)
    if cfg.plot_loss and dist.is_main:
        plot_run(run_dir)
    dist.barrier()
    train_losses = [r["loss"] for r in state.log_history if "loss" in r]
    if dist.is_main:
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
    previous = {sig: signal.signal(sig, lambda *_: received.append(True)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            raise KeyboardInterrupt


def _sigterm_as_ctrl_c():
    """Treat SIGTERM (what Slurm and Kubernetes send before a kill) like Ctrl-C: finish the step,
    checkpoint, exit. Later SIGTERMs are ignored so they cannot cut that checkpoint short.
    Returns the previous handler for `_restore_sigterm`."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


RUN_MARKER = ".tunelab-run"  # written into every run folder: tunelab only ever overwrites its own folders


def prepare_run_dir(run_dir: Path, cfg: TunelabConfig, resuming: bool) -> None:
    """Refuse to mix a new run into an old one's folder unless told to, and never write into
    (or clear) a folder that holds files tunelab did not put there."""
    ours = (run_dir / RUN_MARKER).is_file()
    if run_dir.exists() and not run_dir.is_dir():
        raise TunelabError(f"output_dir {run_dir} is a file", where="config", fix="pick a folder for output_dir")
    others = [p.name for p in run_dir.iterdir()] if run_dir.is_dir() and not ours else []
    if others and not resuming:  # resuming: the checkpoint found there says the folder is a run's
        raise TunelabError(f"output_dir {run_dir.resolve()} already holds files that are not a tunelab run "
                           f"({', '.join(sorted(others)[:3])}{', ...' if len(others) > 3 else ''})", where="config",
                           fix="pick a new or empty folder for output_dir (overwrite_output_dir only replaces "
                               f"folders tunelab created, which hold a {RUN_MARKER} file)")
    previous = ours and any((run_dir / n).exists() for n in ("trainer_log.jsonl", "checkpoints"))
    if previous and not resuming:
        if not cfg.overwrite_output_dir:
            raise TunelabError(f"output_dir {run_dir} already holds a run", where="config",
                               fix="continue it with resume_from_checkpoint=latest, start over with "
                                   "overwrite_output_dir=true, or pick another output_dir")
        for name in ("checkpoints", "tensorboard"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_MARKER).write_text("a tunelab run folder: overwrite_output_dir may replace it\n", encoding="utf-8")
    for folder in (run_dir, run_dir / "checkpoints"):
        clean_stale_temps(folder)  # what a killed run left half-written


def _load_checkpoint(path: Path, model, optimizer, scheduler, dist: Dist) -> TrainerState:
    """Sharded (FSDP) checkpoints load on any number of processes; the others on one or DDP."""
    from tunelab.train.sharded_checkpoint import is_sharded, load_sharded_checkpoint

    if is_sharded(path):
        return load_sharded_checkpoint(path, model, optimizer, scheduler, dist)
    if dist.strategy == "fsdp":
        raise TunelabError(f"{path} was written by a DDP or one-process run and cannot be sharded on load",
                           where="resume_from_checkpoint",
                           fix="resume with distributed_strategy=ddp, or on one process")
    return load_checkpoint(path, model, optimizer, scheduler)


def _load_best(path: Path, model) -> None:
    from safetensors.torch import load_file

    from tunelab.train.sharded_checkpoint import is_sharded, load_sharded_weights

    if is_sharded(path):
        load_sharded_weights(path, model)
    else:
        load_trainable_state(model, load_file(path / "trainable.safetensors"))


def save_final_weights(model, tokenizer, out_dir: Path, cfg: TunelabConfig, dist: Dist = SINGLE) -> None:
    """The adapter or full weights as one loadable folder, written by rank 0. Under FSDP every
    rank first sends its shards to rank 0 (a collective call: every rank makes it)."""
    state = None
    if dist.strategy == "fsdp":
        from tunelab.train.sharded_checkpoint import consolidated_state

        state = consolidated_state(model, dist, trainable_only=cfg.finetuning_type == "lora")
    if dist.is_main:
        _save_weights(model, tokenizer, out_dir, state_dict=state)


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
                   cfg: TunelabConfig, device, dist: Dist = SINGLE, spare: dict | None = None) -> StepStats:
    """One optimizer step: accumulate the micro-batches' gradients, clip, step, schedule.

    Under several processes `micro_batches` is this rank's share of the global step and
    `spare` a batch to run at zero weight should the share be short (distributed.padded_passes).
    A function of its own so benchmarks time exactly the code the trainer runs.
    """
    # Divide by the weight of the whole global step (every rank's): the loss one big batch would
    # give. DDP and FSDP average gradients over ranks; multiplying by the world size undoes it.
    (step_weight,) = dist.all_sum([sum(objective.weight(b) for b in micro_batches)], device)
    scale = dist.world / max(step_weight, 1)
    passes = distributed.padded_passes(micro_batches, dist, device, lambda: spare)
    loss_total, real_tokens, metrics = 0.0, 0, {}
    for i, (batch, counts) in enumerate(passes):
        batch = _to_device(batch, device)
        with _grad_sync(objective, last=i == len(passes) - 1):
            with _autocast(cfg, device):
                loss_sum, batch_metrics = objective.loss(model, batch)
            loss = loss_sum * (scale if counts else 0.0)
            (scaler.scale(loss) if scaler else loss).backward()
        if not counts:
            continue
        loss_total += float(loss_sum.detach())
        real_tokens += int(batch["attention_mask"].sum())
        for key, value in batch_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + value
    if dist.enabled:  # the logged loss, tokens and metrics are the global step's
        keys = sorted(metrics)
        loss_total, real_tokens, *values = dist.all_sum([loss_total, real_tokens, *(metrics[k] for k in keys)],
                                                        device)
        real_tokens, metrics = int(real_tokens), dict(zip(keys, values))
    try:
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = distributed.grad_norm_value(torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad],
            cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    except torch.OutOfMemoryError as exc:  # weights may be half-updated: this step cannot be retried
        raise OptimizerOutOfMemory(str(exc)) from None
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss_total, int(step_weight), real_tokens, grad_norm, metrics)


def _grad_sync(objective, last: bool):
    """DDP all-reduces on the last micro-batch of a step only (see distributed.DistributedObjective)."""
    return objective.grad_sync(last) if hasattr(objective, "grad_sync") else contextlib.nullcontext()


def build_scheduler(optimizer, cfg: TunelabConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


@torch.no_grad()
def evaluate(model, objective, rows: list, cfg: TunelabConfig, device,
             dist: Dist = SINGLE) -> tuple[float, dict[str, float]]:
    """Mean validation loss (per token for SFT, per pair for preferences) and mean metrics.
    Several processes: rank r scores batches r, r + world, ...; the sums are all-reduced."""
    model.eval()
    sums = {"loss": 0.0, "weight": 0, "metrics": {}}

    def score(chunk: list, counts: bool) -> None:
        """Add one batch's loss (a padding pass of a short rank adds nothing); on one process a
        batch that runs out of memory is scored in two halves."""
        batch = objective.collate(chunk)
        try:
            with _autocast(cfg, device):
                loss_sum, batch_metrics = objective.loss(model, _to_device(batch, device))
        except torch.OutOfMemoryError:
            if len(chunk) == 1 or dist.enabled:
                raise
            oom = True
        else:
            oom = False
            if counts:
                sums["loss"] += float(loss_sum)
                sums["weight"] += objective.weight(batch)
                for key, value in batch_metrics.items():
                    sums["metrics"][key] = sums["metrics"].get(key, 0.0) + value
        if oom:  # outside the except block, so the failed try's tensors are freed first
            del batch
            torch.cuda.empty_cache()
            score(chunk[:len(chunk) // 2], counts)
            score(chunk[len(chunk) // 2:], counts)

    ordered = sorted(rows, key=len)  # similar lengths: little padding
    size = cfg.per_device_eval_batch_size
    chunks = [ordered[start:start + size] for start in range(0, len(ordered), size)]
    for chunk, counts in distributed.padded_passes(chunks[dist.rank::dist.world], dist, device,
                                                   lambda: ordered[:1]):
        score(chunk, counts)
    total, weight, metrics = sums["loss"], sums["weight"], sums["metrics"]
    if dist.enabled:
        keys = sorted(metrics)
        total, weight, *values = dist.all_sum([total, weight, *(metrics[k] for k in keys)], device)
        metrics = dict(zip(keys, values))
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


def new_window() -> dict:
    """Running sums between two log lines."""
    return {"loss_sum": 0.0, "weight": 0, "real_tokens": 0, "seconds": 0.0, "grad_norms": [], "metrics": {}}


def _add_to_window(window: dict, step: StepStats) -> None:
    window["loss_sum"] += step.loss_sum
    window["real_tokens"] += step.real_tokens
    for key, value in step.metrics.items():
        window["metrics"][key] = window["metrics"].get(key, 0.0) + value
    window["weight"] += step.weight
    window["grad_norms"].append(step.grad_norm)


def _resume_logging(tracker: Tracker, window: dict, state: TrainerState, scheduler, micro_per_epoch: int,
                    logging_steps: int, total_steps: int) -> int | None:
    """Carry on the logged curve exactly where the checkpoint left it.

    Restores the open logging window (save_steps need not be a multiple of logging_steps)
    and writes the checkpoint step's row if an interrupt came before it was logged.
    Returns the step of the last evaluation if the log holds one at this step, so it is
    not repeated.
    """
    window.update(state.log_window)
    rows = [r for r in read_log(tracker.log_path) if r.get("step") == state.global_step] \
        if tracker.log_path.exists() else []
    if state.global_step % logging_steps == 0 or state.global_step == total_steps:
        if any("loss" in r for r in rows):
            window.update(new_window())  # logged before the interrupt; the sums are spent
        elif window["weight"]:
            _log_window(tracker, window, state, scheduler, micro_per_epoch)
    return state.global_step if any("eval_loss" in r for r in rows) else None


def _log_window(tracker: Tracker, window: dict, state: TrainerState, scheduler, micro_per_epoch: int) -> None:
    elapsed = max(window["seconds"], 1e-9)
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


def _save_weights(model, tokenizer, out_dir: Path, state_dict: dict | None = None) -> None:
    """Adapter (LoRA) or full weights + tokenizer into `out_dir`, file by file atomically.

    Saved into a temporary folder first, then each file is renamed into `out_dir`, so
    the logs and checkpoints already there are kept and no file is ever half-written.
    """
    from tunelab.model.adapters import save_trained

    out_dir = Path(out_dir)
    tmp = temp_dir(out_dir, "weights")
    try:
        save_trained(model, tokenizer, tmp / "w", state_dict=state_dict)
        fsync_tree(tmp / "w")
        for path in (tmp / "w").iterdir():
            target = out_dir / path.name
            if target.is_dir():
                shutil.rmtree(target)
            publish(path, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
