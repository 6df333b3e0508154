"""Training on several processes (GPUs, nodes) through torch.distributed: DDP or FSDP2.

    launcher (torchrun / accelerate launch / `tunelab train --nproc N`)
      -> WORLD_SIZE, RANK, LOCAL_RANK in the environment
      -> init_distributed(cfg): process group (nccl on CUDA, gloo on CPU), this rank's device
      -> wrap(model, objective, cfg, dist): the engine
           ddp   LoRA / QLoRA: each rank a full copy, only the trainable weights all-reduced
           fsdp  full fine-tuning (or LoRA on models one card cannot hold): FSDP2 `fully_shard`
                 per decoder layer, then the root; bf16 compute, fp32 reduce, optional CPU offload;
                 QLoRA's frozen quantized weights stay whole on every rank (`quantized_params`)
      -> every optimizer step: the global list of sample ids split by `rank_share`,
         the loss divided by the target tokens of the whole global step (all ranks),
         which every rank computes on the host (`step_totals`): no collective call per step

The math is the one-process math: a global step is the same samples in the same order
whatever the number of processes, each rank's summed loss is divided by the global
target-token count, and gradients are summed across ranks (DDP and FSDP average them,
so the loss is multiplied by the world size first). N GPUs with per-device batch b and
accumulation a train exactly what one GPU trains with accumulation N * a.

The objective's loss runs *inside* the wrapped module's forward (`_LossModule`), so the
engine's hooks (DDP's reducer, FSDP's all-gathers) see every call, including the fast
path's direct use of the decoder and the LM-head weight.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from tunelab.config import TunelabConfig
from tunelab.errors import TunelabError

# Environments of launchers that start several processes without torch's variables.
FOREIGN_LAUNCHERS = {
    "OMPI_COMM_WORLD_SIZE": "mpirun (Open MPI)",
    "PMI_SIZE": "an MPI/PMI launcher",
    "SLURM_NTASKS": "srun (Slurm)",
}


@dataclass
class Dist:
    """Where this process stands among the others; world == 1 is the plain single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp
    owns_group: bool = False  # this run created the process group (and ends it)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_sum(self, values: list[float], device) -> list[float]:
        """Element-wise sum over all ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def all_min(self, value: int, device) -> int:
        """The smallest of the ranks' values: for settings each rank sized from its own memory."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())


SINGLE = Dist()


# --- launch ------------------------------------------------------------------------------------

def launcher_env() -> dict[str, int] | None:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun and `accelerate launch` set them, or None when
    this process was not started by a launcher. A multi-process launcher whose variables
    tunelab cannot read fails here, before N copies train into one folder."""
    if "WORLD_SIZE" not in os.environ:
        for var, name in FOREIGN_LAUNCHERS.items():
            if int(os.environ.get(var, "1") or 1) > 1:
                raise TunelabError(
                    f"started by {name} with {var}={os.environ[var]}, but WORLD_SIZE/RANK/LOCAL_RANK are not set, "
                    "so every process would train its own copy", where="launcher",
                    fix="start through torchrun (torchrun --nproc-per-node N -m tunelab.cli train cfg.yaml, "
                        "one torchrun per node with --nnodes/--node-rank/--rdzv-endpoint) or accelerate launch")
        return None
    env = {}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        value = os.environ.get(var)
        if value is None or not value.strip().isdigit():
            raise TunelabError(f"WORLD_SIZE is set but {var}={value!r} is not a number", where="launcher",
                               fix="start through torchrun or accelerate launch, which set all three")
        env[var] = int(value)
    if env["RANK"] >= env["WORLD_SIZE"]:
        raise TunelabError(f"RANK={env['RANK']} but WORLD_SIZE={env['WORLD_SIZE']}", where="launcher",
                           fix="start through torchrun or accelerate launch")
    return env


def choose_strategy(cfg: TunelabConfig) -> str:
    """auto: DDP when the trainable part is small (LoRA/QLoRA), FSDP2 when every weight trains;
    `accelerate launch` configured for FSDP asks for FSDP; the deepspeed key for DeepSpeed."""
    if cfg.deepspeed:
        if cfg.distributed_strategy != "auto":
            raise TunelabError(f"deepspeed={cfg.deepspeed} and distributed_strategy={cfg.distributed_strategy} "
                               "name two engines", where="config", fix="drop one of the two keys")
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise TunelabError("accelerate launch was configured for DeepSpeed, but the config has no deepspeed key",
                           where="launcher", fix="set deepspeed: zero2, zero3 or path/to/ds_config.json in the config "
                                                 "(tunelab hands it to accelerate's DeepSpeed plugin)")
    if cfg.distributed_strategy != "auto":
        return cfg.distributed_strategy
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return "ddp" if cfg.finetuning_type == "lora" else "fsdp"


def init_distributed(cfg: TunelabConfig) -> Dist:
    """Join the process group the launcher set up; returns SINGLE when there is none."""
    env = launcher_env()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if env is not None and cfg.nproc_per_node > 1 and local_world and local_world != cfg.nproc_per_node:
        raise TunelabError(f"nproc_per_node={cfg.nproc_per_node} but the launcher started {local_world} "
                           "processes on this node", where="config",
                           fix="drop nproc_per_node when starting through torchrun or accelerate launch")
    if env is None and cfg.nproc_per_node > 1:
        raise TunelabError(f"nproc_per_node={cfg.nproc_per_node}, but this process was not started by a launcher",
                           where="config", fix="start with `tunelab train cfg.yaml` (it launches torchrun itself) or "
                                               "torchrun --nproc-per-node N -m tunelab.cli train cfg.yaml")
    single = env is None or env["WORLD_SIZE"] == 1
    if single and cfg.deepspeed:
        raise TunelabError(f"deepspeed={cfg.deepspeed} on one process: ZeRO shards across several", where="config",
                           fix="start several processes (tunelab train cfg.yaml --nproc N, torchrun or accelerate "
                               "launch), or drop the deepspeed key")
    strategy = "none" if single else choose_strategy(cfg)
    if strategy == "deepspeed":
        _check_deepspeed(cfg)
    if cfg.fsdp_cpu_offload and strategy != "fsdp":
        raise TunelabError("fsdp_cpu_offload=true but this run does not shard with FSDP "
                           f"({'one process' if single else 'distributed_strategy resolves to ' + strategy})",
                           where="config", fix="set distributed_strategy=fsdp and start several processes "
                                               "(nproc_per_node=N), or drop fsdp_cpu_offload")
    if single:
        return SINGLE
    from tunelab.train.objectives import objective_class

    if not getattr(objective_class(cfg.stage), "multi_process", True):
        raise TunelabError(f"stage={cfg.stage} runs on one process for now", where="config",
                           fix="start it without torchrun / nproc_per_node (one GPU)")
    if strategy == "fsdp" and not objective_class(cfg.stage).sharded:
        raise TunelabError(f"stage={cfg.stage} is not supported with FSDP yet (its reference model and "
                           "precomputed log-probs run outside the sharded forward)", where="config",
                           fix="use finetuning_type=lora with distributed_strategy=ddp for preference stages")
    if strategy == "fsdp" and cfg.fp16:
        raise TunelabError("fp16 with FSDP is not supported (the loss scaler would skip steps on some ranks only)",
                           where="config", fix="use bf16=true (Ampere or newer GPUs), or distributed_strategy=ddp")
    if strategy == "fsdp" and cfg.pissa_init:
        raise TunelabError("pissa_init with FSDP is not supported (the adapter conversion at save time needs "
                           "unsharded weights)", where="config", fix="use distributed_strategy=ddp with pissa_init")
    dist = Dist(env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], strategy)
    if _wants_cuda(cfg):
        torch.cuda.set_device(_cuda_index(cfg, dist))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if _wants_cuda(cfg) else "gloo")
        dist.owns_group = True
    return dist


def _check_deepspeed(cfg: TunelabConfig) -> None:
    from tunelab.train.deepspeed import ds_config, require_deepspeed

    require_deepspeed()
    ds_config(cfg)  # a bad JSON or stage fails here, before the model loads
    if cfg.quantization_bit:
        raise TunelabError("QLoRA (quantization_bit) with DeepSpeed is not supported", where="config",
                           fix="use distributed_strategy=ddp for QLoRA (drop the deepspeed key)")


def _wants_cuda(cfg: TunelabConfig) -> bool:
    return cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())


def _cuda_index(cfg: TunelabConfig, dist: Dist) -> int:
    if cfg.device not in ("auto", "cuda"):
        raise TunelabError(f"device={cfg.device} pins every one of the {dist.world} processes to one GPU",
                           where="config", fix="use device=auto: each process takes cuda:LOCAL_RANK")
    if dist.local_rank >= torch.cuda.device_count():
        raise TunelabError(f"LOCAL_RANK={dist.local_rank} but this node has {torch.cuda.device_count()} GPU(s)",
                           where="launcher", fix=f"start at most {torch.cuda.device_count()} processes per node")
    return dist.local_rank


def device_for(cfg: TunelabConfig, dist: Dist) -> str:
    """The device name this rank trains on: `auto` under a launcher means cuda:LOCAL_RANK."""
    if dist.enabled and _wants_cuda(cfg):
        return f"cuda:{_cuda_index(cfg, dist)}"
    return cfg.device


def shutdown(dist: Dist) -> None:
    if dist.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def torchrun_command(nproc: int, rendezvous: list[str], tunelab_args: list[str]) -> list[str]:
    """`tunelab train ... --nproc N` re-executed through torchrun (torch.distributed.run)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *rendezvous,
            "-m", "tunelab.cli", "train", *tunelab_args]


# --- data: each rank's share of a global step ---------------------------------------------------

def rank_share(step_ids: list[list[int]], rank: int, world: int,
               lengths: Sequence[int] | None = None) -> list[list[int]]:
    """This rank's micro-batches of one optimizer step.

    `step_ids` is the step's global list (micro-batches of sample ids, in the one-process
    order). Without `lengths` its samples are cut into `world` contiguous shares of equal
    count and each share is re-cut into micro-batches as large as the step's: with `world * a`
    full micro-batches rank r gets exactly micro-batches r*a .. r*a+a-1.

    With `lengths` (padding-free batches, whose cost is their token count) the step's samples
    are dealt into `world * a` bins of about equal tokens instead (longest first, each to the
    lightest bin) and rank r gets bins r*a .. r*a+a-1: the step waits for its slowest rank, and
    equal counts of samples of mixed lengths left ranks waiting (the loss is the same either
    way: every rank divides by the global step's target tokens). A short last step leaves some
    ranks with fewer (or no) samples; `optimizer_step` pads their passes with zero-weight ones.
    """
    if world == 1:
        return step_ids
    ids = [i for batch in step_ids for i in batch]
    if lengths is not None:
        return _token_balanced(ids, max(1, len(step_ids) // world), world, lengths)[rank]
    size = max((len(b) for b in step_ids), default=1)
    per, extra = divmod(len(ids), world)
    start = rank * per + min(rank, extra)
    share = ids[start:start + per + (1 if rank < extra else 0)]
    return [share[i:i + size] for i in range(0, len(share), size)]


def _token_balanced(ids: list[int], per_rank: int, world: int, lengths: Sequence[int]) -> list[list[list[int]]]:
    """`ids` dealt into world x per_rank bins of about equal tokens (greedy, longest first; ties
    go to the lower bin, so every rank computes the same bins). Empty bins are dropped."""
    bins: list[list[int]] = [[] for _ in range(world * per_rank)]
    load = [0] * len(bins)
    for i in sorted(ids, key=lambda i: (-lengths[i], i)):
        lightest = min(range(len(bins)), key=lambda b: (load[b], b))
        bins[lightest].append(i)
        load[lightest] += lengths[i]
    return [[sorted(b) for b in bins[r * per_rank:(r + 1) * per_rank] if b] for r in range(world)]


@dataclass
class StepTotals:
    """What the loop must know of a whole optimizer step before and after running it."""

    weight: int  # the objective's weight (target tokens, pairs) of the global step: the loss divisor
    real_tokens: int  # non-pad tokens of the global step (logged tokens/s)
    passes: int  # micro-batches each rank runs: the most any rank's share is cut into


class RowTotals:
    """Each training row's objective weight and real tokens, from the row collated alone, cached.

    Both are sums over rows (target tokens or examples; attention-mask ones), so any rank totals
    any micro-batch, another rank's included, on the host: every rank builds the same global
    step plan from the same data, seed and token budget, and no rank has to ask the others.
    """

    def __init__(self, objective, rows: list):
        self.objective = objective
        self.rows = rows
        self.cache: dict[int, tuple[int, int]] = {}

    def __call__(self, i: int) -> tuple[int, int]:
        if i not in self.cache:
            batch = self.objective.collate([self.rows[i]])
            self.cache[i] = (int(self.objective.weight(batch)), int(batch["attention_mask"].sum()))
        return self.cache[i]


def step_totals(step_ids: list[list[int]], world: int, split, row_totals: RowTotals,
                lengths: Sequence[int] | None = None) -> StepTotals:
    """The global step's totals as every rank computes them alike; `split(share)` cuts a rank's
    share into its micro-batches (by token budget or as they come); `lengths` as for `rank_share`."""
    weight, real = map(sum, zip(*(row_totals(i) for ids in step_ids for i in ids)))
    passes = max(len(split(rank_share(step_ids, r, world, lengths))) for r in range(world))
    return StepTotals(weight, real, passes)


def padded_passes(micro_batches: list, passes: int, filler) -> list[tuple[object, bool]]:
    """(batch, counts) pairs, `passes` of them on every rank: sharded weights are gathered by
    collective calls in each forward, so a rank with fewer micro-batches repeats one at zero weight."""
    padded = [(b, True) for b in micro_batches]
    while len(padded) < passes:
        padded.append((micro_batches[0] if micro_batches else filler(), False))
    return padded


# --- engines ------------------------------------------------------------------------------------

class _LossModule(nn.Module):
    """model + objective as one module, so the engine's forward hooks wrap the whole loss."""

    def __init__(self, model, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict | None, run=None):
        """The loss of `batch`, or `run()`: work that calls the model outside the loss (a reference's
        log-probs) with the engine's weights gathered as for a forward."""
        return run() if run is not None else self.objective.loss(self.model, batch)


class DistributedObjective:
    """The stage's objective with `loss` routed through the wrapped module; the rest delegates."""

    def __init__(self, objective, engine: nn.Module, dist: Dist):
        self.inner = objective
        self.engine = engine
        self.dist = dist

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def loss(self, model, batch: dict):
        return self.engine(batch)

    def setup(self, model, device) -> None:
        """The stage's set-up (a preference stage's reference) on the wrapped model. FSDP: it runs
        inside the root's forward, so the root's weights (embeddings, LM head) are gathered for the
        calls it makes (reference log-probs) and the layers gather their own. A full fine-tuning
        reference is precomputed there rather than copied: a copy of sharded weights is no model."""
        if self.dist.strategy != "fsdp":
            return self.inner.setup(model, device)
        if self.inner.cfg.finetuning_type != "lora":
            self.inner.cfg = replace(self.inner.cfg, precompute_ref_log_probs=True)
        with torch.no_grad():
            self.engine(None, run=lambda: self.inner.setup(model, device))
        # The root and the last layer keep their weights gathered after a forward (reshard_after_forward
        # off); the optimizer, built next, must hold the shards or it updates copies FSDP discards.
        for module in self.engine.modules():
            if hasattr(module, "reshard") and hasattr(module, "unshard"):  # FSDPModule
                module.reshard()

    def grad_sync(self, last: bool):
        """DDP all-reduces once per optimizer step (the last micro-batch); FSDP reduce-scatters every
        micro-batch so gradients stay sharded."""
        if self.dist.strategy == "ddp" and not last:
            return self.engine.no_sync()
        return contextlib.nullcontext()


def wrap(model, objective, cfg: TunelabConfig, dist: Dist, device: torch.device):
    """Wrap for the strategy; returns the objective whose `loss` runs through the engine.

    `model` stays the user's module (FSDP2 shards it in place; DDP leaves it alone), so
    saving, parameter lists and `model.train()` work on it as before.
    """
    if not dist.enabled:
        return objective
    holder = _LossModule(model, objective)
    if dist.strategy == "deepspeed":  # DeepSpeed takes model and optimizer together: `prepare` comes later
        from tunelab.train.deepspeed import DeepSpeedObjective

        return DeepSpeedObjective(objective, holder, cfg)
    if dist.strategy == "ddp":
        engine = _ddp(holder, device)
    else:
        engine = _fsdp(holder, model, cfg, device)
    return DistributedObjective(objective, engine, dist)


def _ddp(holder: nn.Module, device: torch.device):
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # Only trainable weights are bucketed and all-reduced; every rank loaded the same frozen
    # base, so broadcasting it (gigabytes, or 4-bit tensors) at start-up is skipped.
    frozen = [n for n, p in holder.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(holder, frozen)
    # Buffers (rotary tables) are the same everywhere: no broadcast before each forward
    # (torch 2.13 renamed the switch).
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
    return DistributedDataParallel(
        holder, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=False, gradient_as_bucket_view=True, **no_buffer_sync)


def load_device(cfg: TunelabConfig, dist: Dist, device: torch.device) -> torch.device:
    """Where the model is loaded: FSDP shards from CPU memory, so no GPU ever holds the whole model;
    QLoRA is quantized by bitsandbytes while it places the weights on the GPU, so each GPU loads the
    (small) quantized model and FSDP shards only its float parts from there."""
    if dist.strategy == "fsdp" and not cfg.quantization_bit:
        return torch.device("cpu")
    return device


def quantized_params(model: nn.Module) -> set[nn.Parameter]:
    """Frozen weights stored quantized: integer storage (bitsandbytes' packed 4-bit `Params4bit`,
    LLM.int8's `Int8Params`) or a weight carrying its quantization state. FSDP leaves them out:
    sharding packed codes along dim 0 would split them from their per-block scales, and an
    all-gather would rebuild a plain tensor without the state that dequantizes it."""
    return {p for p in model.parameters()
            if not p.requires_grad and (not p.dtype.is_floating_point or hasattr(p, "quant_state"))}


def fsdp_precision(cfg: TunelabConfig, quantized: bool) -> tuple[torch.dtype | None, torch.dtype | None]:
    """FSDP2's (param_dtype, reduce_dtype): bf16/fp16 all-gathers and compute with fp32 gradient
    reduction (fp32 master weights in the shards). Under QLoRA the float weights (LoRA, norms,
    embeddings, head) keep the fp32 that PEFT's k-bit preparation gives them, as one GPU computes
    them: gathered in bf16 they trained measurably off the 1-GPU loss curve (docs/benchmarks.md)."""
    half = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
    if half is None or quantized:
        return None, None
    return half, torch.float32


def _fsdp(holder: nn.Module, model, cfg: TunelabConfig, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

    from tunelab.model.adapters import decoder_layers

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    # QLoRA: every rank keeps the whole quantized base (a 4-bit 7B model is ~4 GB), replicated and never
    # communicated (frozen: no gradient to reduce); LoRA weights, norms, embeddings and head are sharded.
    ignored = quantized_params(model) or None
    param_dtype, reduce_dtype = fsdp_precision(cfg, quantized=bool(ignored))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    offload = CPUOffloadPolicy() if cfg.fsdp_cpu_offload else OffloadPolicy()
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # The last layer's weights are needed again at once by backward: keep them gathered.
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload, ignored_params=ignored,
                    reshard_after_forward=i < len(layers) - 1)
    # The root holds embeddings, final norm and LM head; its forward is the whole loss.
    fully_shard(holder, mesh=mesh, mp_policy=mp, offload_policy=offload, ignored_params=ignored,
                reshard_after_forward=False)
    return holder


def grad_norm_tensor(norm) -> torch.Tensor:
    """clip_grad_norm_ over sharded (DTensor) gradients returns a DTensor; kept on the device."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm



class SilentTracker:
    """The tracker of ranks other than 0: logs, progress and plots are rank 0's alone. It reads
    rank 0's log (`log_path`, on the shared file system checkpoints need anyway) so that every
    rank takes the same decisions on resume."""

    def __init__(self, log_path: Path):
        self.log_path = Path(log_path)

    class _Bar:
        def write(self, *_args, **_kwargs) -> None:
            pass

    bar = _Bar()

    def log(self, row: dict) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
