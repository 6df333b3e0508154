"""LoRA / freeze / full set-up, gradient checkpointing, and adapters on disk."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_llama as shared_tiny_llama
from tunelab.config import TunelabConfig
from tunelab.errors import TunelabError
from tunelab.model.adapters import (
    count_parameters,
    linear_module_names,
    load_adapter,
    prepare_for_training,
    save_trained,
)


def tiny_llama(tokenizer, **overrides):
    """The shared tiny Llama with a 1k vocabulary: the 150k-row Qwen embedding would dominate
    every test's time without testing anything more (batches use ids < 1000)."""
    return shared_tiny_llama(tokenizer, **{"vocab_size": 1024, "pad_token_id": 0, "bos_token_id": 1,
                                          "eos_token_id": 2, **overrides})


ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: extra threads only add overhead (a 64x128 SVD takes 100x longer on two
    busy cores than on one). Restored afterwards for the rest of the session."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(qwen2_tokenizer):
    return qwen2_tokenizer


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (2, 12))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def lora(tokenizer, **overrides):
    return prepare_for_training(tiny_llama(tokenizer), TunelabConfig(**overrides))


def perturb_lora(model, seed=0):
    """LoRA B starts at zero; give the adapter weights something to carry."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


# --- which parameters train -------------------------------------------------------

def test_all_linear_targets_every_linear_layer_but_lm_head(tokenizer):
    model = lora(tokenizer)
    assert linear_module_names(tiny_llama(tokenizer)) == ALL_LINEAR
    assert sorted(model.peft_config["default"].target_modules) == ALL_LINEAR
    names = trainable_names(model)
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert not any("lm_head" in n or "embed_tokens" in n for n in names)
    # r * (in + out) per wrapped linear layer, 7 per decoder layer, 2 layers
    hidden, inter, kv, r = 64, 128, 32, 8
    per_layer = r * ((hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + inter) * 2 + (inter + hidden))
    assert count_parameters(model)[0] == 2 * per_layer


def test_named_targets_wrap_only_those(tokenizer):
    model = lora(tokenizer, lora_target=["q_proj", "v_proj"])
    wrapped = {n.split(".")[-4] for n in trainable_names(model)}  # ...q_proj.lora_A.default.weight
    assert wrapped == {"q_proj", "v_proj"}


def test_unknown_target_lists_the_models_linear_layers(tokenizer):
    with pytest.raises(TunelabError) as err:
        lora(tokenizer, lora_target=["q_proj", "c_attn"])
    assert "c_attn" in err.value.what
    assert all(name in err.value.what for name in ALL_LINEAR)


def test_rslora_scales_by_the_square_root_of_rank(tokenizer):
    plain = lora(tokenizer, lora_rank=16, lora_alpha=32)
    rs = lora(tokenizer, lora_rank=16, lora_alpha=32, use_rslora=True)
    q_plain = plain.base_model.model.model.layers[0].self_attn.q_proj
    q_rs = rs.base_model.model.model.layers[0].self_attn.q_proj
    assert q_plain.scaling["default"] == pytest.approx(32 / 16)
    assert q_rs.scaling["default"] == pytest.approx(32 / 16**0.5)


def test_dora_adds_a_trainable_magnitude_per_layer(tokenizer):
    names = trainable_names(lora(tokenizer, use_dora=True))
    assert sum("lora_magnitude_vector" in n for n in names) == 2 * len(ALL_LINEAR)


def test_pissa_moves_weight_into_the_adapter_without_changing_the_output(tokenizer, batch):
    base = tiny_llama(tokenizer)
    before = logits(base, batch)
    q_before = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = prepare_for_training(base, TunelabConfig(pissa_init=True, lora_dropout=0.0))
    q_residual = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(q_residual, q_before)  # the principal part left the base weight
    assert torch.allclose(logits(model, batch), before, atol=1e-4)


def test_freeze_trains_only_the_last_layers(tokenizer):
    model = prepare_for_training(tiny_llama(tokenizer), TunelabConfig(finetuning_type="freeze",
                                                                      freeze_trainable_layers=1))
    names = trainable_names(model)
    assert names and all(n.startswith("model.layers.1.") for n in names)
    assert any(".mlp." in n for n in names) and any(".self_attn." in n for n in names)


def test_freeze_negative_counts_from_the_first_layer_and_modules_restrict(tokenizer):
    cfg = TunelabConfig(finetuning_type="freeze", freeze_trainable_layers=-1, freeze_trainable_modules=["mlp"])
    names = trainable_names(prepare_for_training(tiny_llama(tokenizer), cfg))
    assert names and all(n.startswith("model.layers.0.mlp.") for n in names)


def test_freeze_errors_name_the_fix(tokenizer):
    with pytest.raises(TunelabError, match="has 2 layers"):
        prepare_for_training(tiny_llama(tokenizer), TunelabConfig(finetuning_type="freeze",
                                                                  freeze_trainable_layers=3))
    with pytest.raises(TunelabError) as err:
        prepare_for_training(tiny_llama(tokenizer), TunelabConfig(finetuning_type="freeze",
                                                                  freeze_trainable_modules=["ffn"]))
    assert "mlp" in err.value.what and "self_attn" in err.value.what


def test_full_trains_everything_and_counts_tied_weights_once(tokenizer):
    model = prepare_for_training(tiny_llama(tokenizer), TunelabConfig(finetuning_type="full"))
    trainable, total = count_parameters(model)
    unique = {p.data_ptr(): p.numel() for p in model.state_dict().values()}
    assert trainable == total == sum(unique.values())


def test_trainable_weights_are_fp32_on_a_bf16_base(tokenizer, batch):
    base = tiny_llama(tokenizer).to(torch.bfloat16)
    model = prepare_for_training(base, TunelabConfig())
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert torch.isfinite(model(**batch).loss)  # LoRA casts its input itself

    frozen = prepare_for_training(tiny_llama(tokenizer).to(torch.bfloat16),
                                  TunelabConfig(finetuning_type="freeze", freeze_trainable_layers=1))
    assert {p.dtype for p in frozen.parameters() if p.requires_grad} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        frozen(**batch).loss.backward()
    assert frozen.model.layers[1].mlp.up_proj.weight.grad is not None


@pytest.mark.parametrize("finetuning_type", ["lora", "freeze"])
def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, batch, finetuning_type):
    def grads(checkpointing: bool):
        model = prepare_for_training(tiny_llama(tokenizer), TunelabConfig(
            finetuning_type=finetuning_type, lora_dropout=0.0, gradient_checkpointing=checkpointing,
            freeze_trainable_layers=1))
        if finetuning_type == "lora":
            perturb_lora(model)  # nonzero B, so lora_A gets a gradient too
        model.train()
        model(**batch).loss.backward()
        return model, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain_model, plain = grads(False)
    ckpt_model, ckpt = grads(True)
    assert ckpt_model.is_gradient_checkpointing and not plain_model.is_gradient_checkpointing
    assert plain.keys() == ckpt.keys() and all(g is not None for g in ckpt.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)


# --- adapters on disk -------------------------------------------------------------

def test_adapter_round_trip_gives_identical_logits(tokenizer, batch, tmp_path):
    model = lora(tokenizer, lora_dropout=0.0)
    perturb_lora(model)
    out = save_trained(model, tokenizer, tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "tokenizer_config.json").is_file() and not (out / "model.safetensors").exists()

    reloaded = load_adapter(tiny_llama(tokenizer), out)
    assert torch.equal(logits(reloaded, batch), logits(model, batch))
    assert count_parameters(reloaded)[0] == 0  # inference adapter: frozen


def test_continuing_from_an_adapter_keeps_it_trainable(tokenizer, batch, tmp_path):
    model = lora(tokenizer, lora_dropout=0.0)
    perturb_lora(model)
    save_trained(model, None, tmp_path / "adapter")
    cont = prepare_for_training(tiny_llama(tokenizer), TunelabConfig(adapter_name_or_path=str(tmp_path / "adapter")))
    assert count_parameters(cont)[0] == count_parameters(model)[0]
    assert torch.equal(logits(cont, batch), logits(model, batch))


def test_pissa_adapter_is_saved_for_the_original_base(tokenizer, batch, tmp_path):
    model = lora(tokenizer, pissa_init=True, lora_dropout=0.0)
    perturb_lora(model)  # stands for training
    save_trained(model, tokenizer, tmp_path / "pissa")
    reloaded = load_adapter(tiny_llama(tokenizer), tmp_path / "pissa")  # untouched original weights
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), atol=1e-4, rtol=1e-4)


def test_full_weights_are_saved_as_safetensors(tokenizer, tmp_path):
    model = prepare_for_training(tiny_llama(tokenizer), TunelabConfig(finetuning_type="freeze"))
    out = save_trained(model, tokenizer, tmp_path / "full")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()


def test_failed_save_keeps_the_previous_output(tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    model = lora(tokenizer)
    save_trained(model, tokenizer, out)
    before = sorted(p.name for p in out.iterdir())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", crash)
    with pytest.raises(OSError):
        save_trained(model, tokenizer, out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp folder left behind


def test_adapter_for_another_model_names_both(tokenizer, tmp_path):
    small = prepare_for_training(tiny_llama(tokenizer), TunelabConfig())
    small.base_model.model.name_or_path = "acme/tiny-64"
    small.peft_config["default"].base_model_name_or_path = "acme/tiny-64"
    save_trained(small, None, tmp_path / "adapter")
    other = tiny_llama(tokenizer, hidden_size=32)
    other.name_or_path = "acme/tiny-32"
    with pytest.raises(TunelabError) as err:
        load_adapter(other, tmp_path / "adapter")
    assert "acme/tiny-64" in err.value.what and "acme/tiny-32" in err.value.what
    assert "shape" in err.value.what


def test_adapter_targeting_missing_modules_is_a_mismatch(tokenizer, tmp_path):
    save_trained(lora(tokenizer), None, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = ["c_attn", "c_proj"]  # a GPT-2 style adapter
    config_file.write_text(json.dumps(config))
    with pytest.raises(TunelabError, match="c_attn, c_proj"):
        load_adapter(tiny_llama(tokenizer), tmp_path / "adapter")


def test_folder_without_adapter_config_lists_its_files(tokenizer, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(TunelabError) as err:
        load_adapter(tiny_llama(tokenizer), tmp_path)
    assert "adapter_config.json" in err.value.what and "model.safetensors" in err.value.what
