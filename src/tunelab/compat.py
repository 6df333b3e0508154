"""Configs written for LLaMA-Factory, TRL (SFTConfig / DPOConfig / KTOConfig / ModelConfig),
PEFT (LoraConfig) or transformers (TrainingArguments), read as tunelab configs.

`translate(values)` turns every foreign key of `TABLE` into its tunelab key (or drops it when
it asks for what tunelab always does), noting each change in one log line; a key with no
equivalent is refused with what to use instead. Keys tunelab shares with those tools
(`learning_rate`, `lora_alpha`, `cutoff_len`...) pass through untouched; the few whose
values differ (`lora_target: all`, LLaMA-Factory template names) are translated.
`tunelab config convert` writes the result as a tunelab YAML.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from tunelab.errors import TunelabError

log = logging.getLogger("tunelab.config")

SOURCES = ("llamafactory", "trl", "peft", "transformers")
TOOL_NAMES = {"llamafactory": "LLaMA-Factory", "trl": "TRL", "peft": "PEFT", "transformers": "transformers"}

MULTI_GPU = ("tunelab runs several GPUs through torch.distributed (or deepspeed: zero2|zero3): set nproc_per_node=N "
             "(or `tunelab train CFG --nproc N`); distributed_strategy=fsdp shards weights, gradients and "
             "optimizer state like ZeRO-3, fsdp_cpu_offload=true offloads them (docs/distributed.md)")
ANSWER_ONLY = ("tunelab trains only the answers (assistant turns / the completion), never the prompt; "
               "to train on whole texts use the text format with stage=pt")
LENGTH = "cutoff_len bounds prompt + answer together; over it, truncation=context shortens the oldest turns first"


@dataclass(frozen=True)
class Rule:
    """How one foreign key becomes tunelab keys. `apply(value)` returns the tunelab values
    and the note to log, or raises TunelabError when the value has no equivalent."""

    sources: tuple[str, ...]
    apply: Callable[[object], tuple[dict, str]]


def rename(key: str, mapping: Callable | None = None):
    def apply(value):
        return {key: mapping(value) if mapping else value}, f"-> {key}"
    return apply


def dropped(expected, why: str, fix: str):
    """A key whose value `expected` is what tunelab always does; another value is refused."""
    expected = expected if isinstance(expected, tuple) else (expected,)

    def apply(value):
        if value in expected:
            return {}, f"dropped ({why})"
        raise TunelabError(f"has no tunelab equivalent (tunelab: {why})", fix=fix)
    return apply


def refused(fix: str):
    def apply(value):
        raise TunelabError("has no tunelab equivalent", fix=fix)
    return apply


def choice(mapping: dict, fix: str):
    """A value looked up in `mapping` (value -> tunelab values), else refused."""
    def apply(value):
        if value not in mapping:
            raise TunelabError("has no tunelab equivalent", fix=fix)
        return mapping[value], f"-> {', '.join(f'{k}={v}' for k, v in mapping[value].items()) or 'dropped'}"
    return apply


def _dtype(value):
    mapping = {"bfloat16": {"bf16": True}, "float16": {"fp16": True}, "float32": {"bf16": False, "fp16": False},
               "auto": {}}
    return choice(mapping, "use bf16=true, fp16=true, or leave both unset (auto)")(value)


def _do_train(value):
    return dropped(True, "`tunelab train` always trains",
                   "evaluate without training with `tunelab eval --model M --adapter RUN --data FILE`")(value)


def _init_lora_weights(value):
    if value is True or value == "gaussian":
        return {}, "dropped (the default LoRA init)" if value is True else "dropped"
    if isinstance(value, str) and value.startswith("pissa"):
        return {"pissa_init": True}, "-> pissa_init=true"
    raise TunelabError("has no tunelab equivalent", fix="use pissa_init=true, or leave it out")


def _use_peft(value):
    return ({"finetuning_type": "lora"}, "-> finetuning_type=lora") if value else \
        ({"finetuning_type": "full"}, "-> finetuning_type=full")


T, L, P, H = ("trl",), ("llamafactory",), ("peft",), ("transformers",)
TABLE: dict[str, Rule] = {
    # --- LLaMA-Factory ----------------------------------------------------------------------
    "do_train": Rule(L + H, _do_train),
    "do_eval": Rule(L + H, refused("set eval_strategy=steps (with eval_steps) and val_size or eval_dataset")),
    "do_predict": Rule(L + H, refused("predict after training with `tunelab eval --adapter RUN --data FILE`")),
    "overwrite_cache": Rule(L, lambda v: ({}, "dropped (tunelab keeps no tokenized-data cache)")),
    "preprocessing_num_workers": Rule(L, lambda v: ({}, "dropped (tunelab tokenizes in the training process)")),
    "dataloader_num_workers": Rule(L + H, lambda v: ({}, "dropped (batches are built in the training process)")),
    "ddp_timeout": Rule(L + H, lambda v: ({}, "dropped (several GPUs use torch.distributed's default timeout)")),
    "save_only_model": Rule(L + H, dropped(False, "checkpoints always keep the optimizer state, for resuming",
                                           "drop it; the final run folder holds only the model")),
    "pref_ftx": Rule(L, dropped((0, 0.0), "no SFT loss mixed into preference training",
                                "train SFT first, then the preference stage from its adapter")),
    "kto_chosen_weight": Rule(L, rename("kto_desirable_weight")),
    "kto_rejected_weight": Rule(L, rename("kto_undesirable_weight")),
    # deepspeed: the same key in tunelab (zero2 | zero3 | ds.json, train/deepspeed.py), so not translated.
    "fsdp": Rule(H, refused(MULTI_GPU)),
    "fsdp_config": Rule(H, refused(MULTI_GPU)),
    "flash_attn": Rule(L, refused("tunelab picks the attention kernel itself; padding_free=true uses varlen "
                                  "flash attention on CUDA")),
    "use_unsloth": Rule(L, refused("tunelab's speed levers (padding_free, fused_loss, torch_compile) are chosen "
                                   "automatically on CUDA; see docs/benchmarks.md")),
    # --- TRL ----------------------------------------------------------------------------------
    "max_length": Rule(T, rename("cutoff_len")),
    "max_seq_length": Rule(T, rename("cutoff_len")),
    "max_prompt_length": Rule(T, refused(LENGTH)),
    # max_completion_length: the same key in tunelab (grpo / ppo sampling length), so not translated.
    "completion_only_loss": Rule(T, dropped((True, None), "tunelab trains only the completion", ANSWER_ONLY)),
    "assistant_only_loss": Rule(T, dropped((True,), "tunelab trains only assistant turns", ANSWER_ONLY)),
    "dataset_text_field": Rule(T, dropped("text", "the text format reads the text field",
                                          "rename the column to text, or name the dataset in a dataset_info.json "
                                          "with columns: {prompt: YOUR_FIELD} and set dataset_dir")),
    "dataset_num_proc": Rule(T, lambda v: ({}, "dropped (tunelab tokenizes in the training process)")),
    "beta": Rule(T, rename("pref_beta")),
    "loss_type": Rule(T, lambda v: ({}, "dropped (the SFT loss)") if v == "nll" else rename("pref_loss")(v)),
    "label_smoothing": Rule(T, rename("pref_label_smoothing")),
    "desirable_weight": Rule(T, rename("kto_desirable_weight")),
    "undesirable_weight": Rule(T, rename("kto_undesirable_weight")),
    "rpo_alpha": Rule(T, refused("tunelab's DPO has no SFT term; train SFT first, then DPO from its adapter")),
    "dataset_name": Rule(T, rename("dataset")),
    "dataset_train_split": Rule(T, dropped("train", "a file is one split", "give the split's file as dataset")),
    "dataset_test_split": Rule(T, refused("give the test file as eval_dataset")),
    "use_peft": Rule(T, _use_peft),
    "lora_r": Rule(T, rename("lora_rank")),
    "lora_target_modules": Rule(T, rename("lora_target")),
    "load_in_4bit": Rule(T, choice({True: {"quantization_bit": 4}, False: {}},
                                   "use quantization_bit=4")),
    "load_in_8bit": Rule(T, choice({True: {"quantization_bit": 8}, False: {}},
                                   "use quantization_bit=8")),
    "bnb_4bit_quant_type": Rule(T, dropped("nf4", "4-bit weights are NF4", "drop it: tunelab quantizes to NF4")),
    "torch_dtype": Rule(T + H, _dtype),
    "dtype": Rule(T + H, _dtype),
    "use_liger_kernel": Rule(T + H, refused("tunelab's own fused_loss (chunked LM head + loss) and torch_compile "
                                            "levers do this; both are chosen automatically on CUDA")),
    # --- PEFT (LoraConfig) ------------------------------------------------------------------------
    "r": Rule(P, rename("lora_rank")),
    "target_modules": Rule(P, rename("lora_target")),
    "task_type": Rule(P, dropped("CAUSAL_LM", "tunelab trains causal language models",
                                 "tunelab trains causal LMs only (task_type=CAUSAL_LM)")),
    "bias": Rule(P, dropped("none", "LoRA trains no biases", "tunelab's LoRA trains no biases: use bias=none")),
    "inference_mode": Rule(P, dropped(False, "a training config", "drop it")),
    "init_lora_weights": Rule(P, _init_lora_weights),
    "peft_type": Rule(P, dropped("LORA", "LoRA", "tunelab trains LoRA adapters (and full / freeze fine-tuning)")),
    "base_model_name_or_path": Rule(P, rename("model_name_or_path")),
    "modules_to_save": Rule(P, refused("finetuning_type=freeze trains whole modules (freeze_trainable_modules), "
                                       "or finetuning_type=full")),
    # --- transformers (TrainingArguments) ---------------------------------------------------------
    "evaluation_strategy": Rule(H, rename("eval_strategy")),
    "logging_dir": Rule(H, refused("drop it: the logs are written inside output_dir")),
}

# LLaMA-Factory template names -> tunelab's built-in of the same prompt (None: none built in).
LLAMAFACTORY_TEMPLATES = {
    "qwen": "qwen2.5", "qwen2_vl": None, "llama3": "llama3", "gemma": "gemma2", "phi": "phi3.5",
    "deepseekr1": "deepseek-r1", "deepseek3": None, "mistral": None, "llama2": None, "default": None,
    "empty": None, "alpaca": None, "vicuna": None, "chatglm3": None, "yi": None, "baichuan2": None,
}


def _template(value, notes: list[str]):
    if value not in LLAMAFACTORY_TEMPLATES:
        return value
    ours = LLAMAFACTORY_TEMPLATES[value]
    if ours is None:
        raise TunelabError(f"LLaMA-Factory's template {value!r} has no built-in tunelab twin", where="template",
                           fix="use template=auto (the model's own chat template), a built-in "
                               "(qwen2.5, qwen3, llama3, llama3.2, gemma2, ...) or a .jinja file")
    if ours != value:
        notes.append(f"template: {value!r} (LLaMA-Factory) -> template={ours}")
    return ours


def _lora_target(value, notes: list[str]):
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if isinstance(items, list) and "all" in items:
        notes.append(f"lora_target: {value!r} (LLaMA-Factory) -> lora_target=all-linear")
        return ["all-linear" if v == "all" else v for v in items]
    return value


def _stage(values: dict, notes: list[str]) -> dict:
    """LLaMA-Factory writes SimPO and ORPO as stage=dpo with pref_loss=simpo / orpo."""
    if values.get("stage") == "dpo" and values.get("pref_loss") in ("simpo", "orpo"):
        loss = values.pop("pref_loss")
        notes.append(f"stage: 'dpo' with pref_loss: {loss!r} (LLaMA-Factory) -> stage={loss}")
        values["stage"] = loss
    return values


SAME_NAME_VALUES = {"template": _template, "lora_target": _lora_target}


def translate(values: dict, source: str = "auto", where: str = "config") -> dict:
    """`values` with every foreign key turned into tunelab's (see the module docstring).
    The notes go to the log, one line each."""
    out, notes = translate_with_notes(values, source, where)
    for note in notes:
        log.info("%s", note)
    return out


def translate_with_notes(values: dict, source: str = "auto", where: str = "config") -> tuple[dict, list[str]]:
    if source != "auto" and source not in SOURCES:
        raise TunelabError(f"unknown source {source!r}", where="--from", fix=f"use one of auto, {', '.join(SOURCES)}")
    out: dict = {}
    notes: list[str] = []
    foreign = {k: v for k, v in values.items() if k in TABLE and (source == "auto" or source in TABLE[k].sources)}
    for key, value in values.items():
        if key in foreign:
            continue
        out[key] = SAME_NAME_VALUES[key](value, notes) if key in SAME_NAME_VALUES and value is not None else value
    for key, value in foreign.items():
        rule = TABLE[key]
        tool = "/".join(TOOL_NAMES[s] for s in rule.sources)
        try:
            updates, note = rule.apply(value)
        except TunelabError as exc:
            raise TunelabError(f"{key}={value!r} ({tool} key) {exc.what}", where=where, fix=exc.fix) from None
        for new_key, new_value in updates.items():
            if new_key in out and out[new_key] != new_value:
                raise TunelabError(f"{key} ({tool}'s name for {new_key}) and {new_key} are both given",
                                   where=where, fix=f"keep only {new_key}")
            if new_key in SAME_NAME_VALUES and new_value is not None:
                new_value = SAME_NAME_VALUES[new_key](new_value, notes)
            out[new_key] = new_value
        notes.append(f"{key}: {value!r} ({tool}) {note}")
    return _stage(out, notes), notes


# --- `tunelab config convert` ------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("config", help="convert LLaMA-Factory / TRL / PEFT configs to tunelab's",
                              description="Work with configs written for other tools.")
    sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    c = sub.add_parser("convert", help="write the tunelab YAML equivalent of a LLaMA-Factory / TRL / PEFT config",
                       description="Translate every foreign key (one line each says how) and write a tunelab YAML "
                                   "that `tunelab train` runs as is. A key with no equivalent stops with what to use.",
                       epilog="example: tunelab config convert llama3_lora_sft.yaml -o tunelab.yaml")
    c.add_argument("file", help="a YAML or JSON config (LLaMA-Factory YAML, TRL/PEFT settings, adapter_config.json)")
    c.add_argument("--from", dest="source", default="auto", choices=("auto",) + SOURCES,
                   help="whose key names to read (default: any)")
    c.add_argument("-o", "--output", help="the tunelab YAML to write (default: print it)")
    c.set_defaults(func=run_convert)


def convert_file(path, source: str = "auto") -> tuple[dict, list[str]]:
    """(tunelab values, notes) of a foreign config file, checked by building the config."""
    from pathlib import Path

    from tunelab.config import build_config, read_yaml_file

    path = Path(path)
    values, notes = translate_with_notes(read_yaml_file(path), source, where=str(path))
    left = [k for k in values if k in TABLE]  # names of another tool than --from says
    if left:
        tools = "/".join(TOOL_NAMES[s] for s in TABLE[left[0]].sources)
        raise TunelabError(f"{left[0]} is a {tools} key, not a {TOOL_NAMES[source]} one", where=str(path),
                           fix="use --from auto (the default) to translate every tool's names")
    build_config(values, where=str(path))  # every value checked as `tunelab train` would
    return values, notes


def run_convert(args) -> int:
    import sys

    import yaml

    values, notes = convert_file(args.file, args.source)
    header = "".join(f"# {note}\n" for note in notes)
    text = f"# converted by `tunelab config convert {args.file}`\n{header}" + \
        yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
    if args.output:
        from tunelab.io import write_text_atomic

        write_text_atomic(args.output, text)
        print(f"wrote {args.output} ({len(notes)} key(s) translated)", file=sys.stderr)
    else:
        print(text, end="")
    return 0
