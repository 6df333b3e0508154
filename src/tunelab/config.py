"""The one typed config: a flat dataclass, loaded from YAML plus `key=value` overrides.

Names follow transformers' TrainingArguments and PEFT's LoraConfig so that users'
habits carry over (`per_device_train_batch_size`, `lora_rank`, ...). The config is
flat on purpose: every key can be overridden on the command line by its bare name.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunelab.errors import TunelabError, nearest

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class TunelabConfig:
    # --- what to train -------------------------------------------------------------
    stage: str = "sft"  # sft | pt | dpo | simpo | kto | orpo | rm | grpo | ppo
    model_name_or_path: str = DEFAULT_MODEL
    adapter_name_or_path: str | None = None  # start from an earlier LoRA adapter
    trust_remote_code: bool = False

    # --- data ----------------------------------------------------------------------
    # file path(s), Hugging Face dataset ids org/name, names in dataset_dir/dataset_info.json, or
    # {path, weight} / {path, samples} mixture entries
    dataset: list[str | dict] = field(default_factory=list)
    dataset_dir: str | None = None  # LLaMA-Factory's: the folder of a dataset_info.json that names the datasets
    dataset_split: str = "train"  # hub datasets: the split to read
    dataset_config: str | None = None  # hub datasets: the configuration (subset) name
    streaming: bool = False  # hub datasets: read records as they arrive; stage pt: train from the stream (max_steps)
    mix_strategy: str | None = None  # concat | interleave_under | interleave_over; auto: interleave_under if weighted
    interleave_probs: list[float] = field(default_factory=list)  # LLaMA-Factory: one weight per dataset entry
    dataset_format: str = "auto"  # auto | alpaca | sharegpt | messages | conversation | hotel | text | ...
    eval_dataset: list[str] = field(default_factory=list)  # validation file(s); else val_size
    val_size: float = 0.0  # fraction (<1) or count (>=1) of training records held out
    val_split_by: str = "dialogue"  # dialogue: rows of one dialogue stay together; record: rows drawn alone
    template: str = "auto"  # auto = the tokenizer's chat_template; or a name / .jinja path
    system_prompt: str | None = None  # prepended where a record has no system message
    cutoff_len: int = 1024
    train_on: str = "all"  # all = every assistant turn; last = only the final one
    truncation: str = "context"  # over cutoff_len: context = shorten oldest tool results/turns first; end = cut the end
    skip_invalid: bool = False  # drop bad records (with a count) instead of stopping
    fold_dialogues: bool | None = None  # sft: rows that are prefixes of a longer row train inside it; auto: on
    max_samples: int | None = None  # use only N records (quick experiments), drawn as max_samples_strategy says
    max_samples_strategy: str = "random"  # random: a seeded random N; head: the first N records (stops reading)
    replay: dict | None = None  # {data: FILE or RUN_DIR, fraction: 0.2 (or samples: N), split: train | validation}
    eval_sets: dict = field(default_factory=dict)  # {name: FILE or RUN_DIR}: logged as eval_NAME_loss (forgetting)
    packing: bool = False  # concatenate samples; attention never crosses sample borders
    group_by_length: bool | None = None  # similar lengths per batch (less padding); auto: on unless padding-free

    # --- fine-tuning method --------------------------------------------------------
    finetuning_type: str = "lora"  # lora | full | freeze
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target: list[str] = field(default_factory=lambda: ["all-linear"])
    use_rslora: bool = False
    use_dora: bool = False
    pissa_init: bool = False
    freeze_trainable_layers: int = 2  # freeze: train the last N decoder layers
    freeze_trainable_modules: list[str] = field(default_factory=lambda: ["all"])
    quantization_bit: int | None = None  # 4 or 8: QLoRA through bitsandbytes (CUDA only)

    # --- preference training (dpo / simpo / kto / orpo) ----------------------------
    pref_beta: float = 0.1
    pref_loss: str = "sigmoid"  # sigmoid | ipo | hinge
    pref_label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    precompute_ref_log_probs: bool = False

    # --- reward models and online RL (rm / grpo / ppo; docs/rl.md) ------------------------
    reward: str | None = None  # grpo/ppo: a task (hotel, generic), judge, a stage=rm run folder, or module:function
    judge_url: str | None = None  # reward: judge: an OpenAI-compatible endpoint (key: $TUNELAB_JUDGE_API_KEY)
    judge_model: str | None = None  # reward: judge: the judge's model name at that endpoint
    judge_dimensions: str = ""  # reward: judge: the rubric, name:description;... (default: correctness, ...)
    num_generations: int = 4  # grpo: completions sampled per prompt (the group its advantages compare)
    max_completion_length: int = 128  # grpo/ppo: tokens sampled per completion at most
    temperature: float = 1.0  # grpo/ppo: sampling temperature of the rollouts
    kl_coef: float = 0.04  # grpo/ppo: weight of the KL to the reference (the policy at the start)
    cliprange: float = 0.2  # grpo/ppo: the policy ratio is clipped to [1 - cliprange, 1 + cliprange]
    num_ppo_epochs: int = 1  # grpo/ppo: optimizer steps on each batch of rollouts
    vf_coef: float = 0.1  # ppo: weight of the value-head loss
    cliprange_value: float = 0.2  # ppo: clip of the value change
    gamma: float = 1.0  # ppo: discount
    lam: float = 0.95  # ppo: GAE lambda

    # --- optimisation --------------------------------------------------------------
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"  # any transformers scheduler: linear | cosine | cosine_with_min_lr | wsd ...
    lr_scheduler_kwargs: dict = field(default_factory=dict)  # its own arguments, e.g. {num_cycles: 2}, {min_lr_rate: 0.1}
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    bf16: bool | None = None  # auto: on where the device computes in bf16 (CUDA Ampere+), off on CPU
    fp16: bool = False
    gradient_checkpointing: bool | None = None  # auto: off, switched on by the memory back-off if needed
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps; under torchrun/accelerate auto = cuda:LOCAL_RANK

    # --- several GPUs (train/distributed.py; docs/distributed.md) --------------------
    nproc_per_node: int = 1  # > 1: `tunelab train` starts itself through torchrun with this many processes
    distributed_strategy: str = "auto"  # auto (ddp for lora, fsdp otherwise) | ddp | fsdp
    fsdp_cpu_offload: bool = False  # fsdp: keep sharded weights, gradients and optimizer state in CPU memory
    deepspeed: str | None = None  # zero2 | zero3 | path/to/ds_config.json: DeepSpeed ZeRO instead of DDP / FSDP2

    # --- speed (train/fast; each lever keeps the math, see docs/benchmarks.md) -----------
    # A lever left unset (auto) is chosen by `speed`: on CUDA the fastest correct path, on CPU the
    # plain one; the run log says in one line what was chosen and why. true/false force a lever.
    speed: str = "auto"  # auto | off (off: every unset lever off, micro-batches by sample count)
    padding_free: bool | None = None  # one token stream, per-sample varlen attention (CUDA kernel)
    fused_loss: bool | None = None  # chunked LM head + loss: never builds the full [tokens, vocab] logits
    torch_compile: bool | None = None  # compile each decoder layer (fuses norms, RoPE, SwiGLU, LoRA adds); auto: if it repays
    max_tokens_per_batch: int | None = None  # micro-batch token budget; auto on CUDA: sized to free memory
    oom_backoff: bool = True  # on CUDA out-of-memory: smaller micro-batches, then checkpointing; retry the step

    # --- memory levers (train/fast/offload.py, tiled_mlp.py, nf4.py; docs/benchmarks.md) --------
    # auto: on a GPU when one micro-batch's checkpointed layer inputs would fill a quarter of it
    activation_offload: bool | None = None  # auto: when a micro-batch's layer inputs would take > 1/4 of the GPU
    tiled_mlp: bool | None = None  # MLP over 8k-token tiles; auto: with activation offload
    rope_scaling: dict | str | None = None  # linear | dynamic | yarn | llama3, or {rope_type: yarn, factor: 4.0}
    optim: str = "adamw_torch"  # adamw_torch | adamw_torch_fused | adamw_8bit | paged_adamw_8bit | adafactor | sgd

    # --- evaluation, checkpoints, logging ------------------------------------------
    eval_strategy: str = "no"  # no | steps | epoch
    eval_steps: int = 100
    eval_on_start: bool = True  # evaluate the untuned model first: the baseline every curve is read against
    save_strategy: str = "steps"  # no | steps | epoch
    save_steps: int = 500
    save_total_limit: int | None = 3
    logging_steps: int = 10
    load_best_model_at_end: bool = False
    metric_for_best_model: str = "eval_loss"  # or a task metric of eval_task, e.g. slot_f1, bleu4
    eval_task: str | None = None  # at each evaluation also generate and score a task: hotel | generic
    eval_task_dataset: list[str] = field(default_factory=list)  # conversations to score (default: the validation split)
    eval_metrics: list[str] = field(default_factory=list)  # the task's metrics to compute (default: its own)
    eval_generate_samples: int = 64  # validation rows generated for the task metrics
    eval_max_new_tokens: int = 256
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    early_stopping_threshold: float = 0.0
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "latest"
    output_dir: str = "runs/tunelab"
    overwrite_output_dir: bool = False
    report_to: list[str] = field(default_factory=lambda: ["tensorboard", "jsonl"])  # + wandb swanlab mlflow trackio; none
    plot_loss: bool = True
    disable_tqdm: bool = False

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def dataset_sources(self) -> list[DatasetSource]:
        """The `dataset` entries, typed, with `interleave_probs` turned into weights."""
        return dataset_sources(self)

    @property
    def dataset_paths(self) -> list[str]:
        return [source.path for source in self.dataset_sources]

    @property
    def replay_spec(self) -> ReplaySpec | None:
        return replay_spec(self.replay)


@dataclass(frozen=True)
class DatasetSource:
    """One `dataset` entry: all rows (neither set), a share of the mixture (`weight`), or a count."""
    path: str
    weight: float | None = None
    samples: int | None = None


@dataclass(frozen=True)
class ReplaySpec:
    """`replay`: a share (`fraction` of its rows) or a count (`samples`) of an earlier stage's data."""
    data: str
    fraction: float | None = None
    samples: int | None = None
    split: str = "train"


MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")
SOURCE_KEYS = ("path", "weight", "samples")
REPLAY_KEYS = ("data", "fraction", "samples", "split")


def _number(value, integer: bool = False) -> bool:
    kind = int if integer else (int, float)
    return isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _entry_error(i: int, entry, what: str, fix: str) -> TunelabError:
    return TunelabError(f"dataset[{i}] ({entry!r}): {what}", where="config", fix=fix)


def dataset_sources(cfg: TunelabConfig) -> list[DatasetSource]:
    sources = []
    for i, entry in enumerate(cfg.dataset):
        if isinstance(entry, str):
            sources.append(DatasetSource(entry))
            continue
        unknown = [k for k in entry if k not in SOURCE_KEYS]
        if unknown:
            hint = nearest(str(unknown[0]), SOURCE_KEYS)
            raise _entry_error(i, entry, f"unknown key {unknown[0]!r}",
                               f"did you mean {hint!r}?" if hint else "an entry takes path and weight or samples")
        if not isinstance(entry.get("path"), str) or not entry["path"].strip():
            raise _entry_error(i, entry, "has no path", "write {path: data.jsonl, weight: 0.5}")
        weight, samples = entry.get("weight"), entry.get("samples")
        if weight is not None and samples is not None:
            raise _entry_error(i, entry, "has both weight and samples",
                               "give a share of the mixture (weight) or a row count (samples), not both")
        if weight is not None and not _number(weight):
            raise _entry_error(i, entry, f"weight must be a number > 0, got {weight!r}", "e.g. weight: 0.3")
        if samples is not None and not _number(samples, integer=True):
            raise _entry_error(i, entry, f"samples must be a whole number > 0, got {samples!r}", "e.g. samples: 500")
        sources.append(DatasetSource(entry["path"], None if weight is None else float(weight), samples))
    if cfg.interleave_probs:
        if len(cfg.interleave_probs) != len(sources):
            raise TunelabError(f"interleave_probs has {len(cfg.interleave_probs)} value(s) for {len(sources)} "
                               "dataset entries", where="config", fix="give one probability per dataset entry")
        if any(s.weight is not None or s.samples is not None for s in sources):
            raise TunelabError("interleave_probs and per-entry weight/samples are both given", where="config",
                               fix="use one of them: interleave_probs is LLaMA-Factory's spelling of the weights")
        if not all(_number(p) for p in cfg.interleave_probs):
            raise TunelabError(f"interleave_probs must be numbers > 0, got {cfg.interleave_probs}", where="config",
                               fix="e.g. interleave_probs=0.7,0.3 (a source to leave out is dropped from dataset)")
        sources = [DatasetSource(s.path, p) for s, p in zip(sources, cfg.interleave_probs)]
    return sources


def mix_strategy(cfg: TunelabConfig) -> str:
    """The strategy in force: `auto` interleaves (without repeats) as soon as an entry carries a weight."""
    if cfg.mix_strategy not in (None, *MIX_STRATEGIES):
        hint = nearest(str(cfg.mix_strategy), MIX_STRATEGIES)
        raise TunelabError(f"mix_strategy={cfg.mix_strategy!r} is not one of {', '.join(MIX_STRATEGIES)}",
                           where="config", fix=f"use mix_strategy={hint}" if hint else "leave it unset (auto)")
    weighted = any(s.weight is not None for s in cfg.dataset_sources)
    strategy = cfg.mix_strategy or ("interleave_under" if weighted else "concat")
    if strategy == "concat" and weighted:
        raise TunelabError("mix_strategy=concat takes every row of every file, but dataset entries carry weights",
                           where="config", fix="drop mix_strategy (weights interleave without repeating rows), "
                                               "or set mix_strategy=interleave_over to repeat short sources")
    if strategy != "concat":
        plain = [s.path for s in cfg.dataset_sources if s.weight is None and s.samples is None]
        if plain and len(plain) < len(cfg.dataset_sources) and weighted:
            raise TunelabError(f"dataset entry {plain[0]} has no weight while others do", where="config",
                               fix="give every entry a weight (or a samples count)")
    return strategy


def replay_spec(value: dict | None) -> ReplaySpec | None:
    if value is None:
        return None
    unknown = [k for k in value if k not in REPLAY_KEYS]
    if unknown:
        hint = nearest(str(unknown[0]), REPLAY_KEYS)
        raise TunelabError(f"replay: unknown key {unknown[0]!r}", where="config",
                           fix=f"did you mean {hint!r}?" if hint else "replay takes data, fraction or samples, split")
    fix = "write replay: {data: runs/stage1, fraction: 0.2} (or samples: 500 instead of fraction)"
    if not isinstance(value.get("data"), str) or not value["data"].strip():
        raise TunelabError("replay has no data (a file or an earlier run folder)", where="config", fix=fix)
    fraction, samples = value.get("fraction"), value.get("samples")
    if (fraction is None) == (samples is None):
        raise TunelabError("replay needs exactly one of fraction and samples", where="config", fix=fix)
    if fraction is not None and not (_number(fraction) and fraction <= 1):
        raise TunelabError(f"replay fraction must be in (0, 1], got {fraction!r}", where="config",
                           fix="e.g. fraction: 0.2 mixes in a fifth of the earlier training rows")
    if samples is not None and not _number(samples, integer=True):
        raise TunelabError(f"replay samples must be a whole number > 0, got {samples!r}", where="config", fix=fix)
    split = value.get("split", "train")
    if split not in ("train", "validation"):
        raise TunelabError(f"replay split must be train or validation, got {split!r}", where="config",
                           fix="train: the earlier run's training rows; validation: its held-out rows")
    return ReplaySpec(value["data"], None if fraction is None else float(fraction), samples, split)


# Stages that train on conversations or text with a per-token cross-entropy (the others on preference
# pairs, rewards or rollouts): their eval_loss has a perplexity, and they can take replayed rows.
TOKEN_STAGES = ("sft", "pt")

CHOICES = {
    "stage": ("sft", "pt", "dpo", "simpo", "kto", "orpo", "rm", "grpo", "ppo"),
    "finetuning_type": ("lora", "full", "freeze"),
    # transformers.SchedulerType's values (tests/train/test_optim.py checks they match)
    "lr_scheduler_type": ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                          "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr",
                          "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy"),
    "eval_strategy": ("no", "steps", "epoch"),
    "save_strategy": ("no", "steps", "epoch"),
    "train_on": ("all", "last"),
    "truncation": ("context", "end"),
    "val_split_by": ("dialogue", "record"),
    "pref_loss": ("sigmoid", "ipo", "hinge"),
    "speed": ("auto", "off"),
    "distributed_strategy": ("auto", "ddp", "fsdp"),
    "optim": ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd"),
    "max_samples_strategy": ("random", "head"),
}
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")  # stepped by the validation loss, not by steps
# Trackers (train/trackers.py); the JSONL log is always written, `none` turns the others off.
REPORT_TO = ("tensorboard", "wandb", "swanlab", "mlflow", "trackio", "jsonl", "none")
ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")


def check_rope_scaling(value) -> None:
    """The rope_scaling key's shape (the factor may still come from cutoff_len, see model/rope.py)."""
    if value is None:
        return
    rope_type = value.get("rope_type", value.get("type")) if isinstance(value, dict) else value
    if rope_type not in ROPE_TYPES:
        raise TunelabError(f"rope_scaling type {rope_type!r} is not one of {', '.join(ROPE_TYPES)}",
                           where="config", fix="write e.g. rope_scaling=yarn or rope_scaling={rope_type: yarn, "
                                               "factor: 4.0}")
    factor = value.get("factor", 1) if isinstance(value, dict) else 1
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
        raise TunelabError(f"rope_scaling factor must be a number >= 1, got {factor!r}", where="config",
                           fix="e.g. factor: 4.0 trains 4x the model's native context")


def check_data_keys(cfg: TunelabConfig) -> None:
    """Mixture entries, replay and eval sets: their shape, before any file is read."""
    mix_strategy(cfg)  # also checks every dataset entry
    if cfg.max_samples_strategy != "random" and cfg.max_samples is None:
        raise TunelabError(f"max_samples_strategy={cfg.max_samples_strategy} has no effect without max_samples",
                           where="config", fix="set max_samples=N, or drop max_samples_strategy")
    spec = cfg.replay_spec
    if spec is not None and cfg.stage not in TOKEN_STAGES:
        raise TunelabError(f"replay mixes conversations into training, but stage={cfg.stage} trains on "
                           "preference data", where="config", fix="replay in an sft or pt stage, or drop replay")
    for name, value in cfg.eval_sets.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)) or not isinstance(value, str) or not value.strip():
            raise TunelabError(f"eval_sets entry {name!r}: {value!r} is not name: file", where="config",
                               fix="write eval_sets: {hotel: data/hotel_val.jsonl} (a name of letters, digits, _ "
                                   "and a file or earlier run folder)")


def check_report_to(names: list[str]) -> None:
    for name in names:
        if name not in REPORT_TO:
            hint = nearest(name, REPORT_TO)
            raise TunelabError(f"report_to={name!r} is not one of {', '.join(REPORT_TO)}", where="config",
                               fix=f"use report_to={hint}" if hint else f"pick from {', '.join(REPORT_TO)}")
    if "none" in names and len(names) > 1:
        raise TunelabError(f"report_to={','.join(names)} names trackers and none", where="config",
                           fix="use report_to=none alone (the JSONL log is always written), or drop none")


def check_quantization_bit(bits) -> None:
    """The one check of a quantization_bit value (config, `tunelab eval/serve`, the loader)."""
    if bits not in (4, 8):
        raise TunelabError(f"quantization_bit={bits} is not 4 or 8", where="config",
                           fix="use quantization_bit=4 (QLoRA NF4) or 8, or leave it unset")


def validate(cfg: TunelabConfig) -> None:
    for key, allowed in CHOICES.items():
        value = getattr(cfg, key)
        if value not in allowed:
            hint = nearest(str(value), allowed)
            raise TunelabError(
                f"{key}={value!r} is not one of {', '.join(allowed)}",
                where="config",
                fix=f"use {key}={hint}" if hint else f"pick one of {', '.join(allowed)}",
            )
    check_rope_scaling(cfg.rope_scaling)
    check_data_keys(cfg)
    check_report_to(cfg.report_to)
    if not cfg.output_dir.strip():  # "" would mean the current folder: a run would write over its files
        raise TunelabError("output_dir is empty", where="config", fix="set output_dir=runs/NAME")
    if cfg.bf16 and cfg.fp16:
        raise TunelabError("bf16 and fp16 are both on", where="config", fix="set only one of them")
    if cfg.quantization_bit is not None:
        check_quantization_bit(cfg.quantization_bit)
    if cfg.quantization_bit and cfg.finetuning_type != "lora":
        raise TunelabError("quantized weights can only be trained through LoRA (QLoRA)", where="config",
                           fix="set finetuning_type=lora or drop quantization_bit")
    if cfg.max_tokens_per_batch is not None and cfg.max_tokens_per_batch <= 0:
        raise TunelabError(f"max_tokens_per_batch must be > 0, got {cfg.max_tokens_per_batch}", where="config",
                           fix="leave it unset (auto) or give a token count such as max_tokens_per_batch=16384")
    positive = ("cutoff_len", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "lora_rank", "logging_steps", "eval_steps", "save_steps",
                "nproc_per_node", "num_generations", "max_completion_length", "num_ppo_epochs")
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise TunelabError(f"{key} must be > 0, got {getattr(cfg, key)}", where="config",
                               fix=f"set {key} to a positive number")
    for f in dataclasses.fields(cfg):  # nan / inf pass every comparison below: refuse them first
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise TunelabError(f"{f.name}={value} is not a finite number", where="config",
                               fix=f"set {f.name} to a number, e.g. its default {f.default!r}")
    if not cfg.learning_rate > 0:
        raise TunelabError(f"learning_rate must be > 0, got {cfg.learning_rate}", where="config",
                           fix="a LoRA run usually wants 1e-4 to 3e-4; full fine-tuning 1e-5")
    for key, ok, rule, nearest_value in _ranges(cfg):
        if not ok:
            raise TunelabError(f"{key}={getattr(cfg, key)} is out of range: {rule}", where="config",
                               fix=f"use e.g. {key}={nearest_value}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise TunelabError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}", where="config",
                           fix="use e.g. warmup_ratio=0.03, or warmup_steps=N")
    if cfg.max_steps <= 0 and cfg.num_train_epochs <= 0:
        raise TunelabError("neither num_train_epochs nor max_steps is positive", where="config",
                           fix="set num_train_epochs=3 or max_steps=100")
    if cfg.streaming and cfg.stage == "pt" and cfg.max_steps <= 0:
        raise TunelabError("streaming=true trains on a stream whose length is unknown, so num_train_epochs cannot "
                           "say when to stop", where="config",
                           fix="set max_steps=N (optimizer steps), or streaming=false to read the corpus into memory")
    if cfg.load_best_model_at_end and cfg.eval_strategy == "no":
        raise TunelabError("load_best_model_at_end needs evaluations", where="config",
                           fix="set eval_strategy=steps (and eval_steps) or eval_strategy=epoch")
    if cfg.eval_task and cfg.eval_strategy == "no":
        raise TunelabError(f"eval_task={cfg.eval_task} needs evaluations", where="config",
                           fix="set eval_strategy=steps (and eval_steps) or eval_strategy=epoch")
    if cfg.eval_generate_samples <= 0 or cfg.eval_max_new_tokens <= 0:
        raise TunelabError("eval_generate_samples and eval_max_new_tokens must be > 0", where="config",
                           fix="e.g. eval_generate_samples=64 eval_max_new_tokens=256")
    if cfg.lr_scheduler_type in METRIC_SCHEDULERS and cfg.eval_strategy == "no":
        raise TunelabError(f"lr_scheduler_type={cfg.lr_scheduler_type} follows the validation loss, which needs "
                           "evaluations", where="config", fix="set eval_strategy=steps (and val_size or eval_dataset)")
    if cfg.early_stopping_patience is not None and cfg.eval_strategy == "no":
        raise TunelabError("early_stopping_patience needs evaluations", where="config",
                           fix="set eval_strategy=steps or epoch")


def _ranges(cfg: TunelabConfig) -> list[tuple[str, bool, str, object]]:
    """(key, in range?, the rule, the nearest sensible value) of every bounded number."""
    def clamp(v, lo, hi):
        return min(max(v, lo), hi)

    return [
        ("seed", 0 <= cfg.seed < 2**32, "0 <= seed < 2^32", clamp(cfg.seed, 0, 2**32 - 1)),
        ("max_steps", cfg.max_steps >= -1, "-1 (use num_train_epochs) or a step count", -1),
        ("num_train_epochs", cfg.num_train_epochs >= 0, "epochs must be >= 0", 3.0),
        ("lora_alpha", cfg.lora_alpha > 0, "lora_alpha must be > 0 (0 makes the adapter do nothing)",
         2 * cfg.lora_rank),
        ("lora_dropout", 0 <= cfg.lora_dropout < 1, "0 <= lora_dropout < 1", clamp(cfg.lora_dropout, 0.0, 0.5)),
        ("weight_decay", cfg.weight_decay >= 0, "weight_decay must be >= 0", 0.0),
        ("adam_beta1", 0 <= cfg.adam_beta1 < 1, "0 <= adam_beta1 < 1", 0.9),
        ("adam_beta2", 0 <= cfg.adam_beta2 < 1, "0 <= adam_beta2 < 1", 0.999),
        ("adam_epsilon", cfg.adam_epsilon > 0, "adam_epsilon must be > 0", 1e-8),
        ("max_grad_norm", cfg.max_grad_norm >= 0, "max_grad_norm must be >= 0 (0: no clipping)", 1.0),
        ("warmup_steps", cfg.warmup_steps >= 0, "warmup_steps must be >= 0", 0),
        ("val_size", cfg.val_size >= 0 and (cfg.val_size < 1 or cfg.val_size.is_integer()),
         "a fraction below 1 or a whole count of records", 0.1 if cfg.val_size < 1 else round(cfg.val_size)),
        ("freeze_trainable_layers", cfg.freeze_trainable_layers != 0, "freeze_trainable_layers must not be 0",
         2),
        ("pref_beta", cfg.pref_beta > 0, "pref_beta must be > 0", 0.1),
        ("pref_label_smoothing", 0 <= cfg.pref_label_smoothing < 0.5, "0 <= pref_label_smoothing < 0.5", 0.0),
        ("save_total_limit", cfg.save_total_limit is None or cfg.save_total_limit >= 0,
         "save_total_limit must be >= 0 (0 or unset: keep all)", 3),
        ("early_stopping_patience", cfg.early_stopping_patience is None or cfg.early_stopping_patience > 0,
         "early_stopping_patience must be > 0", 3),
        ("early_stopping_threshold", cfg.early_stopping_threshold >= 0, "early_stopping_threshold must be >= 0",
         0.0),
        ("max_samples", cfg.max_samples is None or cfg.max_samples > 0, "max_samples must be > 0", 1000),
        ("temperature", cfg.temperature > 0, "temperature must be > 0 (rollouts are sampled)", 1.0),
        ("kl_coef", cfg.kl_coef >= 0, "kl_coef must be >= 0 (0: no KL to the reference)", 0.04),
        ("cliprange", 0 < cfg.cliprange < 1, "0 < cliprange < 1", 0.2),
        ("cliprange_value", cfg.cliprange_value > 0, "cliprange_value must be > 0", 0.2),
        ("vf_coef", cfg.vf_coef >= 0, "vf_coef must be >= 0", 0.1),
        ("gamma", 0 <= cfg.gamma <= 1, "0 <= gamma <= 1", 1.0),
        ("lam", 0 <= cfg.lam <= 1, "0 <= lam <= 1", 0.95),
    ]


# --- loading -------------------------------------------------------------------------

def _field_types() -> dict[str, typing.Any]:
    hints = typing.get_type_hints(TunelabConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TunelabConfig)}


def _type_name(tp) -> str:
    if typing.get_args(tp):  # list[str], int | None: the full spelling, not just "list"
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp)


def _coerce(key: str, value, tp, where: str):
    """Turn a YAML/CLI value into the field's declared type, or say what is wrong."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if isinstance(value, str) and value.lower() == "auto" and inner[0] in (bool, int):
            return None  # an automatic lever (bool | None, int | None): None is "auto"
        for candidate in inner:  # the first type that takes the value
            try:
                return _coerce(key, value, candidate, where)
            except TunelabError:
                continue
        raise TunelabError(f"{key} must be {_type_name(tp)}, got {value!r}", where=where,
                           fix=f"write e.g. {key}={_example(inner[0])}")
    if origin is list:
        (item_tp,) = args
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(key, v, item_tp, where) for v in value]
    if tp is dict and isinstance(value, dict):  # a YAML mapping (also `key={a: 1}` on the command line)
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise TunelabError(
        f"{key} must be {_type_name(tp)}, got {value!r}",
        where=where,
        fix=f"write e.g. {key}={_example(tp)}",
    )


def _example(tp) -> str:
    return {bool: "true", int: "8", float: "2e-4", str: "text"}.get(tp, "value")


class _YamlLoader(yaml.SafeLoader):
    """YAML with only true/false as booleans: `eval_strategy: no` stays the string "no"."""


_YamlLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)


MAX_CONFIG_NODES = 100_000  # a config has about a hundred values; a YAML alias bomb expands to billions


def _check_size(value, path: Path) -> None:
    """Count the values the YAML expands to, stopping at the limit (aliases repeat shared objects)."""
    stack, seen = [value], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_NODES:
            raise TunelabError(f"the config expands to over {MAX_CONFIG_NODES:,} values (YAML aliases)",
                               where=str(path), fix="write the values out without nested &anchor / *alias chains")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_overrides(pairs: list[str]) -> dict:
    """`["lora_rank=16", "dataset=a.jsonl,b.jsonl"]` -> dict, values parsed as YAML scalars."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise TunelabError(f"override {pair!r} is not key=value", where="command line",
                               fix="write overrides as key=value, e.g. learning_rate=1e-4")
        key, raw = pair.split("=", 1)
        try:
            value = _load_yaml(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        # YAML reads "1e-4" as a string; let _coerce parse numbers from text.
        out[key.strip()] = value
    return out


def build_config(values: dict, where: str = "config", origins: dict[str, str] | None = None) -> TunelabConfig:
    """Check keys and types of a plain dict and build the config. Keys of LLaMA-Factory, TRL,
    PEFT and transformers configs are translated first (compat.py). An error names where the
    key came from: `origins[key]` when given (the command line for overrides), else `where`."""
    from tunelab.compat import translate

    values = translate(values, where=where)
    fields = _field_types()
    kwargs = {}
    for key, value in values.items():
        source = (origins or {}).get(key, where)
        if key not in fields:
            hint = nearest(key, fields)
            raise TunelabError(
                f"unknown key {key!r}",
                where=source,
                fix=f"did you mean {hint!r}?" if hint else "see `tunelab train --help-config` for every key",
            )
        kwargs[key] = _coerce(key, value, fields[key], source)
    try:
        return TunelabConfig(**kwargs)
    except TunelabError as exc:  # the checks know the key, the caller the file: name both
        if exc.where == "config" and where != "config":
            raise TunelabError(exc.what, where=where, fix=exc.fix) from None
        raise


def read_yaml(path: Path) -> dict:
    """A config file's mapping (read_yaml_file), its relative data paths resolved against its folder."""
    loaded = read_yaml_file(path)
    if isinstance(loaded.get("stages"), list):  # each stage's data paths are relative to the file too
        loaded["stages"] = [_resolve_relative_paths(s, path.parent) if isinstance(s, dict) else s
                            for s in loaded["stages"]]
    return _resolve_relative_paths(loaded, path.parent)


def is_chain(path: str | Path | None) -> bool:
    """Whether a config file is a chain of stages (`stages:`); see tunelab/chain.py."""
    if path is None or not Path(path).is_file():
        return False
    return "stages" in read_yaml(Path(path))


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> TunelabConfig:
    """Read a YAML config (optional), apply `key=value` overrides, validate, return it.

    Relative dataset paths in the YAML are resolved against the YAML file's folder
    when they exist there, so `tunelab train examples/x.yaml` works from anywhere.
    """
    values: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        loaded = read_yaml(path)
        if "stages" in loaded:
            raise TunelabError("this file is a chain of stages (it has `stages:`)", where=str(path),
                               fix=f"run it with `tunelab train {path}` (docs/multistage.md)")
        values.update(loaded)
    origins: dict[str, str] = {}
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        values.update(extra)
        origins = {key: f"command line ({key}=...)" for key in extra}
    return build_config(values, where=where, origins=origins)


def read_yaml_file(path: Path) -> dict:
    """The mapping of a YAML (or JSON) config file, or a TunelabError that names the line."""
    if not path.is_file():
        raise TunelabError(f"config file {path} does not exist", where="command line",
                           fix="give the path of a YAML file, e.g. examples/quickstart.yaml")
    try:
        loaded = _load_yaml(path.read_text(encoding="utf-8")) or {}
        _check_size(loaded, path)
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise TunelabError("the config is not UTF-8 text", where=f"{path}:{line}",
                           fix="re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise TunelabError(f"not valid YAML ({getattr(exc, 'problem', exc)})", where=f"{path}{line}",
                           fix="check the indentation and quoting on that line") from None
    if not isinstance(loaded, dict):
        raise TunelabError("the config must be a mapping of key: value", where=str(path),
                           fix="write one `key: value` per line")
    return loaded


PATH_KEYS = ("dataset", "eval_dataset")
# Keys whose unset value (None) means "chosen at run time" (train/fast/plan.py says how; fold_dialogues:
# on for stage sft, the one stage that reads it).
AUTO_KEYS = ("bf16", "gradient_checkpointing", "group_by_length", "padding_free", "fused_loss", "torch_compile",
             "max_tokens_per_batch", "activation_offload", "tiled_mlp", "fold_dialogues")


def _resolve_relative_paths(values: dict, base: Path) -> dict:
    values = dict(values)
    folder = values.get("dataset_dir")
    if isinstance(folder, str) and not Path(folder).is_absolute() and not Path(folder).exists() \
            and (base / folder).exists():
        values["dataset_dir"] = str(base / folder)
    for key in PATH_KEYS:
        if key not in values or values[key] is None:
            continue
        items = values[key] if isinstance(values[key], list) else \
            [values[key]] if isinstance(values[key], dict) else \
            [v.strip() for v in str(values[key]).split(",") if v.strip()]  # a comma list, as _coerce reads it
        values[key] = [{**item, "path": _resolve(item["path"], base)} if isinstance(item, dict) and "path" in item
                       else item if isinstance(item, dict) else _resolve(item, base) for item in items]
    if isinstance(values.get("replay"), dict) and "data" in values["replay"]:
        values["replay"] = {**values["replay"], "data": _resolve(values["replay"]["data"], base)}
    if isinstance(values.get("eval_sets"), dict):
        values["eval_sets"] = {name: _resolve(v, base) for name, v in values["eval_sets"].items()}
    return values


def _resolve(item, base: Path) -> str:
    """A path relative to the YAML's folder where it exists there (else as written: the current folder)."""
    p = Path(str(item))
    if not p.is_absolute() and not p.exists() and (base / p).exists():
        p = base / p
    return str(p)


def save_config(cfg: TunelabConfig, path: str | Path) -> None:
    from tunelab.io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))


def describe_keys() -> str:
    """Every key with its type and default, for `--help-config`."""
    lines = []
    for f in dataclasses.fields(TunelabConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "auto" if default is None and f.name in AUTO_KEYS else repr(default)
        lines.append(f"  {f.name:32s} {_type_name(_field_types()[f.name]):14s} default: {shown}")
    return "\n".join(lines)
