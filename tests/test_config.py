import pytest

from tunelab.config import TunelabConfig, load_config, parse_overrides
from tunelab.errors import TunelabError


def test_yaml_then_overrides_with_types(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    path = tmp_path / "c.yaml"
    path.write_text("dataset: train.jsonl\nlora_rank: 8\nlearning_rate: 2e-4\nbf16: false\n")
    cfg = load_config(path, ["lora_rank=16", "learning_rate=1e-4", "bf16=true", "lora_target=q_proj,v_proj"])
    assert cfg.lora_rank == 16 and isinstance(cfg.lora_rank, int)
    assert cfg.learning_rate == 1e-4
    assert cfg.bf16 is True
    assert cfg.lora_target == ["q_proj", "v_proj"]
    # A dataset path relative to the YAML resolves against the YAML's folder.
    assert cfg.dataset == [str(tmp_path / "train.jsonl")]


def test_unknown_key_names_the_nearest():
    with pytest.raises(TunelabError) as err:
        load_config(None, ["lora_rnak=4"])
    assert "lora_rnak" in str(err.value) and "lora_rank" in str(err.value)


def test_wrong_type_names_the_key():
    with pytest.raises(TunelabError) as err:
        load_config(None, ["per_device_train_batch_size=big"])
    assert "per_device_train_batch_size" in str(err.value)


def test_bad_choice_suggests_a_valid_one():
    with pytest.raises(TunelabError) as err:
        load_config(None, ["lr_scheduler_type=cosin"])
    assert "cosine" in str(err.value)


def test_inconsistent_settings_are_refused():
    with pytest.raises(TunelabError):
        TunelabConfig(bf16=True, fp16=True)
    with pytest.raises(TunelabError):
        TunelabConfig(load_best_model_at_end=True, eval_strategy="no")
    with pytest.raises(TunelabError):
        TunelabConfig(quantization_bit=4, finetuning_type="full")


def test_bad_yaml_reports_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_rank: 8\n  bad: [\n")
    with pytest.raises(TunelabError) as err:
        load_config(path)
    assert "c.yaml:" in str(err.value)


def test_override_must_be_key_value():
    with pytest.raises(TunelabError):
        parse_overrides(["lora_rank"])


def test_missing_config_file():
    with pytest.raises(TunelabError) as err:
        load_config("nope.yaml")
    assert "nope.yaml" in str(err.value)


def test_override_errors_name_the_command_line_not_the_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("learning_rate: 1e-4\n")
    with pytest.raises(TunelabError) as err:
        load_config(path, ["lora_rnk=8"])
    assert err.value.where == "command line (lora_rnk=...)"
    with pytest.raises(TunelabError) as err:
        load_config(path, ["lora_rank=many"])
    assert err.value.where == "command line (lora_rank=...)"
    path.write_text("lora_rank: many\n")
    with pytest.raises(TunelabError) as err:
        load_config(path, ["learning_rate=1e-4"])
    assert err.value.where == str(path)
