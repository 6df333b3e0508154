"""Finding and loading models and tokenizers.

A model is named by a built-in alias (`smollm2-135m-instruct`), a local HF folder, or a
hub id (`Qwen/Qwen2.5-7B-Instruct`): from the local Hugging Face cache, downloaded only when
missing there and the user has not set offline mode (hub.py). Everything is resolved to a
local folder first, so `from_pretrained` itself never reaches for the network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from tunelab import hub
from tunelab.config import check_quantization_bit
from tunelab.errors import TunelabError, nearest
from tunelab.model.embedded import EMBEDDED, ensure_embedded_model, is_embedded_alias

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


# --- where the files are ----------------------------------------------------------

def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """Alias -> converted cache folder; local folder -> itself; hub id -> its offline snapshot."""
    name = str(name_or_path)
    if is_embedded_alias(name):
        return ensure_embedded_model(name)
    path = Path(name).expanduser()
    if path.exists():
        return _checked_local_folder(path)
    if hub.is_hub_id(name):
        return _hub_snapshot(name)
    hint = nearest(name.lower(), EMBEDDED)
    raise TunelabError(
        f"{name!r} is neither a built-in model, a local folder, nor a hub id like Org/Name",
        where="model_name_or_path",
        fix=f"did you mean {hint!r}?" if hint else
            f"use {next(iter(EMBEDDED))!r} (built in), a folder holding config.json, or a hub id in your HF cache",
    )


def loadable_name(name_or_path: str | os.PathLike, path: Path) -> str:
    """What other tools load: a hub id as given, else the resolved folder (aliases and local folders)."""
    name = str(name_or_path)
    if hub.is_hub_id(name) and not is_embedded_alias(name) and not Path(name).expanduser().exists():
        return name
    return str(path)


def _checked_local_folder(path: Path) -> Path:
    if not path.is_dir():
        raise TunelabError(f"{path} is a file, not a model folder", where="model_name_or_path",
                           fix="give the folder that holds config.json and the weights")
    if not (path / "config.json").is_file():
        listing = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        shown = ", ".join(listing[:15]) + (f" (+{len(listing) - 15} more)" if len(listing) > 15 else "")
        raise TunelabError(
            f"{path} holds no config.json, so it is not an HF model folder (it holds: {shown or 'nothing'})",
            where="model_name_or_path",
            fix="point at the folder with config.json and *.safetensors (for a LoRA adapter use "
                "adapter_name_or_path, with the base model here)",
        )
    return path.resolve()


def _hub_snapshot(repo_id: str) -> Path:
    folder = hub.snapshot(repo_id, "model")
    if not (folder / "config.json").is_file():
        raise TunelabError(f"the snapshot of {repo_id} in {folder} holds no config.json", where="model_name_or_path",
                           fix=f"re-download it (`hf download {repo_id}`) or give a local model folder")
    return folder


# --- devices and dtypes ---------------------------------------------------------------

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` -> cuda, else mps, else cpu; an explicit device must exist. Under a launcher
    (torchrun, accelerate launch) `auto` is the process's own GPU, cuda:LOCAL_RANK."""
    if isinstance(device, torch.device):
        return device
    name = device.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            local_rank = os.environ.get("LOCAL_RANK") if "WORLD_SIZE" in os.environ else None
            if local_rank is not None and local_rank.isdigit():
                return resolve_device(f"cuda:{local_rank}")
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise TunelabError(f"device={device!r} is not a device", where="config",
                           fix="use device=auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise TunelabError(f"device={device} but this machine has no CUDA GPU visible to torch",
                               where="config", fix="use device=auto or device=cpu")
        index = resolved.index if resolved.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise TunelabError(f"device={device} but only {torch.cuda.device_count()} GPU(s) exist",
                               where="config", fix=f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise TunelabError(f"device={device} but MPS is not available", where="config",
                           fix="use device=auto or device=cpu")
    return resolved


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type in ("cpu", "mps")


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """`auto` -> bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU/MPS (half
    precision on CPU is slow and gains nothing); an explicit bf16 needs hardware support."""
    device = device or torch.device("cpu")
    if isinstance(dtype, torch.dtype):
        chosen = dtype
    elif dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if bf16_supported(device) else torch.float16
    elif dtype.lower() in DTYPES:
        chosen = DTYPES[dtype.lower()]
    else:
        raise TunelabError(f"dtype={dtype!r} is not a dtype", where="config",
                           fix="use auto, float32, bfloat16 or float16")
    if chosen == torch.bfloat16 and not bf16_supported(device):
        raise TunelabError(f"this GPU ({torch.cuda.get_device_name(device)}) does not support bfloat16",
                           where="config", fix="use float16 (fp16=true) or float32")
    return chosen


# --- loading ----------------------------------------------------------------------

def load_tokenizer(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False):
    """The tokenizer, with a pad token and right padding (generation code sets left itself)."""
    from transformers import AutoTokenizer

    path = _tokenizer_folder(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise TunelabError(f"could not load a tokenizer from {path} ({exc})", where="model_name_or_path",
                           fix="the folder needs tokenizer.json or tokenizer_config.json + vocabulary files") from None
    ensure_pad_token(tokenizer, where=str(path))
    tokenizer.padding_side = "right"
    tokenizer.name_or_path = str(name_or_path)
    return tokenizer


def _tokenizer_folder(name_or_path) -> Path:
    # A training output (adapter + tokenizer, no config.json) is a valid tokenizer source too.
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return path.resolve()
    return resolve_model_path(name_or_path)


def ensure_pad_token(tokenizer, where: str) -> None:
    """Pad with eos, else `<|endoftext|>`, else unk: labels mask padding, so which token pads does not
    matter, and reusing one keeps the vocabulary (and the embedding matrix) unchanged."""
    if tokenizer.pad_token is not None:
        return
    vocab = tokenizer.get_vocab()
    for candidate in (tokenizer.eos_token, "<|endoftext|>", tokenizer.unk_token):
        if candidate is not None and candidate in vocab:
            tokenizer.pad_token = candidate
            return
    raise TunelabError("the tokenizer has no pad, eos, <|endoftext|> or unk token to pad with", where=where,
                       fix="add a pad_token to tokenizer_config.json")


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    quantization_bit: int | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    rope_scaling: dict | str | None = None,
    cutoff_len: int = 0,
):
    """A causal LM on `device` in `dtype`; 4/8-bit through bitsandbytes (CUDA only) for QLoRA;
    `rope_scaling` (see model/rope.py) rescales positions for `cutoff_len` tokens. Gradient
    checkpointing is training's to switch on (`adapters.prepare_for_training`)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    kwargs: dict = dict(dtype=torch_dtype, local_files_only=True, trust_remote_code=trust_remote_code)
    if rope_scaling:
        kwargs["config"] = _scaled_config(path, rope_scaling, cutoff_len, trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_bit:
        kwargs["quantization_config"] = bitsandbytes_config(quantization_bit, target)
        kwargs["device_map"] = {"": target}  # bitsandbytes quantizes while placing the weights
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise TunelabError(f"could not load the model in {path} ({str(exc).splitlines()[0]})",
                           where="model_name_or_path",
                           fix="check the folder holds config.json and complete *.safetensors; "
                               "for attn_implementation use eager, sdpa or flash_attention_2") from None
    if not quantization_bit:
        model.to(target)
    # PEFT records name_or_path as the adapter's base_model_name_or_path: it must be a name that
    # AutoPeftModelForCausalLM resolves (a hub id, or a folder, the embedded alias's converted one).
    # The name the user gave (e.g. the alias) goes to tunelab's own metadata (adapters.BASE_FILE).
    model.name_or_path = model.config.name_or_path = loadable_name(name_or_path, path)
    model.tunelab_base_model = str(name_or_path)
    return model


def _scaled_config(path: Path, rope_scaling, cutoff_len: int, trust_remote_code: bool):
    from transformers import AutoConfig

    from tunelab.model.rope import apply_rope_scaling

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    params = apply_rope_scaling(config, rope_scaling, cutoff_len)
    print(f"rope_scaling: {params['rope_type']} x{params['factor']:g}, max_position_embeddings "
          f"{config.max_position_embeddings}", file=sys.stderr)
    return config


def bitsandbytes_config(bits: int, device: torch.device):
    """NF4 with double quantization and bf16 compute (QLoRA's recipe), or LLM.int8."""
    check_quantization_bit(bits)
    if device.type != "cuda":
        raise TunelabError(f"quantization_bit={bits} needs a CUDA GPU (bitsandbytes), but the device is {device}",
                           where="config", fix="run on an NVIDIA GPU, or drop quantization_bit to train plain LoRA")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TunelabError(f"quantization_bit={bits} needs the bitsandbytes package, which is not installed",
                           where="config", fix="pip install 'tunelab[quant]' (or pip install bitsandbytes) "
                                               "on a machine with a CUDA GPU") from None
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if bf16_supported(device) else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in backward. Non-reentrant checkpointing gives gradients to
    frozen-input layers too (LoRA, freeze); input grads make the reentrant variant safe
    should a model force it."""
    # transformers 5.2x renamed it (the old name warns and goes in v6); older 5.x has only the old one.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False  # a KV cache is useless in training and clashes with recomputation
