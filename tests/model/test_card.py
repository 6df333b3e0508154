"""Outputs others load: the adapter's base resolves in AutoPeftModelForCausalLM; README.md model cards."""

import json
from pathlib import Path

import pytest
import torch

from tunelab.config import load_config
from tunelab.model.adapters import BASE_FILE
from tunelab.model.embedded import ensure_embedded_model
from tunelab.model.loader import loadable_name, resolve_model_path
from tunelab.train import loop

pytestmark = pytest.mark.usefixtures("one_thread")
QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "data" / "quickstart.jsonl"


def tiny_run(tmp_path: Path, model: str, **overrides) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(QUICKSTART.read_text(encoding="utf-8").splitlines()[:8]) + "\n", encoding="utf-8")
    values = dict(model_name_or_path=model, dataset=[str(data)], cutoff_len=96, max_steps=2,
                  per_device_train_batch_size=2, lora_rank=4, lora_alpha=8, learning_rate=1e-2, logging_steps=1,
                  output_dir=str(tmp_path / "run"), report_to=["jsonl"], disable_tqdm=True, device="cpu",
                  val_size=2, eval_strategy="steps", eval_steps=2, save_strategy="no", eval_on_start=False)
    values.update(overrides)
    return loop.train(load_config(None, values)).output_dir


def test_loadable_name_keeps_hub_ids_and_resolves_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert loadable_name("Qwen/Qwen2.5-0.5B", Path("/cache/snapshot")) == "Qwen/Qwen2.5-0.5B"
    (tmp_path / "org" / "local").mkdir(parents=True)  # a relative folder that looks like an id is a folder
    assert loadable_name("org/local", (tmp_path / "org" / "local")) == str(tmp_path / "org" / "local")
    assert loadable_name("smollm2-135m-instruct", Path("/c/models/smollm2")) == "/c/models/smollm2"


def test_autopeft_loads_a_tiny_run_and_the_card_tells_how(tmp_path, tiny_model_dir):
    from peft import AutoPeftModelForCausalLM

    from tunelab.model.adapters import load_adapter
    from tunelab.model.loader import load_model

    run_dir = tiny_run(tmp_path, str(tiny_model_dir))
    adapter_config = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert json.loads((run_dir / BASE_FILE).read_text())["base_model"] == str(tiny_model_dir)

    theirs = AutoPeftModelForCausalLM.from_pretrained(run_dir).eval()
    ours = load_adapter(load_model(str(tiny_model_dir), device="cpu"), run_dir).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)

    card = (run_dir / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")
    assert "AutoPeftModelForCausalLM.from_pretrained" in card and "lora_rank: 4" in card
    assert "| eval_loss |" in card and "| train_loss |" in card and "global_step | 2" in card
    assert "## Prompt template" in card and "<|im_end|>" in card  # the qwen2 tokenizer's ChatML


def test_merged_folder_gets_a_card_with_the_runs_metrics(tmp_path, tiny_model_dir):
    from tunelab.export.merge import merge_adapter

    run_dir = tiny_run(tmp_path, str(tiny_model_dir))
    merge_adapter(str(tiny_model_dir), run_dir, tmp_path / "merged", dtype="fp32")
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "library_name: transformers" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert str(tmp_path / "merged") in card and "| eval_loss |" in card and "lora_rank: 4" in card


def test_hub_id_base_is_linked_in_the_card():
    from tunelab.model.card import model_card

    card = model_card(kind="adapter", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                      base_model_path="HuggingFaceTB/SmolLM2-135M-Instruct", path="out")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card


@pytest.mark.slow
def test_autopeft_resolves_the_embedded_default_model(tmp_path):
    from peft import AutoPeftModelForCausalLM

    run_dir = tiny_run(tmp_path, "smollm2-135m-instruct", max_steps=1, eval_strategy="no", val_size=0)
    base = json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(ensure_embedded_model("smollm2-135m-instruct")) == str(resolve_model_path("smollm2-135m-instruct"))
    assert json.loads((run_dir / BASE_FILE).read_text())["base_model"] == "smollm2-135m-instruct"
    assert AutoPeftModelForCausalLM.from_pretrained(run_dir).peft_config["default"].r == 4
