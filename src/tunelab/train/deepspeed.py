"""DeepSpeed ZeRO-2/3 as a third engine beside DDP and FSDP2, through accelerate's DeepSpeed plugin.

    deepspeed: zero2 | zero3 | path/to/ds_config.json      (the key LLaMA-Factory users know)
      -> ds_config(cfg): ZeRO stage, bf16 / fp16, micro-batch size, gradient clipping; a user's
         JSON keeps its own settings, its "auto" values are filled from the tunelab config
         (as transformers' Trainer fills them)
      -> DeepSpeedObjective (distributed.wrap): model + objective as one module, as under DDP and
         FSDP; once the loop has built its optimizer, `prepare` hands both to
         accelerate.Accelerator(deepspeed_plugin=...). DeepSpeed then owns backward (gradient
         reduction), clipping and the optimizer step; the loop's scheduler keeps setting the
         learning rate of the optimizer it wraps.

Checkpoints are DeepSpeed's own (`engine.save_checkpoint`: each rank its ZeRO partitions of the
trainable weights and optimizer state) inside tunelab's atomic checkpoint folder, beside the scheduler,
every rank's RNG and the loop state (sharded_checkpoint.save_rank_checkpoint); they resume on the
same number of processes with the same ZeRO stage.

The loop's math is unchanged: every rank divides its summed loss by the global step's weight
times the world size (DeepSpeed averages gradients over ranks, as DDP does), and the step
boundary is the loop's (`set_gradient_accumulation_boundary`), whatever the number of micro-batches.
DeepSpeed is optional (`pip install 'tunelab[deepspeed]'`); the key without it is refused at start.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from tunelab.config import TunelabConfig
from tunelab.errors import TunelabError

STAGES = {"zero2": 2, "zero3": 3}
FOLDER, TAG = "deepspeed", "state"  # checkpoint-N/deepspeed/state/: the engine's files
LAYOUT = "tunelab.json"  # checkpoint-N/deepspeed/tunelab.json: the process count and ZeRO stage that wrote it


def require_deepspeed(where: str = "config") -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise TunelabError("deepspeed is set but the deepspeed package is not installed", where=where,
                           fix="pip install 'tunelab[deepspeed]' (or pip install deepspeed), or drop the deepspeed "
                               "key: distributed_strategy=fsdp shards weights, gradients and optimizer state as ZeRO-3")


def zero_stage(cfg: TunelabConfig) -> int | None:
    """The ZeRO stage `cfg.deepspeed` asks for (2 or 3), or None without DeepSpeed."""
    return ds_config(cfg)["zero_optimization"]["stage"] if cfg.deepspeed else None


def ds_config(cfg: TunelabConfig) -> dict:
    """The DeepSpeed config of `cfg.deepspeed` (zero2, zero3 or a JSON file), `auto` values filled."""
    name = cfg.deepspeed
    if name in STAGES:
        config = {"zero_optimization": {"stage": STAGES[name], "overlap_comm": True, "contiguous_gradients": True,
                                        "reduce_bucket_size": "auto"}}
        if name == "zero3":  # the final weights are gathered into one 16-bit state dict
            config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    else:
        path = Path(name)
        if not path.is_file():
            raise TunelabError(f"deepspeed={name} is neither zero2, zero3 nor an existing JSON file", where="config",
                               fix="set deepspeed: zero2, deepspeed: zero3 or the path of a DeepSpeed config JSON")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TunelabError(f"the DeepSpeed config is not valid JSON ({exc})", where=str(path),
                               fix="check the file with python -m json.tool") from None
        if not isinstance(config, dict):
            raise TunelabError("the DeepSpeed config must be a JSON object", where=str(path),
                               fix='write {"zero_optimization": {"stage": 2}, ...}')
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (2, 3):
        raise TunelabError(f"the DeepSpeed config asks for ZeRO stage {stage}; tunelab drives ZeRO-2 and ZeRO-3",
                           where=name, fix='set "zero_optimization": {"stage": 2} or 3 (stage 0/1: use '
                                           "distributed_strategy=ddp, which tunelab runs without DeepSpeed)")
    for unsupported in ("optimizer", "scheduler"):
        if unsupported in config:
            raise TunelabError(f"the DeepSpeed config sets its own {unsupported}, which tunelab builds itself",
                               where=name, fix=f'remove "{unsupported}" and use the config keys (optim, '
                                               "learning_rate, lr_scheduler_type, warmup_ratio, ...)")
    # The loop marks every step's boundary and scales the loss itself: DeepSpeed must not do either.
    if config.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise TunelabError(f"the DeepSpeed config sets gradient_accumulation_steps={config['gradient_accumulation_steps']}",
                           where=name, fix='remove it (or set "auto"): tunelab takes gradient_accumulation_steps '
                                           "from its own config")
    config["gradient_accumulation_steps"] = 1
    for key, value in (("train_micro_batch_size_per_gpu", cfg.per_device_train_batch_size),
                       ("gradient_clipping", cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0)):
        if config.get(key, "auto") == "auto":
            config[key] = value
    config.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    for precision, wanted in (("bf16", bool(cfg.bf16)), ("fp16", bool(cfg.fp16))):
        section = config.setdefault(precision, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = wanted
    zero = config["zero_optimization"]
    for key in [k for k, v in zero.items() if v == "auto"]:
        zero.pop(key)  # DeepSpeed's own defaults (bucket sizes follow no model size we know better)
    config.setdefault("zero_allow_untested_optimizer", True)  # the loop's optimizer (AdamW and friends)
    return config


class DeepSpeedObjective:
    """The stage's objective with `loss` routed through the DeepSpeed engine; the rest delegates."""

    def __init__(self, objective, holder, cfg: TunelabConfig):
        self.inner = objective
        self.holder = holder
        self.cfg = cfg
        self.engine = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def prepare(self, optimizer) -> None:
        """Model and optimizer to DeepSpeed together (ZeRO partitions the optimizer state, and under
        ZeRO-3 the weights). The torch optimizer stays the scheduler's: DeepSpeed reads its learning rate."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DeepSpeedPlugin

        AcceleratorState._reset_state()  # accelerate keeps one plugin a process: a second run brings its own
        launcher_env = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
        try:
            accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config(self.cfg)))
            self.engine, _ = accelerator.prepare(self.holder, optimizer)
        finally:  # the plugin marks the process for DeepSpeed: a later run in it (a `stages:` chain) has its own key
            for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
                if key not in launcher_env:
                    del os.environ[key]
            os.environ.update(launcher_env)
            # ... and tells transformers that ZeRO-3 is on, which would partition the next model it loads
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        if self.engine.zero_optimization_partition_weights():
            import deepspeed

            # The chunked loss reads the LM-head weight without calling the head: ZeRO-3 gathers it
            # with the whole loss module's forward instead.
            head = self.holder.model.get_output_embeddings()
            if head is not None:
                deepspeed.zero.register_external_parameter(self.holder, head.weight)

    def loss(self, model, batch: dict):
        return self.engine(batch)

    def grad_sync(self, last: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces at the boundary `backward` marks

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def engine_step(self):
        """Clip, step and zero the gradients (DeepSpeed's step); returns the gradient norm."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return norm if norm is not None else float("nan")

    def save_checkpoint(self, run_dir: Path, scheduler, state, dist, extra_save=None) -> Path:
        """`run_dir/checkpoints/checkpoint-STEP`, written by every rank, published whole or not at all."""
        from tunelab.train.sharded_checkpoint import save_rank_checkpoint

        def write_shards(folder: Path) -> None:
            # Frozen weights are the base model's, reloaded from its folder: never saved.
            self.engine.save_checkpoint(str(folder / FOLDER), tag=TAG, save_latest=False,
                                        exclude_frozen_parameters=True)
            if dist.is_main:
                layout = {"world": dist.world, "zero_stage": self.engine.zero_optimization_stage()}
                (folder / FOLDER / LAYOUT).write_text(json.dumps(layout), encoding="utf-8")

        return save_rank_checkpoint(run_dir, scheduler, state, dist, write_shards, extra_save)

    def load_weights(self, path: Path) -> None:
        """Trainable weights and optimizer state of a checkpoint this engine's kind wrote (every rank)."""
        path = Path(path)
        layout = json.loads((path / FOLDER / LAYOUT).read_text(encoding="utf-8"))
        world, stage = torch.distributed.get_world_size(), self.engine.zero_optimization_stage()
        if (layout["world"], layout["zero_stage"]) != (world, stage):
            raise TunelabError(f"{path} was written by {layout['world']} processes under ZeRO-{layout['zero_stage']}; "
                               f"this run has {world} under ZeRO-{stage}", where="resume_from_checkpoint",
                               fix=f"resume with {layout['world']} processes and the deepspeed key the run started "
                                   "with (DeepSpeed's checkpoints are per rank)")
        # Its scheduler is the loop's (restored with the loop state): DeepSpeed has none of its own.
        loaded, _ = self.engine.load_checkpoint(str(path / FOLDER), tag=TAG, load_module_strict=False,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise TunelabError(f"DeepSpeed found no checkpoint in {path / FOLDER}", where="resume_from_checkpoint",
                               fix="resume from another checkpoints/checkpoint-N folder, or 'latest'")

    def consolidated_state(self, model, is_main: bool, trainable_only: bool) -> dict | None:
        """The full weights on rank 0 (ZeRO-3 gathers its partitions: every rank must call), keyed as
        `model.state_dict()` keys them; None on the other ranks and under ZeRO-2 (weights are whole)."""
        if not self.engine.zero_optimization_partition_weights():
            return None
        state = self.engine._zero3_consolidated_16bit_state_dict()
        if not is_main:
            return None
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k.removeprefix("model."): v for k, v in state.items()}
        return {k: v for k, v in state.items() if k in trainable} if trainable_only else state


def is_deepspeed_checkpoint(path: Path) -> bool:
    return (Path(path) / FOLDER).is_dir()


def load_deepspeed_checkpoint(path: Path, objective, scheduler, dist):
    """Resume a DeepSpeed run; a checkpoint of another engine (or this one under another) is refused."""
    from tunelab.train.sharded_checkpoint import load_rank_state

    if dist.strategy != "deepspeed":
        raise TunelabError(f"{path} was written by a DeepSpeed run", where="resume_from_checkpoint",
                           fix="resume with the deepspeed key and the number of processes the run started with")
    if not is_deepspeed_checkpoint(path):
        raise TunelabError(f"{path} was not written by a DeepSpeed run, and DeepSpeed reads only its own checkpoints",
                           where="resume_from_checkpoint",
                           fix="resume without the deepspeed key (the engine that wrote it), or start over")
    objective.load_weights(path)
    return load_rank_state(Path(path), scheduler, dist)
