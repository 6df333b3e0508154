"""Every YAML block of docs/migrating.md loads, converts to the same config, and dry-runs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import CACHE, REPO, shared_tokenizer
from tunelab.cli import main
from tunelab.config import load_config

LF = Path(__file__).parent / "fixtures" / "llamafactory"
BLOCK = re.compile(r"```yaml\n# file: (\S+)\n(.*?)```", re.DOTALL)
BLOCKS = dict(BLOCK.findall((REPO / "docs" / "migrating.md").read_text(encoding="utf-8")))

# The data files the TRL / PEFT examples name, one record each in the tool's own format.
DATA = {
    "prompt_completion.jsonl": {"prompt": [{"role": "user", "content": "What is 2+2?"}],
                                "completion": [{"role": "assistant", "content": "4"}]},
    "preference.jsonl": {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    "unpaired.jsonl": {"prompt": "What is 2+2?", "completion": "4", "label": True},
    "messages.jsonl": {"messages": [{"role": "user", "content": "What is 2+2?"},
                                    {"role": "assistant", "content": "4"}]},
}


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """A working folder with LLaMA-Factory's data/ and the TRL / PEFT data files."""
    shutil.copytree(LF / "data", tmp_path / "data")
    for name, record in DATA.items():
        (tmp_path / "data" / name).write_text(json.dumps(record) + "\n")
    for name, text in BLOCKS.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_page_has_every_example():
    assert set(BLOCKS) == {"llama3_lora_sft.yaml", "trl_sft.yaml", "trl_dpo.yaml", "trl_kto.yaml", "peft_lora.yaml"}
    # The LLaMA-Factory example is the very file the compat tests run.
    assert BLOCKS["llama3_lora_sft.yaml"].strip() in (LF / "llama3_lora_sft.yaml").read_text()


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_example_converts_to_the_same_config(folder, name):
    direct = load_config(name)
    assert main(["config", "convert", name, "-o", "converted.yaml"]) == 0
    converted = load_config("converted.yaml")
    assert converted.to_dict() == direct.to_dict()
    assert not set(yaml.safe_load(Path(name).read_text())) <= set(yaml.safe_load(Path("converted.yaml").read_text()))


def test_examples_translate_what_they_say(folder):
    sft, dpo, kto, peft = (load_config(n) for n in ("trl_sft.yaml", "trl_dpo.yaml", "trl_kto.yaml", "peft_lora.yaml"))
    assert (sft.cutoff_len, sft.lora_rank, sft.lora_target, sft.finetuning_type) == (512, 16, ["all-linear"], "lora")
    assert sft.lr_scheduler_kwargs == {"min_lr_rate": 0.1} and sft.dataset == ["data/prompt_completion.jsonl"]
    assert (dpo.pref_beta, dpo.pref_loss, dpo.cutoff_len) == (0.1, "sigmoid", 1024)
    assert (kto.stage, kto.kto_undesirable_weight) == ("kto", 1.33)
    assert (peft.lora_rank, peft.lora_target, peft.pissa_init) == (16, ["q_proj", "k_proj", "v_proj", "o_proj"], True)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_example_dry_runs(folder, name, capsys):
    extra = []
    if name == "llama3_lora_sft.yaml":  # Meta-Llama-3-8B is not here: its tokenizer is
        shared_tokenizer("llama3")
        extra = [f"model_name_or_path={CACHE / 'test-tokenizers' / 'llama3'}"]
    assert main(["train", name, *extra, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[[" in out and "dry run: no weights loaded" in out
