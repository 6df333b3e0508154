"""`tunelab merge`: fold a LoRA adapter (LoRA, rsLoRA, DoRA) into its base model's weights.

The merged folder is a plain HF model: sharded safetensors, config, generation config,
the tokenizer and chat template, and every other non-weight file of the base. It is
built in a temporary folder beside the destination and renamed into place only after
two checks pass, so a failed merge leaves nothing half-written:

1. merge: the merged model's logits on a probe input equal those of base + adapter
   (both in fp32, where the fold is exact up to rounding) within `MERGE_TOLERANCE`;
2. save: the folder, loaded back, gives the same logits as the merged model in memory.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.data.templates import TemplateLock, attach_lock, choose_template, save_lock, stop_tokens, template_lock
from tunelab.errors import TunelabError
from tunelab.io import atomic_path
from tunelab.model.adapters import adapter_tokenizer, load_adapter, read_adapter_config, set_stop_tokens
from tunelab.model.loader import DTYPES, load_model, resolve_model_path

# max |delta logit| <= MERGE_TOLERANCE * max(1, max |logit|): fp32 sums in another order.
MERGE_TOLERANCE = 1e-4
SAVE_TOLERANCE = 1e-5  # reloading the saved shards must give back the same numbers
PROBE_TEXT = "Merging check: does the folded model answer like base + adapter? 你好，世界！"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


@dataclass
class MergeReport:
    out_dir: Path
    dtype: str
    merge_max_diff: float  # fp32, merged vs base + adapter
    merge_bound: float
    save_max_diff: float  # saved folder vs the merged model in memory
    probe_tokens: int
    copied_files: list[str]

    def summary(self) -> str:
        return (f"merged model written to {self.out_dir} ({self.dtype}, sharded safetensors)\n"
                f"check: logits on a {self.probe_tokens}-token probe, merged vs base+adapter in fp32: "
                f"max |diff| {self.merge_max_diff:.2e} <= {self.merge_bound:.2e} "
                f"(tolerance {MERGE_TOLERANCE:g} x max(1, max|logit|))\n"
                f"check: reloaded from disk vs in memory ({self.dtype}): max |diff| {self.save_max_diff:.2e} "
                f"<= {SAVE_TOLERANCE:g}\n"
                f"copied from the base: {', '.join(self.copied_files) or 'nothing else'}")


def merge_adapter(model: str | None, adapter: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "auto",
                  max_shard_size: str = "2GB", force_base: bool = False, template: str | None = None,
                  force_template: bool = False) -> MergeReport:
    """Fold `adapter` into `model` and write the result to `out_dir` (replaced atomically).

    The merged folder keeps the adapter's trained template (tokenizer `chat_template`, lock
    file, stop tokens in generation_config.json); `template` replaces it only where it
    prompts the same way, or with `force_template`. `model=None` takes the base the adapter
    records (`base_model_name_or_path` in adapter_config.json)."""
    adapter_dir = Path(adapter).expanduser()
    adapter_config = read_adapter_config(adapter_dir)
    model = model or recorded_base(adapter_config, adapter_dir)
    base_dir = resolve_model_path(model)
    check_same_base(model, base_dir, adapter_config, adapter_dir, force_base)
    out_dir = Path(out_dir).expanduser()
    if out_dir.resolve() in (base_dir.resolve(), adapter_dir.resolve()):
        raise TunelabError(f"--out {out_dir} is the base or adapter folder itself", where="--out",
                           fix="write the merged model to a new folder, e.g. --out merged/")
    target_dtype = output_dtype(dtype, base_dir)

    tokenizer = adapter_tokenizer(model, adapter_dir)
    lock = merged_template(tokenizer, template, force_template)
    probe = tokenizer(PROBE_TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    # The fold is done in fp32 on the CPU: exact enough to check tightly, and the
    # rounding to the output dtype happens once, at the end.
    peft_model = load_adapter(load_model(model, dtype="float32", device="cpu"), adapter_dir)
    reference = probe_logits(peft_model, probe)
    merged = peft_model.merge_and_unload(safe_merge=True)
    del peft_model
    merge_diff, bound = compare_logits(probe_logits(merged, probe), reference, MERGE_TOLERANCE,
                                       what="the merged model's logits differ from base + adapter",
                                       where=str(adapter_dir))
    cast_parameters(merged, target_dtype)
    merged.config.use_cache = True  # training may have switched it off; a served model wants it
    if lock is not None:
        set_stop_tokens(merged, tokenizer, lock.stop_tokens)
    expected = probe_logits(merged, probe)

    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        del merged
        gc.collect()
        write_merged_card(tmp, out_dir, model, base_dir, adapter_dir, lock)  # before the base's own README
        copied = copy_non_weight_files(base_dir, tmp)
        tokenizer.save_pretrained(tmp)  # the adapter's own tokenizer when training saved one
        save_lock(tokenizer, tmp)
        save_diff = check_saved(tmp, probe, expected)
    return MergeReport(out_dir, dtype_name(target_dtype), merge_diff, bound, save_diff, probe.shape[1], copied)


def merged_template(tokenizer, template: str | None, force: bool):
    """The lock the merged folder carries: the adapter's, or `--template` where it prompts
    the same way (or is forced, or the adapter has no lock)."""
    lock = template_lock(tokenizer)
    if template is None:
        return lock
    source = choose_template(template, tokenizer, lock, force=force)
    if lock is None or source != lock.chat_template:
        lock = TemplateLock(source, template, stop_tokens(tokenizer, source), lock.system_prompt if lock else None)
        attach_lock(tokenizer, lock)
    return lock


def write_merged_card(folder: Path, out_dir: Path, model: str, base_dir: Path, adapter_dir: Path, lock) -> None:
    """README.md of the merged folder: its base, and the run's metrics and config when the adapter
    is a training run's folder."""
    import yaml

    from tunelab.model.card import write_model_card
    from tunelab.model.loader import loadable_name
    from tunelab.train.runlog import LOG_NAME, read_log
    from tunelab.train.tracking import final_metrics

    config_file, log = adapter_dir / "config.yaml", adapter_dir / LOG_NAME
    write_model_card(folder, path=out_dir, kind="full", base_model=model, base_model_path=loadable_name(model, base_dir),
                     config=yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None,
                     metrics=final_metrics(read_log(log)) if log.is_file() else None, lock=lock)


def recorded_base(adapter_config: dict, adapter_dir: Path) -> str:
    recorded = adapter_config.get("base_model_name_or_path")
    if not recorded:
        raise TunelabError("the adapter records no base model", where=str(adapter_dir / "adapter_config.json"),
                           fix="name the base: --model ALIAS_OR_FOLDER")
    return str(recorded)


def check_same_base(model: str, base_dir: Path, adapter_config: dict, adapter_dir: Path, force: bool) -> None:
    """Refuse an adapter recorded against a differently named base (shapes are checked on load)."""
    from tunelab.model.adapters import read_base

    recorded = (read_base(adapter_dir) or {}).get("base_model") or adapter_config.get("base_model_name_or_path")
    if force or not recorded:
        return
    names = {Path(str(recorded)).name.lower(), Path(str(adapter_config.get("base_model_name_or_path"))).name.lower()}
    given = {Path(model).name.lower(), base_dir.name.lower()}
    if names & given:
        return
    raise TunelabError(f"the adapter was trained on {recorded}, not on {model}",
                       where=str(adapter_dir / "adapter_config.json"),
                       fix=f"pass --model {recorded}, or add --force-base if {model} is the same model under another name")


def output_dtype(dtype: str, base_dir: Path) -> torch.dtype:
    if dtype == "auto":
        config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
        recorded = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
        return DTYPES.get(str(recorded), torch.bfloat16)
    if dtype.lower() not in DTYPES:
        raise TunelabError(f"--dtype {dtype} is not a dtype", where="--dtype",
                           fix="use auto (the base's own), bf16, fp16 or fp32")
    return DTYPES[dtype.lower()]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.inference_mode()
def probe_logits(model, probe: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=probe.to(next(model.parameters()).device)).logits.float().cpu()


def compare_logits(got: torch.Tensor, want: torch.Tensor, tolerance: float, what: str, where: str) -> tuple[float, float]:
    diff = (got - want).abs().max().item()
    bound = tolerance * max(1.0, want.abs().max().item())
    if not diff <= bound:  # also catches NaN
        raise TunelabError(f"{what}: max |diff| {diff:.3e} > {bound:.3e}; nothing was written", where=where,
                           fix="check the adapter loads with this base (tunelab chat --adapter ...) and report the "
                               "model and adapter if it does")
    return diff, bound


def copy_non_weight_files(base_dir: Path, dest: Path) -> list[str]:
    """Every file of the base that is not a weight and that saving did not already write."""
    copied = []
    for path in sorted(base_dir.rglob("*")):
        rel = path.relative_to(base_dir)
        if (not path.is_file() or rel.parts[0].startswith(".") or path.name.endswith(WEIGHT_SUFFIXES)
                or path.name in WEIGHT_INDEXES or (dest / rel).exists()):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)
        copied.append(str(rel))
    return copied


def cast_parameters(model, dtype: torch.dtype) -> None:
    """Cast the weights only: buffers such as RoPE's inv_freq stay fp32, as they are when the
    saved folder is loaded again (`model.to(dtype)` would round them and shift the logits)."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    model.config.dtype = dtype


def check_saved(folder: Path, probe: torch.Tensor, expected: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", local_files_only=True)
    got = probe_logits(reloaded, probe)
    del reloaded
    diff, _ = compare_logits(got, expected, SAVE_TOLERANCE, what="the saved model does not reproduce the merged one",
                             where=str(folder))
    return diff
