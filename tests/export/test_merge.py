"""`tunelab merge`: LoRA / rsLoRA / DoRA folded into the base, checked, written atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from conftest import tiny_lora_adapter as make_adapter
from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.export import merge as merge_module
from tunelab.export.merge import merge_adapter

PROBE = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])


def base_plus_adapter_logits(base_dir: Path, adapter_dir: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter_dir).eval()(PROBE).logits


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_merged_logits_equal_base_plus_adapter(tmp_path, tiny_model_dir, variant):
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", **variant)
    report = merge_adapter(str(tiny_model_dir), adapter, tmp_path / "merged", dtype="fp32", max_shard_size="2MB")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(PROBE).logits
    want = base_plus_adapter_logits(tiny_model_dir, adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        assert (base(PROBE).logits - want).abs().max() > 1e-2  # the adapter matters...
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # ...and the merge keeps it
    assert report.merge_max_diff <= report.merge_bound
    assert "max |diff|" in report.summary()
    assert not any("lora" in key for key in merged.state_dict())


def test_cli_writes_a_complete_sharded_model_and_reports_the_check(tmp_path, tiny_model_dir, capsys):
    (base := tmp_path / "base").mkdir()
    for f in tiny_model_dir.iterdir():
        shutil.copy2(f, base / f.name)
    (base / "README.md").write_text("model card")
    (base / "LICENSE").write_text("license text")
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "merged"
    code = main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out),
                 "--dtype", "bf16", "--max-shard-size", "2MB"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "merged vs base+adapter in fp32" in printed and "tolerance" in printed
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors.index.json" in names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "README.md", "LICENSE"):
        assert name in names, name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template  # the model's template travels with it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temp folder left over


def test_mismatched_base_is_refused(tmp_path, tiny_model_dir, qwen2_tokenizer):
    other = tmp_path / "other-base"
    tiny_llama(qwen2_tokenizer, hidden_size=32, intermediate_size=64).save_pretrained(other)
    qwen2_tokenizer.save_pretrained(other)
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    with pytest.raises(TunelabError, match="trained on .*tiny-model"):
        merge_adapter(str(other), adapter, tmp_path / "merged")
    with pytest.raises(TunelabError, match="weight shapes differ"):
        merge_adapter(str(other), adapter, tmp_path / "merged", force_base=True)
    assert not (tmp_path / "merged").exists()


def test_missing_adapter_folder_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    code = main(["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "m")])
    assert code == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_failed_check_leaves_nothing_and_keeps_an_old_output(tmp_path, tiny_model_dir, monkeypatch):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("previous merge")
    real = merge_module.probe_logits
    calls = iter(range(100))

    def corrupt_second_call(model, probe):
        logits = real(model, probe)
        return logits + 1.0 if next(calls) == 1 else logits  # the merged model's check fails

    monkeypatch.setattr(merge_module, "probe_logits", corrupt_second_call)
    with pytest.raises(TunelabError, match="nothing was written"):
        merge_adapter(str(tiny_model_dir), adapter, out)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_merge_round_trips_on_the_embedded_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from tunelab.model.loader import resolve_model_path

    base_dir = resolve_model_path("smollm2-135m-instruct")
    adapter = make_adapter(base_dir, tmp_path / "adapter")
    report = merge_adapter("smollm2-135m-instruct", adapter, tmp_path / "merged", dtype="fp32")
    assert report.merge_max_diff <= report.merge_bound and report.save_max_diff <= 1e-5
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(PROBE).logits
    torch.testing.assert_close(got, base_plus_adapter_logits(base_dir, adapter), atol=1e-3, rtol=1e-4)


def test_merge_takes_the_base_the_adapter_records(tmp_path, tiny_model_dir, capsys):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded).resolve() == Path(tiny_model_dir).resolve()
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "again")]) == 2
    assert "records no base model" in capsys.readouterr().err
