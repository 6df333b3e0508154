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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tunelab.config import TunelabConfig, save_config
from tunelab.data.collate import batch_order, micro_batch_tokens, split_by_tokens
from tunelab.errors import TunelabError
from tunelab.io import clean_stale_temps, fsync_tree, publish, temp_dir, write_json_atomic
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
from tunelab.train.memory import MemoryBackoff
from tunelab.train.objectives import check_stage, objective_class, restrict_speed
from tunelab.train.optim import after_evaluation, build_optimizer, build_scheduler
from tunelab.train.probes import EvalSets
from tunelab.train.runlog import LOG_NAME, perplexity, read_log
from tunelab.train.step import StepStats, average_metrics, evaluate, optimizer_step, rollout_step, settle_steps
from tunelab.train.trackers import check_installed
from tunelab.train.tracking import Tracker, final_metrics


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


def train(cfg: TunelabConfig, objective_factory=None, eval_callbacks=(), reward=None) -> RunResult:
    """Run one fine-tuning job as the config says.

    `objective_factory(cfg, tokenizer)` builds the stage's objective; the default is the
    class `cfg.stage` names in `objectives.STAGES`. Each of `eval_callbacks`
    is called at every evaluation as `callback(model, tokenizer, step) -> {name: value}`;
    its values are logged as `eval_NAME` and can be `metric_for_best_model` (the task
    metrics of `eval_task` come this way, from the evaluate stage: see DEVELOPERS.md).
    `reward(prompt, completion, reference) -> float` is the task score an online stage
    optimises when `reward:` names a task (lent the same way).
    """
    if cfg.eval_task and not eval_callbacks:
        raise TunelabError(f"eval_task={cfg.eval_task} but no task-metric callback was given", where="config",
                           fix="run `tunelab train`, or pass eval_callbacks=[TaskMetrics(cfg)] "
                               "(tunelab.evaluate.in_training) to train()")
    check_stage(cfg)  # a key this stage would ignore is refused before anything runs
    dist = distributed.init_distributed(cfg)  # one process, or one of WORLD_SIZE under a launcher
    try:
        return _train(cfg, objective_factory, dist, eval_callbacks, reward)
    finally:
        distributed.shutdown(dist)


def _train(cfg: TunelabConfig, objective_factory, dist: Dist, eval_callbacks=(), reward=None) -> RunResult:
    from tunelab.model.adapters import count_parameters, prepare_for_training
    from tunelab.model.loader import enable_gradient_checkpointing, load_model, load_tokenizer, resolve_device
    from tunelab.train.fast import apply_speed_levers
    from tunelab.train.fast.memory import offload_for_memory

    run_dir = Path(cfg.output_dir)
    resume_path = resolve_resume(run_dir, cfg.resume_from_checkpoint)
    check_installed(cfg.report_to)  # a missing tracker package fails before the model loads
    if dist.is_main:  # rank 0 alone writes into the run folder
        prepare_run_dir(run_dir, cfg, resuming=resume_path is not None)
    dist.barrier()
    set_seed(cfg.seed)
    user_cfg = cfg  # saved as given: `auto` levers are decided anew on whatever device a resume runs on

    # 1. Data: read, split, render with the chat template, mask everything but the answers.
    tokenizer = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    objective = (objective_factory or objective_class(cfg.stage))(cfg, tokenizer, **(
        {"reward": reward} if reward is not None else {}))
    train_rows, eval_rows = objective.load_data()
    mixture = getattr(objective, "mixture", None)  # rows taken from each source, replay included

    # 2. Model: base weights, then LoRA / freeze / full, then the speed levers (train/fast/plan.py).
    device = resolve_device(distributed.device_for(cfg, dist))
    cfg = restrict_speed(resolve_precision(cfg, device), type(objective))
    # FSDP shards from CPU memory: no GPU ever holds the whole model.
    load_device = torch.device("cpu") if dist.strategy == "fsdp" else device
    model = load_model(cfg.model_name_or_path, dtype=_load_dtype(cfg), device=load_device,
                       quantization_bit=cfg.quantization_bit, trust_remote_code=cfg.trust_remote_code,
                       rope_scaling=cfg.rope_scaling, cutoff_len=cfg.cutoff_len)
    model = prepare_for_training(model, cfg)
    plan = resolve_speed(cfg, model, device)
    cfg = objective.cfg = plan.cfg  # the objective batches and scores with the levers as decided
    if dist.enabled and cfg.max_tokens_per_batch is not None:  # sized to each GPU's free memory: agree
        cfg = objective.cfg = replace(cfg, max_tokens_per_batch=dist.all_min(cfg.max_tokens_per_batch, device))
    if dist.is_main:
        print(plan.describe(), file=sys.stderr)
    trainable, total = count_parameters(model)
    # Several processes: DDP or FSDP2 around model + loss (compiled layers come after wrapping).
    objective = distributed.wrap(model, objective, cfg, dist, device)
    apply_speed_levers(model, cfg, device)
    objective.setup(model, device)
    probes = EvalSets(cfg, tokenizer) if cfg.eval_sets else None  # forgetting: earlier stages' data (probes.py)
    if dist.is_main:
        print(f"trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.3f}%) on {device}"
              + (f" x {dist.world} processes ({dist.strategy})" if dist.enabled else ""), file=sys.stderr)

    # 3. Optimizer and schedule. A global step takes accumulation x processes micro-batches.
    # Batches count rows of the user's data: a folded dialogue (data/fold.py) holds several.
    step_micro = cfg.gradient_accumulation_steps * dist.world
    rows = [getattr(r, "rows", 1) for r in train_rows]
    micro_per_epoch = math.ceil(sum(rows) / cfg.per_device_train_batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / step_micro)
    if dist.is_main and sum(rows) != len(rows):
        print(f"folded {sum(rows)} rows into {len(rows)} sequences; a step takes "
              f"{cfg.per_device_train_batch_size * step_micro} rows' answers as before "
              f"({steps_per_epoch} steps per epoch)", file=sys.stderr)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    optimizer = build_optimizer(model, cfg, device)
    if hasattr(objective, "prepare"):  # DeepSpeed takes model and optimizer together (train/deepspeed.py)
        objective.prepare(optimizer)
    # Online stages take num_ppo_epochs optimizer steps per step (one batch of rollouts).
    scheduler = build_scheduler(optimizer, cfg, total_steps * getattr(objective, "updates_per_step", 1))
    scaler = torch.amp.GradScaler(device.type) if cfg.fp16 else None

    state = TrainerState()
    if resume_path is not None:
        state = _load_checkpoint(resume_path, model, optimizer, scheduler, dist)
        if dist.is_main:
            print(f"resumed from {resume_path} at step {state.global_step}", file=sys.stderr)
    if dist.is_main:
        save_config(user_cfg, run_dir / "config.yaml")
        if mixture:
            write_json_atomic(run_dir / "data_mixture.json", mixture)

    tracker = (Tracker(run_dir, cfg.report_to, total_steps, state.global_step, cfg.disable_tqdm,
                       config=user_cfg.to_dict(), plot=cfg.plot_loss)
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

    row_totals = distributed.RowTotals(objective, train_rows)

    def run_step(step_ids: list[list[int]]) -> StepStats:
        """One optimizer step (this process's share of it), retried in smaller pieces if it runs
        out of memory (train/memory.py)."""
        share = rank_share(step_ids, dist.rank, dist.world)
        if hasattr(objective, "rollout"):  # online stages: the step's prompts are sampled and scored first
            return rollout_step(model, objective, [[train_rows[i] for i in ids] for ids in share], optimizer,
                                scheduler, scaler, cfg, device)
        spare = objective.collate([train_rows[step_ids[0][0]]]) if dist.enabled else None

        def attempt(budget):
            batches = [objective.collate([train_rows[i] for i in ids]) for ids in micro_batches(share, budget)]
            totals = distributed.step_totals(step_ids, dist.world, lambda ids: micro_batches(ids, budget),
                                             row_totals) if dist.enabled else None
            return optimizer_step(model, objective, batches, optimizer, scheduler, scaler, cfg, device, dist, spare,
                                  totals)

        # (a rank's share may be empty: a step of fewer samples than processes)
        return memory.run(state.global_step + 1, max((lengths[i] for ids in share for i in ids), default=0),
                          largest_micro=lambda budget: max(map(micro_tokens, micro_batches(share, budget)), default=0),
                          attempt=attempt, reset=lambda: optimizer.zero_grad(set_to_none=True))

    previous_sigterm = _sigterm_as_ctrl_c()

    pending: list[tuple[int, StepStats]] = []  # steps whose loss sums are still on the device

    def settle() -> None:
        _settle_window(window, pending, device, dist, run_dir)

    def checkpoint() -> Path:
        if dist.strategy == "deepspeed":  # refused at start for saves; an interrupt ends without one
            raise TunelabError("interrupted: DeepSpeed runs write no checkpoint yet", where=str(run_dir),
                               fix="rerun, or use distributed_strategy=fsdp for resumable sharded checkpoints")
        settle()
        # LoRA checkpoints also hold the PEFT adapter, so any of them can be evaluated as is.
        extra = ((lambda folder: save_final_weights(model, tokenizer, folder, cfg, dist, objective))
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
        after_evaluation(scheduler, eval_loss)  # reduce_lr_on_plateau / greedy follow the validation loss
        row = {"step": state.global_step, "epoch": round(_epoch_float(state, micro_per_epoch), 4),
               "eval_loss": eval_loss}
        if getattr(objective, "perplexity", False):
            row["eval_perplexity"] = perplexity(eval_loss)
        row |= {f"eval_{k}": v for k, v in eval_metrics.items()}
        if probes:
            row |= probes.losses(model, device, dist)
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
            order = batch_order(lengths, cfg.per_device_train_batch_size, cfg.seed, state.epoch,
                                group_by_length=cfg.group_by_length and not cfg.packing, rows=rows,
                                per_step=step_micro)
            while state.batch_in_epoch < len(order) and state.global_step < total_steps:
                # One optimizer step = up to gradient_accumulation_steps micro-batches per process
                # (folded rows: a micro-batch may be empty, never a whole step).
                slots = order[state.batch_in_epoch:state.batch_in_epoch + step_micro]
                step_ids = [ids for ids in slots if ids]
                first_cuda_step = state.global_step == start_step and device.type == "cuda"
                if first_cuda_step:
                    torch.cuda.reset_peak_memory_stats(device)
                    base_bytes = torch.cuda.memory_allocated(device)
                started = time.perf_counter()
                with _ctrl_c_after_step():  # weights, counters and log window must agree in a checkpoint
                    step = run_step(step_ids)
                    state.global_step += 1
                    state.batch_in_epoch += len(slots)
                    state.tokens_seen += step.real_tokens
                    window["weight"] += step.weight
                    window["real_tokens"] += step.real_tokens
                    pending.append((state.global_step, step))
                    logs_now = state.global_step % cfg.logging_steps == 0 or state.global_step == total_steps
                    evals_now = cfg.eval_strategy == "steps" and state.global_step % cfg.eval_steps == 0
                    saves_now = cfg.save_strategy == "steps" and state.global_step % cfg.save_steps == 0
                    if logs_now or evals_now or saves_now:
                        settle()  # the one wait for the device: queued training work is training time
                    window["seconds"] += time.perf_counter() - started  # training only: evaluations, saves excluded
                tracker.advance()
                if first_cuda_step:
                    tracker.note(f"step {state.global_step}: peak GPU memory "
                                 f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} of "
                                 f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB")
                    if cfg.max_tokens_per_batch is not None and user_cfg.max_tokens_per_batch is None:
                        memory.calibrate(device, base_bytes, max(map(micro_tokens, micro_batches(
                            rank_share(step_ids, dist.rank, dist.world), memory.budget)), default=0))
                        if dist.enabled:  # every rank cuts every rank's share with one budget
                            memory.budget = dist.all_min(memory.budget, device)

                if logs_now:
                    _log_window(tracker, window, state, scheduler, micro_per_epoch)
                if evals_now:
                    stopped_early = evaluate_and_track()
                    model.train()
                if saves_now:
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
        elif cfg.eval_strategy == "no" and probes:  # no evaluations: the eval sets still get the end's numbers
            tracker.log({"step": state.global_step, **probes.losses(model, device, dist)})
    except KeyboardInterrupt:
        _restore_sigterm(signal.SIG_IGN)  # a scheduler's second SIGTERM must not cut this checkpoint short
        path = checkpoint()
        if not dist.is_main:
            raise
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
    save_final_weights(model, tokenizer, run_dir, cfg, dist, objective)
    if dist.is_main:
        write_run_card(run_dir, user_cfg, tokenizer)
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


def save_final_weights(model, tokenizer, out_dir: Path, cfg: TunelabConfig, dist: Dist = SINGLE,
                       objective=None) -> None:
    """The adapter or full weights as one loadable folder, written by rank 0, with what the
    stage adds (the reward model's head). Under FSDP (and DeepSpeed ZeRO-3) every rank first
    sends its shards to rank 0 (a collective call: every rank makes it)."""
    state = None
    if hasattr(objective, "consolidated_state"):
        state = objective.consolidated_state(model, dist.is_main, trainable_only=cfg.finetuning_type == "lora")
    elif dist.strategy == "fsdp":
        from tunelab.train.sharded_checkpoint import consolidated_state

        state = consolidated_state(model, dist, trainable_only=cfg.finetuning_type == "lora")
    if dist.is_main:
        _save_weights(model, tokenizer, out_dir, state_dict=state)
        if hasattr(objective, "save"):
            objective.save(model, out_dir)


def write_run_card(run_dir: Path, cfg: TunelabConfig, tokenizer) -> None:
    """README.md for the run folder: loading, final metrics, template, config (model/card.py)."""
    from tunelab.data.templates import template_lock
    from tunelab.model.adapters import read_base
    from tunelab.model.card import write_model_card

    base = read_base(run_dir) or {}
    log = run_dir / LOG_NAME
    write_model_card(run_dir, kind="adapter" if cfg.finetuning_type == "lora" else "full",
                     base_model=base.get("base_model", cfg.model_name_or_path),
                     base_model_path=base.get("base_model_name_or_path", cfg.model_name_or_path),
                     config=cfg.to_dict(), metrics=final_metrics(read_log(log) if log.exists() else []),
                     lock=template_lock(tokenizer))


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


def _epoch_float(state: TrainerState, micro_per_epoch: int) -> float:
    return state.epoch + state.batch_in_epoch / max(micro_per_epoch, 1)


def new_window() -> dict:
    """Running sums between two log lines."""
    return {"loss_sum": 0.0, "weight": 0, "real_tokens": 0, "seconds": 0.0, "grad_norms": [], "metrics": {}}


def _settle_window(window: dict, pending: list[tuple[int, StepStats]], device, dist: Dist, run_dir: Path) -> None:
    """Add the loss, metric and grad-norm sums of the steps run since the last call (`pending`,
    their global step numbers and stats) to the window; stop at a loss that is not finite."""
    settled = settle_steps([step for _, step in pending], device, dist)
    for (number, _), (loss_sum, metrics, grad_norm) in zip(pending, settled):
        window["loss_sum"] += loss_sum
        for key, value in metrics.items():
            window["metrics"][key] = window["metrics"].get(key, 0.0) + value
        window["grad_norms"].append(grad_norm)
        if not math.isfinite(window["loss_sum"]):
            raise TunelabError(f"the loss became {window['loss_sum']} at step {number}", where=str(run_dir),
                               fix="lower learning_rate, use bf16 instead of fp16, or check max_grad_norm")
    pending.clear()


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
