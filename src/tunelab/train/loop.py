"""The training recipe, top to bottom.

    config -> tokenizer + samples -> model (+ LoRA) -> optimizer + schedule
           -> for each optimizer step: accumulate micro-batches, clip, step, log
              every eval_steps: validation loss; best model; early stopping
              every save_steps: atomic checkpoint (exact resume)
           -> final weights, tokenizer, config, logs, loss plot

`Trainer.train()` is that recipe in a page; its parts decide when they act: the data's
`steps` (an epoch's order), `LogWindow` (the sums between two log lines), `Evaluator`
(eval_strategy, the best model, early stopping) and `Checkpointer` (save_strategy; one
process, DDP or FSDP). What one step computes lives in step.py, each stage's loss in
objectives/. No Trainer subclasses: everything the loop does is on this page or one call away.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
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
from tunelab.train.streaming import BlockStream
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
        return Trainer(cfg, dist, objective_factory, eval_callbacks, reward).train()
    finally:
        distributed.shutdown(dist)


class Trainer:
    """One run. `__init__` sets it up (data, model, levers, optimizer, schedule, state, tracker);
    `train()` is the recipe; each part it calls (`LogWindow`, `Evaluator`, `Checkpointer`,
    the data's `steps`) decides when it acts."""

    def __init__(self, cfg: TunelabConfig, dist: Dist, objective_factory=None, eval_callbacks=(), reward=None):
        self.clock = RunClock()
        self.dist = dist
        self.user_cfg = cfg  # saved as given: `auto` levers are decided anew on whatever device a resume runs on
        self.run_dir = Path(cfg.output_dir)
        self.resume_path = resolve_resume(self.run_dir, cfg.resume_from_checkpoint)
        check_installed(cfg.report_to)  # a missing tracker package fails before the model loads
        if dist.is_main:  # rank 0 alone writes into the run folder
            prepare_run_dir(self.run_dir, cfg, resuming=self.resume_path is not None)
        dist.barrier()
        set_seed(cfg.seed)
        train_rows = self._setup_data(cfg, objective_factory, reward)
        self._setup_model(planned_tokens(train_rows, cfg, dist.world))
        self._setup_optimizer(train_rows)
        self._setup_state(eval_callbacks)
        self.clock.add("set-up", time.perf_counter() - self.clock.started)

    # --- the recipe ----------------------------------------------------------------------

    def train(self) -> RunResult:
        state, previous_sigterm = self.state, _sigterm_as_ctrl_c()
        try:
            self.evaluator.at_start(state, resumed=self.resume_path is not None, total_steps=self.total_steps)
            self.model.train()
            while state.global_step < self.total_steps and not self.stopped_early:
                for step in self.data.steps(state):  # the rest of this epoch, one optimizer step at a time
                    self.train_step(step)
                    if self.logs_now():
                        self.log()
                    if self.evaluator.due(state.global_step):
                        self.stopped_early = self.evaluator.run(state)
                        self.model.train()
                    if self.checkpointer.due(state.global_step):
                        self.checkpoint()
                    if self.stopped_early or state.global_step >= self.total_steps:
                        break
                if self.data.epoch_done(state):
                    self.end_epoch()
            self.evaluator.at_end(state, self.stopped_early)
        except KeyboardInterrupt:
            _restore_sigterm(signal.SIG_IGN)  # a scheduler's second SIGTERM must not cut this checkpoint short
            path = self.checkpoint()
            if self.dist.is_main:
                print(f"\ninterrupted: checkpoint saved to {path}; continue with resume_from_checkpoint=latest",
                      file=sys.stderr)
            raise
        finally:
            self.tracker.close()
            _restore_sigterm(previous_sigterm)
        return self.finish()

    # --- set-up ----------------------------------------------------------------------------

    def _setup_data(self, cfg: TunelabConfig, objective_factory, reward) -> list | BlockStream:
        """1. Data: read, split, render with the chat template, mask everything but the answers."""
        from tunelab.model.loader import load_tokenizer

        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        self.objective = (objective_factory or objective_class(cfg.stage))(cfg, self.tokenizer, **(
            {"reward": reward} if reward is not None else {}))
        train_rows, self.eval_rows = self.objective.load_data()
        self.mixture = getattr(self.objective, "mixture", None)  # rows taken from each source, replay included
        return train_rows

    def _setup_model(self, train_tokens: int | None) -> None:
        """2. Model: base weights, then LoRA / freeze / full, then the speed levers (train/fast/plan.py),
        decided for a run of `train_tokens` tokens a process."""
        from tunelab.model.adapters import count_parameters, prepare_for_training
        from tunelab.model.loader import load_model, resolve_device
        from tunelab.train.fast import apply_speed_levers

        dist, objective = self.dist, self.objective
        device = self.device = resolve_device(distributed.device_for(self.cfg, dist))
        cfg = restrict_speed(resolve_precision(self.cfg, device), type(objective))
        # FSDP shards from CPU memory: no GPU ever holds the whole model.
        load_device = distributed.load_device(cfg, dist, device)  # FSDP: CPU memory, no GPU holds the whole model
        model = load_model(cfg.model_name_or_path, dtype=_load_dtype(cfg), device=load_device,
                           quantization_bit=cfg.quantization_bit, trust_remote_code=cfg.trust_remote_code,
                           rope_scaling=cfg.rope_scaling, cutoff_len=cfg.cutoff_len)
        model = prepare_for_training(model, cfg)
        plan = resolve_speed(cfg, model, device, train_tokens,
                             agree=(lambda seconds: dist.all_min(seconds, device)) if dist.enabled else None)
        cfg = objective.cfg = plan.cfg  # the objective batches and scores with the levers as decided
        if dist.enabled and cfg.max_tokens_per_batch is not None:  # sized to each GPU's free memory: agree
            cfg = objective.cfg = replace(cfg, max_tokens_per_batch=dist.all_min(cfg.max_tokens_per_batch, device))
        if dist.is_main:
            print(plan.describe(), file=sys.stderr)
        trainable, total = count_parameters(model)
        # Several processes: DDP or FSDP2 around model + loss (compiled layers come after wrapping).
        self.objective = distributed.wrap(model, objective, cfg, dist, device)
        apply_speed_levers(model, cfg, device)
        self.objective.setup(model, device)
        self.probes = EvalSets(cfg, self.tokenizer) if cfg.eval_sets else None  # forgetting: earlier stages' data
        if dist.is_main:
            print(f"trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.3f}%) on {device}"
                  + (f" x {dist.world} processes ({dist.strategy})" if dist.enabled else ""), file=sys.stderr)
        self.model, self.cfg = model, cfg

    def _setup_optimizer(self, train_rows: list | BlockStream) -> None:
        """3. Optimizer and schedule. A global step takes accumulation x processes micro-batches."""
        cfg = self.cfg
        steps = StreamSteps if isinstance(train_rows, BlockStream) else EpochOrder
        self.data = steps(train_rows, cfg, cfg.gradient_accumulation_steps * self.dist.world, self.objective)
        if self.dist.is_main and (note := getattr(self.data, "describe", lambda: None)()):
            print(note, file=sys.stderr)
        self.total_steps = (cfg.max_steps if cfg.max_steps > 0
                            else math.ceil(cfg.num_train_epochs * self.data.steps_per_epoch))
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        if hasattr(self.objective, "prepare"):  # DeepSpeed takes model and optimizer together (train/deepspeed.py)
            self.objective.prepare(self.optimizer)
        # Online stages take num_ppo_epochs optimizer steps per step (one batch of rollouts).
        self.scheduler = build_scheduler(self.optimizer, cfg,
                                         self.total_steps * getattr(self.objective, "updates_per_step", 1))
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.fp16 else None

    def _setup_state(self, eval_callbacks) -> None:
        """4. Where the run stands (the checkpoint's, when resuming), the tracker and the loop's parts."""
        from tunelab.model.loader import enable_gradient_checkpointing
        from tunelab.train.fast.memory import offload_for_memory

        cfg, dist, run_dir, model = self.cfg, self.dist, self.run_dir, self.model
        self.state = TrainerState()
        if self.resume_path is not None:
            self.state = _load_checkpoint(self.resume_path, model, self.optimizer, self.scheduler, dist,
                                          self.objective)
            if dist.is_main:
                print(f"resumed from {self.resume_path} at step {self.state.global_step}", file=sys.stderr)
        if dist.is_main:
            save_config(self.user_cfg, run_dir / "config.yaml")
            if self.mixture:
                write_json_atomic(run_dir / "data_mixture.json", self.mixture)
        self.tracker = (Tracker(run_dir, cfg.report_to, self.total_steps, self.state.global_step, cfg.disable_tqdm,
                                config=self.user_cfg.to_dict(), plot=cfg.plot_loss)
                        if dist.is_main else distributed.SilentTracker(run_dir / LOG_NAME))
        self.start_step = self.state.global_step
        self.window = LogWindow()
        self.pending: list[tuple[int, StepStats]] = []  # steps whose loss sums are still on the device
        self.stopped_early = False
        # LoRA checkpoints also hold the PEFT adapter, so any of them can be evaluated as is.
        adapter = ((lambda folder: save_final_weights(model, self.tokenizer, folder, cfg, dist, self.objective))
                   if cfg.finetuning_type == "lora" else None)
        self.checkpointer = Checkpointer(cfg, dist, run_dir, model, self.optimizer, self.scheduler, adapter,
                                         window_state=self.settled_window, objective=self.objective)
        self.evaluator = Evaluator(self, eval_callbacks)
        if self.resume_path is not None:
            self.evaluator.last_step = self._resume_logging()
        # The back-off retries a step on its own: across processes the ranks would have to agree on it.
        if cfg.oom_backoff and dist.enabled and dist.is_main:
            print("out-of-memory back-off: off under several processes (an out-of-memory error ends the run "
                  "with the keys to change)", file=sys.stderr)
        self.memory = MemoryBackoff(cfg.max_tokens_per_batch, enabled=cfg.oom_backoff and not dist.enabled,
                                    enable_checkpointing=lambda: enable_gradient_checkpointing(model),
                                    checkpointing=bool(cfg.gradient_checkpointing), log=self.tracker.note,
                                    enable_offload=lambda: offload_for_memory(model, cfg))

    # --- one step --------------------------------------------------------------------------

    def train_step(self, step: StepRows) -> None:
        """One optimizer step and its counters; an interrupt waits until weights, counters and
        log window agree (a checkpoint then holds all three)."""
        state, device = self.state, self.device
        first = state.global_step == self.start_step  # compilation and warm-up happen here
        first_cuda_step = first and device.type == "cuda"
        if first_cuda_step:
            torch.cuda.reset_peak_memory_stats(device)
            base_bytes = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        with _ctrl_c_after_step():
            stats = self.run_step(step)
            state.global_step += 1
            state.batch_in_epoch += step.slots
            state.tokens_seen += stats.real_tokens
            self.window.weight += stats.weight
            self.window.real_tokens += stats.real_tokens
            self.pending.append((state.global_step, stats))
            if (self.logs_now() or self.evaluator.due(state.global_step)
                    or self.checkpointer.due(state.global_step)):
                self.settle()  # the one wait for the device: queued training work is training time
            seconds = time.perf_counter() - started
            self.window.seconds += seconds  # training only: evaluations, saves excluded
            self.clock.add("first step" if first else "steps", seconds)
        self.tracker.advance()
        if first_cuda_step:
            self._calibrate(step, base_bytes)

    def run_step(self, step: StepRows) -> StepStats:
        """One optimizer step (this process's share of it), retried in smaller pieces if it runs
        out of memory (train/memory.py)."""
        model, objective, dist, rows = self.model, self.objective, self.dist, step.rows
        share = rank_share(step.ids, dist.rank, dist.world, self.share_lengths(step))
        if hasattr(objective, "rollout"):  # online stages: the step's prompts are sampled and scored first
            return rollout_step(model, objective, [[rows[i] for i in ids] for ids in share], self.optimizer,
                                self.scheduler, self.scaler, self.cfg, self.device)
        spare = objective.collate([rows[step.ids[0][0]]]) if dist.enabled else None

        def attempt(budget):
            batches = [objective.collate([rows[i] for i in ids]) for ids in self.micro_batches(step, share, budget)]
            totals = distributed.step_totals(step.ids, dist.world, lambda ids: self.micro_batches(step, ids, budget),
                                             step.totals, self.share_lengths(step)) if dist.enabled else None
            return optimizer_step(model, objective, batches, self.optimizer, self.scheduler, self.scaler, self.cfg,
                                  self.device, dist, spare, totals)

        # (a rank's share may be empty: a step of fewer samples than processes)
        return self.memory.run(self.state.global_step + 1, max((step.lengths[i] for ids in share for i in ids),
                                                               default=0),
                               largest_micro=lambda budget: self.largest_micro(step, share, budget),
                               attempt=attempt, reset=lambda: self.optimizer.zero_grad(set_to_none=True))

    def share_lengths(self, step: StepRows) -> Sequence[int] | None:
        """Padding-free batches cost their tokens: ranks get equal tokens, not equal sample counts."""
        return step.lengths if self.cfg.padding_free else None

    def micro_batches(self, step: StepRows, ids: list[list[int]], budget: int | None) -> list[list[int]]:
        """The step's samples as micro-batches: by token budget, or as the data cut them."""
        if budget is None:
            return ids
        return split_by_tokens([i for batch in ids for i in batch], step.lengths, budget,
                               padded=not self.cfg.padding_free)

    def largest_micro(self, step: StepRows, ids: list[list[int]], budget: int | None) -> int:
        return max((micro_batch_tokens(batch, step.lengths, padded=not self.cfg.padding_free)
                    for batch in self.micro_batches(step, ids, budget)), default=0)

    def _calibrate(self, step: StepRows, base_bytes: int) -> None:
        """After the first CUDA step: report its peak memory and size the token budget by it."""
        device, cfg, dist, memory = self.device, self.cfg, self.dist, self.memory
        self.tracker.note(f"step {self.state.global_step}: peak GPU memory "
                          f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} of "
                          f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB")
        if cfg.max_tokens_per_batch is not None and self.user_cfg.max_tokens_per_batch is None:
            memory.calibrate(device, base_bytes, self.largest_micro(
                step, rank_share(step.ids, dist.rank, dist.world, self.share_lengths(step)), memory.budget))
            if dist.enabled:  # every rank cuts every rank's share with one budget
                memory.budget = dist.all_min(memory.budget, device)

    # --- what happens between steps ---------------------------------------------------------

    def logs_now(self) -> bool:
        step = self.state.global_step
        return step % self.cfg.logging_steps == 0 or step == self.total_steps

    def settle(self) -> None:
        self.window.settle(self.pending, self.device, self.dist, self.run_dir)

    def settled_window(self) -> dict:
        """The open log window's sums, settled, as a checkpoint keeps them: a resumed curve equals this one."""
        self.settle()
        return asdict(self.window)

    def log(self) -> None:
        row = self.window.row(self.state.global_step, self.data.epoch_float(self.state),
                              self.scheduler.get_last_lr()[0])
        self.tracker.log(row)
        self.state.log_history.append(row)
        self.window = LogWindow()

    def checkpoint(self) -> Path:
        with self.clock.part("checkpoints"):
            return self.checkpointer.save(self.state)

    def end_epoch(self) -> None:
        if self.evaluator.due_at_epoch_end() and not self.stopped_early:
            self.stopped_early = self.evaluator.run(self.state)
            self.model.train()
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        if self.checkpointer.due_at_epoch_end():
            self.checkpoint()

    def _resume_logging(self) -> int | None:
        """Carry on the logged curve exactly where the checkpoint left it.

        Restores the open logging window (save_steps need not be a multiple of logging_steps)
        and writes the checkpoint step's row if an interrupt came before it was logged.
        Returns the step of the last evaluation if the log holds one at this step, so it is
        not repeated.
        """
        state, log_path = self.state, self.tracker.log_path
        self.window = LogWindow(**state.log_window)
        rows = [r for r in read_log(log_path) if r.get("step") == state.global_step] if log_path.exists() else []
        if self.logs_now():
            if any("loss" in r for r in rows):
                self.window = LogWindow()  # logged before the interrupt; the sums are spent
            elif self.window.weight:
                self.log()
        return state.global_step if any("eval_loss" in r for r in rows) else None

    # --- the end ---------------------------------------------------------------------------

    def finish(self) -> RunResult:
        """5. Final weights (the best checkpoint's if asked, else the last step's), tokenizer, model card."""
        dist, state, run_dir = self.dist, self.state, self.run_dir
        with self.clock.part("final save"):
            self._save_final()
        train_losses = [r["loss"] for r in state.log_history if "loss" in r]
        if dist.is_main:
            print(f"done: {state.global_step} steps in {self.clock.describe(state.global_step - self.start_step)}; "
                  f"weights, tokenizer, config and logs in {run_dir}", file=sys.stderr)
        return RunResult(run_dir, state.global_step, train_losses[-1] if train_losses else None,
                         self.evaluator.last_loss, state.best_metric, self.stopped_early)

    def _save_final(self) -> None:
        cfg, dist, state, run_dir = self.cfg, self.dist, self.state, self.run_dir
        if cfg.load_best_model_at_end and state.best_checkpoint:
            _load_best(Path(state.best_checkpoint), self.model, self.objective)
            if dist.is_main:
                print(f"loaded the best model ({cfg.metric_for_best_model}={state.best_metric:.4f}) from "
                      f"{state.best_checkpoint}", file=sys.stderr)
        save_final_weights(self.model, self.tokenizer, run_dir, cfg, dist, self.objective)
        if dist.is_main:
            write_run_card(run_dir, self.user_cfg, self.tokenizer)
        dist.barrier()


# --- the parts of the recipe -----------------------------------------------------------------

@dataclass
class StepRows:
    """One optimizer step's samples: `ids` are its micro-batches of indices into `rows`, in the
    one-process order (each process takes its `rank_share`); `totals` weighs any row alike on every rank."""

    rows: Sequence
    lengths: Sequence[int]
    ids: list[list[int]]
    totals: distributed.RowTotals
    slots: int = 0  # micro-batch places of the epoch's order it used (folded rows leave some empty)

    def __post_init__(self):
        self.slots = self.slots or len(self.ids)


def planned_tokens(rows: list | BlockStream, cfg: TunelabConfig, world: int) -> int | None:
    """About how many tokens each process will train on (epochs or max_steps); None when unknown."""
    rows_a_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    if isinstance(rows, BlockStream):
        return cfg.max_steps * rows_a_step * cfg.cutoff_len // world if cfg.max_steps > 0 else None
    tokens, data_rows = sum(len(r) for r in rows), sum(getattr(r, "rows", 1) for r in rows)
    if not data_rows:
        return None
    if cfg.max_steps > 0:  # a step takes rows_a_step rows of the user's data
        return int(cfg.max_steps * rows_a_step * tokens / data_rows) // world
    return int(cfg.num_train_epochs * tokens) // world


class EpochOrder:
    """The steps of an in-memory data set: each epoch's seeded order (`batch_order`) cut into
    optimizer steps of `step_micro` micro-batches, from where the state says the run is.

    Batches count rows of the user's data: a folded dialogue (data/fold.py) holds several, so an
    epoch has as many micro-batches and steps as the unfolded rows would (some micro-batches
    then stay empty, never a whole step): folding changes the cost, not the schedule."""

    def __init__(self, rows: list, cfg: TunelabConfig, step_micro: int, objective):
        self.rows, self.cfg, self.step_micro = rows, cfg, step_micro
        self.lengths = [len(r) for r in rows]
        self.row_counts = [getattr(r, "rows", 1) for r in rows]
        self.totals = distributed.RowTotals(objective, rows)
        self.micro_per_epoch = math.ceil(sum(self.row_counts) / cfg.per_device_train_batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / step_micro)
        self.order: list[list[int]] = []

    def describe(self) -> str | None:
        """The log line of a folded data set, else None."""
        rows, per_step = sum(self.row_counts), self.cfg.per_device_train_batch_size * self.step_micro
        if rows == len(self.row_counts):
            return None
        return (f"folded {rows} rows into {len(self.row_counts)} sequences; a step takes {per_step} rows' answers "
                f"as before ({self.steps_per_epoch} steps per epoch)")

    def steps(self, state: TrainerState) -> Iterator[StepRows]:
        """The rest of the state's epoch; the loop moves `state.batch_in_epoch` on after each step."""
        cfg = self.cfg
        self.order = batch_order(self.lengths, cfg.per_device_train_batch_size, cfg.seed, state.epoch,
                                 group_by_length=cfg.group_by_length and not cfg.packing, rows=self.row_counts,
                                 per_step=self.step_micro)
        while state.batch_in_epoch < len(self.order):
            slots = self.order[state.batch_in_epoch:state.batch_in_epoch + self.step_micro]
            yield StepRows(self.rows, self.lengths, [ids for ids in slots if ids], self.totals, len(slots))

    def epoch_done(self, state: TrainerState) -> bool:
        return state.batch_in_epoch >= len(self.order)

    def epoch_float(self, state: TrainerState) -> float:
        return state.epoch + state.batch_in_epoch / max(self.micro_per_epoch, 1)


class StreamSteps:
    """The steps of a stream (`stage: pt`, `streaming: true`; train/streaming.py): its blocks in
    arrival order, `step_micro` micro-batches of per_device_train_batch_size blocks a step, read
    only as the loop asks for the step. A pass over the stream is an epoch; a resumed run skips
    the blocks the state says were trained on. Every process reads the same stream and takes
    its `rank_share` of each step, as with an epoch's order."""

    steps_per_epoch = None  # unknown: max_steps says how long to train

    def __init__(self, stream: BlockStream, cfg: TunelabConfig, step_micro: int, objective):
        self.stream, self.objective = stream, objective
        self.batch_size = cfg.per_device_train_batch_size
        self.step_size = self.batch_size * step_micro  # blocks a step
        self.exhausted = False

    def steps(self, state: TrainerState) -> Iterator[StepRows]:
        skip = state.batch_in_epoch * self.batch_size
        blocks = self.stream.blocks(skip)
        self.exhausted = False
        while rows := list(itertools.islice(blocks, self.step_size)):
            ids = [list(range(i, min(i + self.batch_size, len(rows)))) for i in range(0, len(rows), self.batch_size)]
            yield StepRows(rows, [len(r) for r in rows], ids, distributed.RowTotals(self.objective, rows))
        self.exhausted = True
        if state.epoch == 0 and state.batch_in_epoch == 0:  # nothing trained on in a whole pass
            raise TunelabError("the stream holds no training data", where=", ".join(self.stream.cfg.dataset_paths),
                               fix="check the dataset (and val_size: the held-out records are never trained on)")

    def epoch_done(self, state: TrainerState) -> bool:
        return self.exhausted

    def epoch_float(self, state: TrainerState) -> float:
        return float(state.epoch)  # the stream's length is unknown: whole passes only


@dataclass
class LogWindow:
    """Running sums between two log lines (kept in checkpoints: a resumed curve equals this one)."""

    loss_sum: float = 0.0
    weight: int = 0
    real_tokens: int = 0
    seconds: float = 0.0
    grad_norms: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    def settle(self, pending: list[tuple[int, StepStats]], device, dist: Dist, run_dir: Path) -> None:
        """Add the loss, metric and grad-norm sums of the steps run since the last call (`pending`,
        their global step numbers and stats); stop at a loss that is not finite."""
        settled = settle_steps([step for _, step in pending], device, dist)
        for (number, _), (loss_sum, metrics, grad_norm) in zip(pending, settled):
            self.loss_sum += loss_sum
            for key, value in metrics.items():
                self.metrics[key] = self.metrics.get(key, 0.0) + value
            self.grad_norms.append(grad_norm)
            if not math.isfinite(self.loss_sum):
                raise TunelabError(f"the loss became {self.loss_sum} at step {number}", where=str(run_dir),
                                   fix="lower learning_rate, use bf16 instead of fp16, or check max_grad_norm")
        pending.clear()

    def row(self, step: int, epoch: float, learning_rate: float) -> dict:
        weight = max(self.weight, 1)
        return {"step": step, "epoch": round(epoch, 4), "loss": self.loss_sum / weight,
                "learning_rate": learning_rate,
                "grad_norm": sum(self.grad_norms) / max(len(self.grad_norms), 1),
                "tokens_per_second": self.real_tokens / max(self.seconds, 1e-9),
                **average_metrics(self.metrics, weight)}


new_window, _settle_window = LogWindow, LogWindow.settle  # the names tests/train/test_distributed.py uses


class RunClock:
    """Where a run's wall time went, for its closing line: set-up (data, model load), the first
    step (compilation and warm-up on the compiled path), the other steps, evaluation, checkpoints
    and the final save. A part timed inside another (a best-model checkpoint taken during an
    evaluation) counts once, in the inner one."""

    ORDER = ("set-up", "first step", "steps", "evaluation", "checkpoints", "final save")  # every part's name

    def __init__(self):
        self.started = time.perf_counter()
        self.parts: dict[str, float] = {}
        self._open: list[float] = []  # seconds spent in inner parts of each open part

    def add(self, name: str, seconds: float) -> None:
        self.parts[name] = self.parts.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def part(self, name: str):
        start = time.perf_counter()
        self._open.append(0.0)
        try:
            yield
        finally:
            spent, inner = time.perf_counter() - start, self._open.pop()
            self.add(name, spent - inner)
            if self._open:
                self._open[-1] += spent

    def describe(self, steps: int) -> str:
        """`196 s (set-up 21 s, first step 84 s, 125 more steps 22 s, evaluation 41 s, ...)`"""
        names = {"steps": f"{max(steps - 1, 0)} more steps"}
        parts = ", ".join(f"{names.get(name, name)} {self.parts[name]:.0f} s" for name in self.ORDER
                          if name in self.parts)
        return f"{time.perf_counter() - self.started:.0f} s ({parts})"


class Evaluator:
    """When to evaluate (eval_strategy, eval_steps, eval_on_start, the end) and what follows:
    the validation loss, the eval sets and task callbacks, the best model, early stopping."""

    def __init__(self, trainer: Trainer, callbacks=()):
        self.trainer, self.cfg, self.callbacks = trainer, trainer.cfg, callbacks
        self.last_loss: float | None = None
        self.last_step: int | None = None  # the step of the last evaluation (not repeated on resume)

    def due(self, step: int) -> bool:
        return self.cfg.eval_strategy == "steps" and step % self.cfg.eval_steps == 0

    def due_at_epoch_end(self) -> bool:
        return self.cfg.eval_strategy == "epoch"

    def at_start(self, state: TrainerState, resumed: bool, total_steps: int) -> None:
        if self.cfg.eval_strategy != "no" and self.cfg.eval_on_start and state.global_step == 0 and self.last_step != 0:
            self.run(state)  # the untuned model's validation loss: what training must beat
        elif (resumed and self.due(state.global_step) and 0 < state.global_step < total_steps
              and self.last_step != state.global_step):
            self.run(state)  # interrupted during this step's evaluation: its row is still owed

    def at_end(self, state: TrainerState, stopped_early: bool) -> None:
        t, cfg = self.trainer, self.cfg
        if stopped_early:
            t.tracker.bar.write(f"early stopping at step {state.global_step}: no improvement of "
                                f"{cfg.metric_for_best_model} in {cfg.early_stopping_patience} evaluations "
                                f"(best {state.best_metric:.4f})")
        elif cfg.eval_strategy != "no" and self.last_step != state.global_step:
            self.run(state)  # the final model is always evaluated
        elif cfg.eval_strategy == "no" and t.probes:  # no evaluations: the eval sets still get the end's numbers
            t.tracker.log({"step": state.global_step, **t.probes.losses(t.model, t.device, t.dist)})

    def run(self, state: TrainerState) -> bool:
        """Validation loss; best-model bookkeeping; returns True when early stopping triggers."""
        with self.trainer.clock.part("evaluation"):
            return self._run(state)

    def _run(self, state: TrainerState) -> bool:
        t, cfg = self.trainer, self.cfg
        eval_loss, eval_metrics = evaluate(t.model, t.objective, t.eval_rows, cfg, t.device, t.dist)
        self.last_loss, self.last_step = eval_loss, state.global_step
        after_evaluation(t.scheduler, eval_loss)  # reduce_lr_on_plateau / greedy follow the validation loss
        row = {"step": state.global_step, "epoch": round(t.data.epoch_float(state), 4), "eval_loss": eval_loss}
        if getattr(t.objective, "perplexity", False):
            row["eval_perplexity"] = perplexity(eval_loss)
        row |= {f"eval_{k}": v for k, v in eval_metrics.items()}
        if t.probes:
            row |= t.probes.losses(t.model, t.device, t.dist)
        for callback in self.callbacks:
            row |= {f"eval_{k}": v for k, v in callback(t.model, t.tokenizer, state.global_step).items()}
        t.tracker.log(row)
        value = _best_metric_value(row, cfg.metric_for_best_model)
        if _improves(value, state.best_metric, cfg):
            state.best_metric = value
            state.evals_without_improvement = 0
            if cfg.load_best_model_at_end:
                # Named before saving, so the checkpoint's own state already knows it is the best.
                state.best_checkpoint = str(checkpoint_path(t.run_dir, state.global_step))
                t.checkpoint()
        else:
            state.evals_without_improvement += 1
        patience = cfg.early_stopping_patience
        return patience is not None and state.evals_without_improvement >= patience


class Checkpointer:
    """When to save (save_strategy) and how: one process and DDP write one folder from rank 0,
    FSDP writes shards from every rank, DeepSpeed its engine's partitions in the same atomic
    folder. Old ones are rotated (save_total_limit), the best one kept."""

    def __init__(self, cfg: TunelabConfig, dist: Dist, run_dir: Path, model, optimizer, scheduler,
                 adapter, window_state, objective=None):
        self.cfg, self.dist, self.run_dir, self.objective = cfg, dist, run_dir, objective
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.adapter = adapter  # folder -> the PEFT adapter saved beside the checkpoint (LoRA), or None
        self.window_state = window_state  # () -> the open log window, settled

    def due(self, step: int) -> bool:
        return self.cfg.save_strategy == "steps" and step % self.cfg.save_steps == 0

    def due_at_epoch_end(self) -> bool:
        return self.cfg.save_strategy == "epoch"

    def save(self, state: TrainerState) -> Path:
        dist, run_dir = self.dist, self.run_dir
        state.log_window = self.window_state()
        if dist.strategy == "fsdp":
            from tunelab.train.sharded_checkpoint import save_sharded_checkpoint

            path = save_sharded_checkpoint(run_dir, self.model, self.optimizer, self.scheduler, state, dist,
                                           extra_save=self.adapter)
        elif dist.strategy == "deepspeed":  # the engine's own partitions, in the same atomic folder
            path = self.objective.save_checkpoint(run_dir, self.scheduler, state, dist, extra_save=self.adapter)
        else:  # DDP: every rank holds the same weights, rank 0 writes the usual checkpoint
            path = checkpoint_path(run_dir, state.global_step)
            if dist.is_main:
                save_checkpoint(run_dir, self.model, self.optimizer, self.scheduler, state, extra_save=self.adapter)
        if dist.is_main:
            rotate_checkpoints(run_dir, self.cfg.save_total_limit, keep=state.best_checkpoint)
        dist.barrier()
        return path


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


def _load_checkpoint(path: Path, model, optimizer, scheduler, dist: Dist, objective) -> TrainerState:
    """Sharded (FSDP) checkpoints load on any number of processes; the others on one or DDP;
    DeepSpeed's on DeepSpeed (train/deepspeed.py)."""
    from tunelab.train.deepspeed import is_deepspeed_checkpoint, load_deepspeed_checkpoint
    from tunelab.train.sharded_checkpoint import is_sharded, load_sharded_checkpoint

    if dist.strategy == "deepspeed" or is_deepspeed_checkpoint(path):
        return load_deepspeed_checkpoint(path, objective, scheduler, dist)
    if is_sharded(path):
        return load_sharded_checkpoint(path, model, optimizer, scheduler, dist)
    if dist.strategy == "fsdp":
        raise TunelabError(f"{path} was written by a DDP or one-process run and cannot be sharded on load",
                           where="resume_from_checkpoint",
                           fix="resume with distributed_strategy=ddp, or on one process")
    return load_checkpoint(path, model, optimizer, scheduler)


def _load_best(path: Path, model, objective) -> None:
    from safetensors.torch import load_file

    from tunelab.train.deepspeed import is_deepspeed_checkpoint
    from tunelab.train.sharded_checkpoint import is_sharded, load_sharded_weights

    if is_deepspeed_checkpoint(path):
        objective.load_weights(path)
    elif is_sharded(path):
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
