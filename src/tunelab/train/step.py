"""One training step and one validation pass, as every stage runs them.

The loop (`loop.py`) decides *when* to step, evaluate and save; this module says *what* a
step is, so objectives (`objectives/`), benchmarks and tests call exactly the code the
trainer runs:

    optimizer_step(model, objective, micro_batches, ...)   accumulate, clip, step, schedule (no device wait)
    settle_steps(steps, device, dist)                       the steps' loss and metric sums, read at once
    rollout_step(model, objective, micro_rows, ...)        online stages: sample and score, then update
    evaluate(model, objective, rows, cfg, device)           mean validation loss and metrics
    autocast(cfg, device), to_device(batch, device)         the precision and placement of a batch
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from tunelab.config import TunelabConfig
from tunelab.train import distributed
from tunelab.train.distributed import SINGLE, Dist
from tunelab.train.memory import OptimizerOutOfMemory


@dataclass
class StepStats:
    """One optimizer step. The loss and metric sums stay on the device, as this rank's per
    micro-batch values, until `settle_steps` reads them (at logging and checkpoint steps)."""

    losses: list  # summed loss of each counting micro-batch (0-d device tensors)
    metrics: dict[str, list]  # each metric's sums, per counting micro-batch (tensors or floats)
    weight: int  # what the loss is averaged over (the global step's)
    real_tokens: int  # non-pad tokens (the global step's)
    grad_norm: torch.Tensor | float


def optimizer_step(model, objective, micro_batches: list[dict], optimizer, scheduler, scaler,
                   cfg: TunelabConfig, device, dist: Dist = SINGLE, spare: dict | None = None,
                   totals: distributed.StepTotals | None = None) -> StepStats:
    """One optimizer step: accumulate the micro-batches' gradients, clip, step, schedule.

    Nothing here waits for the device or asks the other ranks (fp16's loss scaler aside): the
    step's weight comes from the host. Under several processes `micro_batches` is this rank's
    share of the global step, `totals` the global step's (`distributed.step_totals`, which every
    rank computes alike) and `spare` a batch to run at zero weight should the share be short.
    A function of its own so benchmarks time exactly the code the trainer runs.
    """
    if totals is None:
        if dist.enabled:
            raise ValueError("several processes: pass the global step's totals (distributed.step_totals)")
        totals = distributed.StepTotals(sum(objective.weight(b) for b in micro_batches),
                                        sum(int(b["attention_mask"].sum()) for b in micro_batches),
                                        len(micro_batches))
    # Divide by the weight of the whole global step (every rank's): the loss one big batch would
    # give. DDP and FSDP average gradients over ranks; multiplying by the world size undoes it.
    scale = dist.world / max(totals.weight, 1)
    passes = distributed.padded_passes(micro_batches, totals.passes, lambda: spare)
    losses, metrics = [], {}
    for i, (batch, counts) in enumerate(passes):
        batch = to_device(batch, device)
        with grad_sync(objective, last=i == len(passes) - 1):
            with autocast(cfg, device):
                loss_sum, batch_metrics = objective.loss(model, batch)
            loss = loss_sum * (scale if counts else 0.0)
            if hasattr(objective, "backward"):  # DeepSpeed: its engine reduces at the step's last micro-batch
                objective.backward(loss, last=i == len(passes) - 1)
            else:
                (scaler.scale(loss) if scaler else loss).backward()
        for key, value in batch_metrics.items():
            values = metrics.setdefault(key, [])  # a padding pass still names its keys: ranks settle alike
            if counts:
                values.append(value)
        if counts:
            losses.append(loss_sum.detach())
    try:
        if hasattr(objective, "engine_step"):  # DeepSpeed clips, steps and zeroes the gradients itself
            grad_norm = objective.engine_step()
            scheduler.step()
            return StepStats(losses, metrics, int(totals.weight), int(totals.real_tokens), grad_norm)
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = distributed.grad_norm_tensor(torch.nn.utils.clip_grad_norm_(
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
    return StepStats(losses, metrics, int(totals.weight), int(totals.real_tokens), grad_norm)


def settle_steps(steps: list[StepStats], device, dist: Dist = SINGLE) -> list[tuple[float, dict[str, float], float]]:
    """(loss sum, metric sums, grad norm) of each step on the host, the global step's: one copy
    from the device, and under several processes one all-reduce, for all of them. Each step's
    micro-batch values are added in order in float64, as a step-by-step read would add them."""
    keys = sorted({key for step in steps for key in step.metrics})
    device_values = [v for step in steps for v in (*step.losses, *(x for k in keys for x in step.metrics.get(k, ())),
                                                   step.grad_norm)]
    tensors = [v.detach().reshape(()) for v in device_values if isinstance(v, torch.Tensor)]
    # (grad norms of CPU-offloaded weights live in CPU memory: one stack needs one device)
    read = iter(torch.stack([t.to(tensors[0].device) for t in tensors]).cpu().tolist() if tensors else [])
    host = iter([next(read) if isinstance(v, torch.Tensor) else float(v) for v in device_values])
    sums, norms = [], []
    for step in steps:
        loss = sum(next(host) for _ in step.losses)
        sums.append([loss, *(sum(next(host) for _ in step.metrics.get(k, ())) for k in keys)])
        norms.append(next(host))
    if dist.enabled and sums:
        width = len(keys) + 1
        flat = dist.all_sum([v for row in sums for v in row], device)
        sums = [flat[i:i + width] for i in range(0, len(flat), width)]
    return [(row[0], dict(zip(keys, row[1:])), norm) for row, norm in zip(sums, norms)]


def grad_sync(objective, last: bool):
    """DDP all-reduces on the last micro-batch of a step only (see distributed.DistributedObjective)."""
    return objective.grad_sync(last) if hasattr(objective, "grad_sync") else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, objective, rows: list, cfg: TunelabConfig, device,
             dist: Dist = SINGLE) -> tuple[float, dict[str, float]]:
    """Mean validation loss (per token for SFT, per pair for preferences) and mean metrics.
    Several processes: rank r scores batches r, r + world, ...; the sums are all-reduced."""
    model.eval()
    if hasattr(objective, "validate"):  # online stages: generate and score, no teacher-forced loss
        return objective.validate(model, rows)
    sums = {"loss": 0.0, "weight": 0, "metrics": {}}

    def score(chunk: list, counts: bool) -> None:
        """Add one batch's loss (a padding pass of a short rank adds nothing); on one process a
        batch that runs out of memory is scored in two halves."""
        batch = objective.collate(chunk)
        try:
            with autocast(cfg, device):
                loss_sum, batch_metrics = objective.loss(model, to_device(batch, device))
        except torch.OutOfMemoryError:
            if len(chunk) == 1 or dist.enabled:
                raise
            oom = True
        else:
            oom = False
            if counts:
                sums["loss"] += float(loss_sum)
                sums["weight"] += objective.weight(batch)
            for key, value in batch_metrics.items():  # a padding pass names its keys: ranks all-reduce alike
                sums["metrics"][key] = sums["metrics"].get(key, 0.0) + (value if counts else 0.0)
        if oom:  # outside the except block, so the failed try's tensors are freed first
            del batch
            torch.cuda.empty_cache()
            score(chunk[:len(chunk) // 2], counts)
            score(chunk[len(chunk) // 2:], counts)

    ordered = sorted(rows, key=len)  # similar lengths: little padding
    size = cfg.per_device_eval_batch_size
    chunks = [ordered[start:start + size] for start in range(0, len(ordered), size)]
    for chunk, counts in distributed.padded_passes(chunks[dist.rank::dist.world], -(-len(chunks) // dist.world),
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


def autocast(cfg: TunelabConfig, device: torch.device):
    if cfg.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if cfg.fp16:
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def rollout_step(model, objective, micro_rows: list[list], optimizer, scheduler, scaler, cfg: TunelabConfig,
                 device) -> StepStats:
    """One step of an online stage (grpo, ppo): the objective turns the step's prompts into scored
    completions, then `updates_per_step` optimizer steps train on them. Adds the step's speed:
    completions per second and the share of the step spent generating."""
    started = time.perf_counter()
    rollouts = objective.rollout(model, micro_rows)
    total = None
    for _ in range(objective.updates_per_step):
        batches = [objective.collate(rows) for rows in rollouts]
        total = merge_stats(total, optimizer_step(model, objective, batches, optimizer, scheduler, scaler, cfg,
                                                  device))
    seconds = max(time.perf_counter() - started, 1e-9)
    completions = sum(len(rows) for rows in rollouts)
    # Metrics are sums the log divides by the weight: scale these so they average to the step's value.
    total.metrics["samples_per_second"] = [completions / seconds * total.weight]
    total.metrics["generation_share"] = [objective.generation_seconds / seconds * total.weight]
    return total


def merge_stats(a: StepStats | None, b: StepStats) -> StepStats:
    if a is None:
        return b
    metrics = {key: list(values) for key, values in a.metrics.items()}
    for key, values in b.metrics.items():
        metrics.setdefault(key, []).extend(values)
    return StepStats(a.losses + b.losses, metrics, a.weight + b.weight, a.real_tokens + b.real_tokens,
                     (a.grad_norm + b.grad_norm) / 2)
