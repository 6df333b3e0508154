"""Resolving model names offline, loading tokenizers and models, devices and dtypes."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from tunelab.errors import TunelabError
from tunelab.model.loader import (
    ensure_pad_token,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, qwen2_tokenizer):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama(qwen2_tokenizer).save_pretrained(folder)
    qwen2_tokenizer.save_pretrained(folder)
    return folder


def test_local_folder_resolves_to_itself(tiny_folder):
    assert resolve_model_path(str(tiny_folder)) == tiny_folder.resolve()


def test_folder_without_config_lists_what_it_holds(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "checkpoint-10").mkdir()
    with pytest.raises(TunelabError) as err:
        resolve_model_path(str(tmp_path))
    assert "config.json" in err.value.what
    assert "weights.bin" in err.value.what and "checkpoint-10/" in err.value.what


def test_a_file_is_not_a_model_folder(tmp_path):
    model_file = tmp_path / "model.safetensors"
    model_file.write_bytes(b"")
    with pytest.raises(TunelabError, match="is a file"):
        resolve_model_path(str(model_file))


def test_hub_id_missing_from_the_cache_names_id_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(TunelabError) as err:
        resolve_model_path("Qwen/Qwen2.5-7B-Instruct")
    assert "Qwen/Qwen2.5-7B-Instruct" in err.value.what
    assert str(tmp_path / "models--Qwen--Qwen2.5-7B-Instruct") in err.value.what
    assert "copy" in err.value.fix and "path" in err.value.fix
    assert "`hf download Qwen/Qwen2.5-7B-Instruct`" in err.value.fix  # huggingface_hub 1.x has no huggingface-cli


def test_hub_id_missing_from_the_cache_downloads_when_online(tmp_path, monkeypatch, qwen2_tokenizer):
    """As transformers does: the cache first, the Hub only when the user has not set offline mode."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    real = huggingface_hub.snapshot_download
    downloaded = tmp_path / "downloaded"
    tiny_llama(qwen2_tokenizer).config.save_pretrained(downloaded)

    def fake_snapshot_download(repo_id, *, repo_type, cache_dir, local_files_only=False):
        if local_files_only:
            return real(repo_id, repo_type=repo_type, cache_dir=cache_dir, local_files_only=True)
        return str(downloaded)  # stands in for the download: tests never touch the network

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model_path("acme/not-cached") == downloaded


def test_hub_id_in_the_cache_loads_offline(tmp_path, monkeypatch, qwen2_tokenizer):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--acme--tiny-chat"
    snapshot = repo / "snapshots" / ("a" * 40)
    tiny_llama(qwen2_tokenizer).save_pretrained(snapshot)
    qwen2_tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)

    assert resolve_model_path("acme/tiny-chat") == snapshot
    model = load_model("acme/tiny-chat", device="cpu")
    assert model.name_or_path == "acme/tiny-chat"  # what PEFT records as the adapter's base


def test_unknown_name_suggests_the_built_in_alias():
    with pytest.raises(TunelabError) as err:
        resolve_model_path("smollm2-135m")
    assert "smollm2-135m-instruct" in err.value.fix


def test_tokenizer_loads_from_a_training_output_and_pads_right(tmp_path, qwen2_tokenizer):
    # an adapter folder holds the tokenizer but no config.json
    (tmp_path / "adapter_config.json").write_text("{}")
    qwen2_tokenizer.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.padding_side == "right"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer("<|im_end|>").input_ids == qwen2_tokenizer("<|im_end|>").input_ids


class VocabOnly:
    """The four attributes `ensure_pad_token` reads; real tokenizers take seconds to copy."""

    def __init__(self, vocab, eos=None, unk=None):
        self.vocab, self.eos_token, self.unk_token, self.pad_token = vocab, eos, unk, None

    def get_vocab(self):
        return self.vocab


def test_pad_falls_back_to_eos_then_endoftext_then_unk():
    with_eos = VocabOnly({"</s>": 2, "<|endoftext|>": 3}, eos="</s>")
    ensure_pad_token(with_eos, where="test")
    assert with_eos.pad_token == "</s>"

    no_eos = VocabOnly({"<|endoftext|>": 3, "<unk>": 0}, unk="<unk>")
    ensure_pad_token(no_eos, where="test")
    assert no_eos.pad_token == "<|endoftext|>"

    only_unk = VocabOnly({"<unk>": 0}, unk="<unk>")
    ensure_pad_token(only_unk, where="test")
    assert only_unk.pad_token == "<unk>"

    with pytest.raises(TunelabError, match="no pad"):
        ensure_pad_token(VocabOnly({"a": 0}), where="tokenizer.json")


def test_model_loads_in_the_asked_dtype(tiny_folder):
    model = load_model(str(tiny_folder), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert load_model(str(tiny_folder), device="cpu").dtype == torch.float32  # auto on CPU


def test_gradient_checkpointing_is_switched_on_in_one_place_and_turns_off_the_kv_cache(tiny_folder):
    from tunelab.config import TunelabConfig
    from tunelab.model.adapters import prepare_for_training

    model = load_model(str(tiny_folder), device="cpu")
    assert not model.is_gradient_checkpointing  # loading never does it
    model = prepare_for_training(model, TunelabConfig(gradient_checkpointing=True))
    assert model.is_gradient_checkpointing and model.config.use_cache is False


def test_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(TunelabError, match="not a dtype"):
        resolve_dtype("float8", cpu)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_device_on_a_cpu_machine_is_a_clear_error():
    assert resolve_device("auto").type in ("cpu", "mps")
    with pytest.raises(TunelabError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(TunelabError, match="not a device"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_on_cpu_says_cuda_is_needed(tiny_folder, bits):
    with pytest.raises(TunelabError) as err:
        load_model(str(tiny_folder), device="cpu", quantization_bit=bits)
    assert "CUDA" in err.value.what and "bitsandbytes" in err.value.what
