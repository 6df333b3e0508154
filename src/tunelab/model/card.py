"""README.md model cards for the folders others load: a run (adapter or full weights) and a merge.

The card is what `huggingface_hub.upload_folder` / `push_to_hub` shows as the model page: the
Hub metadata (base model, library, tags) in YAML front matter, how to load the folder, the
final metrics, the prompt template the model was trained with and the training config.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tunelab.io import write_text_atomic

CARD = "README.md"
KINDS = {  # how each kind of folder loads
    "adapter": ("peft", "from peft import AutoPeftModelForCausalLM\n\n"
                        "model = AutoPeftModelForCausalLM.from_pretrained({path!r})"),
    "full": ("transformers", "from transformers import AutoModelForCausalLM\n\n"
                             "model = AutoModelForCausalLM.from_pretrained({path!r})"),
}


def model_card(*, kind: str, base_model: str, base_model_path: str, config: dict | None = None,
               metrics: dict | None = None, lock=None, path: str = ".") -> str:
    """The card's Markdown. `kind`: adapter | full; `base_model`: the name the user gave (an alias,
    a folder, a hub id); `base_model_path`: what loaders resolve; `lock`: the TemplateLock."""
    from tunelab import hub

    library, usage = KINDS[kind]
    config = config or {}
    front = {"library_name": library, "pipeline_tag": "text-generation",
             "tags": ["tunelab", str(config.get("stage", "sft")), str(config.get("finetuning_type", kind))]}
    if hub.is_hub_id(base_model) and not Path(base_model).exists():
        front["base_model"] = base_model  # the Hub links the page to its base (ids only, not folders)
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {Path(path).resolve().name}", "",
             f"Fine-tuned from `{base_model}` with [tunelab](https://pypi.org/project/tunelab/): stage "
             f"`{config.get('stage', 'sft')}`, `{config.get('finetuning_type', kind)}`"
             + (f", on {', '.join(f'`{d}`' for d in config['dataset'])}" if config.get("dataset") else "") + ".",
             "", "## Use", "", "```python", usage.format(path=path), "```", ""]
    if kind == "adapter":
        lines += [f"The base model it loads: `{base_model_path}` (`base_model_name_or_path` in adapter_config.json).",
                  ""]
    if metrics:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    if lock is not None:
        lines += ["## Prompt template", "",
                  f"Trained with template `{lock.template}`; turns end with {', '.join(f'`{t}`' for t in lock.stop_tokens)}."
                  " The tokenizer's `chat_template` is this template, so `tokenizer.apply_chat_template` prompts the "
                  "model as it was trained.", "", "```jinja", lock.chat_template.strip(), "```", ""]
    if config:
        lines += ["## Training configuration", "", "```yaml",
                  yaml.safe_dump(config, sort_keys=False, allow_unicode=True).strip(), "```", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, path: str | Path | None = None, **card) -> Path:
    """Write the card into `folder`; `path`: where the folder will be loaded from, if not there."""
    out = Path(folder) / CARD
    write_text_atomic(out, model_card(path=str(path or folder), **card))
    return out
