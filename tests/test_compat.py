"""Configs and datasets of LLaMA-Factory, TRL and PEFT read as tunelab's (compat.py, data/formats/llamafactory.py)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import CACHE, shared_tokenizer
from tunelab.cli import main
from tunelab.compat import TABLE, convert_file
from tunelab.config import load_config
from tunelab.data.readers import load_conversations, load_preferences
from tunelab.data.types import KTOExample, PreferencePair
from tunelab.errors import TunelabError

LF = Path(__file__).parent / "fixtures" / "llamafactory"


@pytest.fixture(scope="module")
def llama3_dir() -> str:
    shared_tokenizer("llama3")  # cached as an HF folder
    return str(CACHE / "test-tokenizers" / "llama3")


def test_llamafactory_example_loads_with_one_note_per_translated_key(monkeypatch, caplog):
    monkeypatch.chdir(LF)
    with caplog.at_level(logging.INFO, logger="tunelab"):
        cfg = load_config("llama3_lora_sft.yaml")
    assert (cfg.stage, cfg.finetuning_type, cfg.lora_rank, cfg.lora_target) == ("sft", "lora", 8, ["all-linear"])
    assert cfg.dataset == ["identity", "alpaca_en_demo"] and cfg.template == "llama3" and cfg.cutoff_len == 2048
    notes = caplog.text
    for key in ("do_train", "overwrite_cache", "preprocessing_num_workers", "dataloader_num_workers",
                "ddp_timeout", "save_only_model", "lora_target: 'all' (LLaMA-Factory) -> lora_target=all-linear"):
        assert key in notes


def test_llamafactory_example_dry_runs_unchanged(monkeypatch, capsys, llama3_dir):
    monkeypatch.chdir(LF)
    assert main(["train", "llama3_lora_sft.yaml", f"model_name_or_path={llama3_dir}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.split("=== resolved config ===\n")[1].split("===")[0])
    assert resolved["lora_target"] == ["all-linear"] and resolved["cutoff_len"] == 2048
    # identity.json's first record, in Llama 3's template, only the answer (and its end of turn) trained.
    assert "data/identity.json:record 1" in out
    assert "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>" in out
    assert "[[Hello! I am {{name}}" in out and "<|eot_id|>]]" in out


def test_dataset_info_names_resolve_with_their_mappings():
    convs = load_conversations(["identity", "alpaca_en_demo"], dataset_dir=LF / "data")
    assert len(convs) == 4 and convs[3].messages[0].content == "Transform the following sentence using a synonym:\n" \
                                                              "The car sped quickly."
    (tool_call,) = load_conversations(["glaive_toolcall_en_demo"], dataset_dir=LF / "data")
    assert [m.role for m in tool_call.messages] == ["user", "function_call", "tool", "assistant"]
    assert tool_call.tools[0]["name"] == "convert_currency"
    (renamed,) = load_conversations(["renamed_alpaca"], dataset_dir=LF / "data")
    assert [(m.role, m.content) for m in renamed.messages] == [("system", "You are terse."), ("user", "2+2?"),
                                                               ("assistant", "4")]
    text = load_conversations(["c4_demo"], dataset_dir=LF / "data")
    assert all(c.is_plain_text for c in text)


def test_dataset_info_ranking_and_kto_entries_are_preference_data():
    (pair,) = load_preferences(["dpo_en_demo"], dataset_dir=LF / "data")
    assert isinstance(pair, PreferencePair) and pair.chosen.content == "The capital of France is Paris."
    kto = load_preferences(["kto_en_demo"], dataset_dir=LF / "data")
    assert all(isinstance(k, KTOExample) for k in kto) and [k.desirable for k in kto] == [True, False]
    with pytest.raises(TunelabError, match="not conversations"):
        load_conversations(["dpo_en_demo"], dataset_dir=LF / "data")


def test_unknown_dataset_name_names_the_nearest():
    with pytest.raises(TunelabError, match="did you mean 'alpaca_en_demo'"):
        load_conversations(["alpaca_en_dem"], dataset_dir=LF / "data")
    with pytest.raises(TunelabError, match="set dataset_dir"):
        load_conversations(["some_name"])


def test_trl_and_peft_names_are_translated():
    cfg = load_config(overrides={"max_length": 512, "beta": 0.3, "loss_type": "ipo", "stage": "dpo",
                                 "completion_only_loss": True, "r": 16, "lora_alpha": 32,
                                 "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", "bias": "none"})
    assert (cfg.cutoff_len, cfg.pref_beta, cfg.pref_loss) == (512, 0.3, "ipo")
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_target) == (16, 32, ["q_proj", "v_proj"])


@pytest.mark.parametrize("key,value,fix", [
    ("completion_only_loss", False, "trains only the answers"),
    ("max_prompt_length", 256, "cutoff_len"),
    ("modules_to_save", ["lm_head"], "finetuning_type=freeze"),
    ("do_train", False, "tunelab eval"),
])
def test_keys_without_equivalent_say_what_to_use(key, value, fix):
    with pytest.raises(TunelabError) as info:
        load_config(overrides={key: value})
    assert key in info.value.what and fix in info.value.fix


def test_llamafactory_template_and_stage_names():
    assert load_config(overrides={"template": "qwen"}).template == "qwen2.5"  # Qwen2.5, not qwen3
    assert load_config(overrides={"stage": "dpo", "pref_loss": "simpo"}).stage == "simpo"
    with pytest.raises(TunelabError, match="template=auto"):
        load_config(overrides={"template": "mistral"})


def test_a_key_and_its_foreign_name_together_are_refused():
    with pytest.raises(TunelabError, match="keep only cutoff_len"):
        load_config(overrides={"max_length": 512, "cutoff_len": 1024})


def test_source_restricts_the_names_read(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("r: 4\nbeta: 0.1\n")
    with pytest.raises(TunelabError, match="beta is a TRL key, not a PEFT one"):
        convert_file(path, "peft")
    assert convert_file(path)[0] == {"lora_rank": 4, "pref_beta": 0.1}


def test_every_rule_names_its_tools():
    assert all(rule.sources for rule in TABLE.values())


def test_config_convert_writes_a_yaml_tunelab_runs(tmp_path, monkeypatch):
    trl = tmp_path / "trl_sft.yaml"
    trl.write_text("model_name_or_path: smollm2-135m-instruct\nmax_length: 256\nuse_peft: true\nlora_r: 4\n"
                   "lora_target_modules: all-linear\ncompletion_only_loss: true\nlearning_rate: 2.0e-4\n")
    out = tmp_path / "tunelab.yaml"
    assert main(["config", "convert", str(trl), "--from", "trl", "-o", str(out)]) == 0
    written = yaml.safe_load(out.read_text())
    assert written == {"model_name_or_path": "smollm2-135m-instruct", "learning_rate": 2.0e-4, "cutoff_len": 256,
                       "finetuning_type": "lora", "lora_rank": 4, "lora_target": "all-linear"}
    assert "# max_length: 256 (TRL) -> cutoff_len" in out.read_text()
    assert load_config(out).lora_rank == 4


def test_config_convert_keeps_llamafactory_datasets_runnable(tmp_path, monkeypatch):
    shutil.copytree(LF, tmp_path / "lf")
    monkeypatch.chdir(tmp_path / "lf")
    assert main(["config", "convert", "llama3_lora_sft.yaml", "-o", "tunelab.yaml"]) == 0
    cfg = load_config("tunelab.yaml")
    assert "do_train" not in Path("tunelab.yaml").read_text().split("\n# ")[-1]
    assert len(load_conversations(cfg.dataset, dataset_dir=cfg.dataset_dir)) == 4


def test_dataset_info_record_missing_its_answer_column_is_an_error(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{"d": {"file_name": "d.jsonl", "columns": {"prompt": "q", '
                                                '"response": "a"}}}')
    (tmp_path / "d.jsonl").write_text('{"q": "hi", "answer": "hello"}\n')
    with pytest.raises(TunelabError, match="missing column 'a' \\(the response column of d"):
        load_conversations(["d"], dataset_dir=tmp_path)


def test_no_foreign_key_shadows_a_tunelab_key():
    """A key tunelab itself defines (e.g. grpo's max_completion_length) is never translated or refused."""
    import dataclasses

    from tunelab.compat import TABLE
    from tunelab.config import TunelabConfig

    assert not set(TABLE) & {f.name for f in dataclasses.fields(TunelabConfig)}
