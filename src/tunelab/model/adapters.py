"""Which weights train: LoRA (and its rsLoRA / DoRA / PiSSA / QLoRA variants), freeze, full.

`prepare_for_training(model, cfg)` turns a loaded base model into the model the training
loop optimises; `save_trained` and `load_adapter` are its two ends on disk.

Trainable weights are kept in fp32 even when the base is bf16/fp16: Adam updates of
~1e-4 relative size vanish in a 8-bit mantissa. LoRA layers cast their input
themselves; freeze/full runs on a half-precision base need the forward under
`torch.autocast` (the training loop's mixed precision), as in any mixed-precision recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from torch import nn

from tunelab.config import TunelabConfig
from tunelab.data.templates import attach_lock, find_lock, save_lock, template_lock
from tunelab.errors import TunelabError
from tunelab.io import atomic_path, write_json_atomic
from tunelab.model.loader import enable_gradient_checkpointing, ensure_pad_token, load_tokenizer

ALL_LINEAR = "all-linear"


def prepare_for_training(model, cfg: TunelabConfig):
    """Freeze/unfreeze or wrap `model` as `cfg.finetuning_type` says; returns the model to train."""
    quantized = is_quantized(model)
    if quantized:
        from peft import prepare_model_for_kbit_training

        # Freezes the packed weights and puts norms in fp32; checkpointing is switched on below.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:  # the one place it is switched on (the memory back-off may add it later)
        enable_gradient_checkpointing(model)

    if cfg.finetuning_type == "lora":
        if cfg.adapter_name_or_path:
            model = load_adapter(model, cfg.adapter_name_or_path, trainable=True)
        else:
            model = add_lora(model, cfg)
    elif cfg.finetuning_type == "full":
        model.requires_grad_(True)
    else:  # freeze (config.validate allows nothing else)
        freeze_all_but_layers(model, cfg.freeze_trainable_layers, cfg.freeze_trainable_modules)
    upcast_trainable_params(model)
    return model


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


# --- LoRA -------------------------------------------------------------------------

def linear_module_names(model) -> list[str]:
    """Short names (`q_proj`, `down_proj`, ...) of the model's linear layers, lm_head excluded:
    the output layer is tied to the embeddings in many models and LoRA on it buys little."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and module is not output}
    return sorted(names)


def resolve_lora_targets(model, targets: list[str]) -> list[str]:
    """`all-linear` -> every linear layer but lm_head; named targets must exist in the model."""
    available = linear_module_names(model)
    if not targets or ALL_LINEAR in targets:
        return available
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise TunelabError(
            f"lora_target {', '.join(unknown)} not among the model's linear layers: {', '.join(available)}",
            where="config",
            fix=f"use lora_target=all-linear or names from that list, e.g. lora_target={','.join(available[:2])}",
        )
    return list(targets)


def lora_config(model, cfg: TunelabConfig):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=resolve_lora_targets(model, cfg.lora_target),
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        init_lora_weights="pissa" if cfg.pissa_init else True,
    )


def add_lora(model, cfg: TunelabConfig):
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(model, cfg))
    if cfg.pissa_init:
        remember_pissa_init(peft_model)
    return peft_model


def remember_pissa_init(peft_model) -> None:
    """PiSSA moves the top singular directions out of the base weights into A and B, so the
    trained adapter only fits that residual base. Keeping the initial adapter lets
    `save_trained` convert it into a plain LoRA that fits the original base model."""
    init_dir = Path(tempfile.mkdtemp(prefix="tunelab-pissa-init-"))
    config = peft_model.peft_config["default"]
    config.init_lora_weights = True  # the saved init must load as-is, not run the SVD again
    peft_model.save_pretrained(init_dir)
    config.init_lora_weights = "pissa"
    peft_model._tunelab_pissa_init = init_dir
    weakref.finalize(peft_model, shutil.rmtree, init_dir, ignore_errors=True)


# --- freeze -----------------------------------------------------------------------

def decoder_layers(model) -> nn.ModuleList:
    """The stack of transformer blocks: the ModuleList as long as `num_hidden_layers`."""
    count = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise TunelabError(f"could not find the {count} decoder layers of {type(model).__name__}",
                       where="finetuning_type=freeze", fix="use finetuning_type=lora or full for this model")


def freeze_all_but_layers(model, trainable_layers: int, modules: list[str]) -> None:
    """Train only the last N decoder layers (first N when negative), optionally only the
    named sub-modules of each (`mlp`, `self_attn`, ...)."""
    layers = decoder_layers(model)
    if trainable_layers == 0 or abs(trainable_layers) > len(layers):
        raise TunelabError(f"freeze_trainable_layers={trainable_layers}, but the model has {len(layers)} layers",
                           where="config",
                           fix=f"use 1..{len(layers)} (last N layers) or -1..-{len(layers)} (first N)")
    chosen = layers[-trainable_layers:] if trainable_layers > 0 else layers[:-trainable_layers]
    model.requires_grad_(False)
    for layer in chosen:
        for part in trainable_parts(layer, modules):
            part.requires_grad_(True)


def trainable_parts(layer: nn.Module, modules: list[str]) -> list[nn.Module]:
    if not modules or "all" in modules:
        return [layer]
    children = dict(layer.named_modules())
    unknown = [m for m in modules if m not in children or not m]
    if unknown:
        names = sorted(n for n in children if n and "." not in n)
        raise TunelabError(f"freeze_trainable_modules {', '.join(unknown)} not in a decoder layer, "
                           f"which holds: {', '.join(names)}",
                           where="config", fix=f"use all or names from that list, e.g. {names[0]}")
    return [children[m] for m in modules]


# --- precision and counting -----------------------------------------------------------

def upcast_trainable_params(model) -> None:
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total). Tied weights count once; 4-bit packed weights count their real size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if type(param).__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


# --- adapters on disk -------------------------------------------------------------

def load_adapter(model, adapter_path: str | os.PathLike, *, trainable: bool = False):
    """Wrap `model` with a saved LoRA adapter, after checking the adapter was made for it."""
    from peft import PeftModel

    path = Path(adapter_path).expanduser()
    config = read_adapter_config(path)
    base = config.get("base_model_name_or_path") or "an unrecorded base model"
    this = getattr(model, "name_or_path", None) or type(model).__name__

    def mismatch(detail: str) -> TunelabError:
        return TunelabError(f"the adapter was trained on {base}, which does not fit this model {this}: {detail}",
                            where=str(path),
                            fix=f"load the base model the adapter was trained on ({base}), or train a new adapter")

    targets = config.get("target_modules")
    if isinstance(targets, list):
        # PEFT matches a target as a module's short name or as the tail of its full path
        # (PEFT's own all-linear saves full paths).
        names = [name for name, _ in model.named_modules()]
        missing = sorted(t for t in set(targets) if not any(n == t or n.endswith("." + t) for n in names))
        if missing:
            raise mismatch(f"it targets {', '.join(missing)}, which this model lacks")
    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise mismatch(f"weight shapes differ ({first})") from None
    except ValueError as exc:
        if "not found in the base model" not in str(exc):
            raise
        raise mismatch(str(exc).splitlines()[0]) from None


def read_adapter_config(path: Path) -> dict:
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        held = sorted(p.name for p in path.iterdir()) if path.is_dir() else None
        raise TunelabError(
            f"{path} is not a LoRA adapter folder: no adapter_config.json "
            + (f"(it holds: {', '.join(held[:15]) or 'nothing'})" if held is not None else "(no such folder)"),
            where="adapter_name_or_path",
            fix="point at a folder saved by `tunelab train` with finetuning_type=lora "
                "(adapter_config.json + adapter_model.safetensors)",
        )
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TunelabError(f"adapter_config.json is not valid JSON ({exc.msg})",
                           where=f"{config_file}:{exc.lineno}", fix="restore the file from the training run") from None


def is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def targets_embeddings(peft_model) -> bool:
    targets = peft_model.peft_config["default"].target_modules or ()
    return any(name in targets for name in ("embed_tokens", "lm_head"))


def save_trained(model, tokenizer, out_dir: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Write the adapter (LoRA) or the full weights (full/freeze), plus the tokenizer, atomically.

    The tokenizer's `chat_template` is the one training rendered with (`lock_template`), and
    the lock file beside it names the template and its stop tokens; full weights also get
    those stop tokens as `generation_config.eos_token_id`, where transformers and vLLM stop.
    `state_dict`: the weights to write instead of the model's own (FSDP gathers them from the shards).
    """
    out_dir = Path(out_dir)
    lock = template_lock(tokenizer)
    if lock is not None and not is_peft_model(model):
        set_stop_tokens(model, tokenizer, lock.stop_tokens)
    with atomic_path(out_dir) as tmp:
        kwargs = {} if state_dict is None else {"state_dict": state_dict}
        pissa_init = getattr(model, "_tunelab_pissa_init", None)
        if pissa_init is not None:
            kwargs["path_initial_model_for_weight_conversion"] = str(pissa_init)
        if is_peft_model(model) and not targets_embeddings(model):
            # PEFT's "auto" asks the Hub whether the base vocabulary changed; we never resize it,
            # and tunelab never touches the network.
            kwargs["save_embedding_layers"] = False
        model.save_pretrained(tmp, **kwargs)
        write_json_atomic(tmp / BASE_FILE, base_record(model))
        warn_vllm_issues(model, out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            save_lock(tokenizer, tmp)
    return out_dir


BASE_FILE = "tunelab_base.json"  # the base model as the user named it (e.g. the built-in alias)


def base_record(model) -> dict:
    """`base_model`: the name the user gave; `base_model_name_or_path`: what loaders resolve."""
    loadable = getattr(model, "name_or_path", None) or model.config.name_or_path
    return {"base_model": getattr(model, "tunelab_base_model", None) or loadable,
            "base_model_name_or_path": loadable}


def read_base(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / BASE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError:
        return None  # only names for messages and cards: a broken file loses nothing


VLLM_DEFAULT_MAX_LORA_RANK = 16


def vllm_issues(adapter_config: dict) -> list[str]:
    """Why `vllm serve --enable-lora` would refuse (or need options for) this adapter; empty
    when it loads as is. vLLM serves plain LoRA and rsLoRA on linear layers, no biases."""
    issues = []
    if adapter_config.get("use_dora"):
        issues.append("vLLM cannot serve DoRA adapters: merge it (tunelab export --format hf) and serve the merged "
                      "folder")
    if adapter_config.get("bias", "none") != "none":
        issues.append(f"vLLM serves LoRA without biases, this adapter has bias={adapter_config['bias']!r}")
    if adapter_config.get("modules_to_save"):
        issues.append(f"vLLM cannot load modules_to_save ({', '.join(adapter_config['modules_to_save'])}): merge it")
    if not isinstance(adapter_config.get("target_modules"), list):
        issues.append("vLLM needs target_modules as a list of module names, not a pattern")
    rank = int(adapter_config.get("r") or 0)
    if rank > VLLM_DEFAULT_MAX_LORA_RANK:
        issues.append(f"rank {rank} > vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}: "
                      f"start vLLM with --max-lora-rank {rank}")
    return issues


def warn_vllm_issues(model, out_dir: Path) -> None:
    """Log `vllm_issues` of a PEFT model once (not at every checkpoint)."""
    import logging

    if not is_peft_model(model) or getattr(model, "_tunelab_vllm_checked", False):
        return
    model._tunelab_vllm_checked = True
    config = model.peft_config["default"].to_dict()
    config["target_modules"] = sorted(config["target_modules"]) if isinstance(
        config.get("target_modules"), (set, list)) else config.get("target_modules")
    for issue in vllm_issues(config):
        logging.getLogger(__name__).warning("vLLM hand-off (%s): %s", out_dir, issue)


def set_stop_tokens(model, tokenizer, stop_tokens: list[str]) -> None:
    """Stop where the trained template ends a turn: `generate`, vLLM and llama.cpp read the
    generation config's eos_token_id (the base's may name only the tokenizer's EOS)."""
    config = getattr(model, "generation_config", None)
    ids = [i for i in tokenizer.convert_tokens_to_ids(stop_tokens) if i is not None and i >= 0]
    if config is None or not ids:
        return
    config.eos_token_id = ids[0] if len(ids) == 1 else ids


def adapter_tokenizer(model: str, adapter_dir: str | os.PathLike | None):
    """The tokenizer training saved beside the adapter (it carries the trained template and pad
    token), else the base model's. The adapter's template lock is attached either way."""
    folder = Path(adapter_dir).expanduser() if adapter_dir else None
    if folder is None or not (folder / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(model)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        ensure_pad_token(tokenizer, where=str(folder))
    lock_dirs = [folder] if folder else []
    model_dir = Path(model).expanduser()
    if model_dir.is_dir():
        lock_dirs.append(model_dir)
    return attach_lock(tokenizer, find_lock(lock_dirs))
