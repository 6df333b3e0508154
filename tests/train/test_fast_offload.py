"""Activation offload recomputes each decoder layer from its saved input: same loss, same gradients."""

from types import SimpleNamespace

import pytest
import torch
from memory_case import assert_same, loss_and_grads, samples, tiny_lora_model

from tunelab.config import TunelabConfig
from tunelab.train.fast import compile_decoder_layers
from tunelab.train.fast.offload import (
    enable_activation_offload,
    install_activation_offload,
    offload_active,
    remove_activation_offload,
)
from tunelab.train.objectives.sft import SFTObjective


@pytest.mark.parametrize("cfg", [TunelabConfig(), TunelabConfig(padding_free=True, fused_loss=True)],
                         ids=["padded", "padding_free"])
def test_offload_keeps_loss_and_lora_gradients(cfg):
    model = tiny_lora_model(padding_free=cfg.padding_free)
    ref = loss_and_grads(model, cfg, samples())
    assert install_activation_offload(model) == 3 and offload_active(model)
    assert_same(loss_and_grads(model, cfg, samples()), ref)
    remove_activation_offload(model)
    assert not offload_active(model)
    assert_same(loss_and_grads(model, cfg, samples()), ref)


def test_offload_replays_the_forward_dropout_masks():
    model = tiny_lora_model(lora_dropout=0.3)
    ref = loss_and_grads(model, TunelabConfig(), samples(), seed=5)
    other = loss_and_grads(model, TunelabConfig(), samples(), seed=6)
    assert not torch.equal(ref[0], other[0])  # dropout is really on: another seed, another loss
    install_activation_offload(model)
    assert_same(loss_and_grads(model, TunelabConfig(), samples(), seed=5), ref)


def test_offload_wraps_compiled_layers_and_full_finetuning_gets_weight_gradients():
    model = tiny_lora_model(layers=1).base_model.model  # a plain model: every weight trains; 1 layer: 1 compile
    model.requires_grad_(True)
    ref = loss_and_grads(model, TunelabConfig(), samples())
    compile_decoder_layers(model, backend="eager")
    install_activation_offload(model)
    assert_same(loss_and_grads(model, TunelabConfig(), samples()), ref)
    assert any(n.endswith("layers.0.mlp.up_proj.base_layer.weight") for n in ref[1])


def test_offload_keeps_nothing_of_the_layers_for_backward():
    """The memory claim on CPU: the autograd graph saves no tensor from inside a decoder layer."""
    model = tiny_lora_model()
    objective = SFTObjective(TunelabConfig(), SimpleNamespace(pad_token_id=0, eos_token_id=0))
    batch = objective.collate(samples())

    def saved_count():  # tensors the forward pass saves for backward
        count = [0]

        def pack(t):
            count[0] += 1
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            total, _ = objective.loss(model, batch)
        total.backward()
        return count[0]

    plain = saved_count()
    install_activation_offload(model)
    offloaded = saved_count()
    # Plain: dozens of tensors per layer; offloaded: the embedding, final norm and head only.
    assert offloaded < plain / 5, (offloaded, plain)


def test_enable_on_cpu_is_a_no_op_that_says_so(capsys):
    model = tiny_lora_model()
    assert enable_activation_offload(model) is False
    assert not offload_active(model)
    assert "nothing to do on cpu" in capsys.readouterr().err


def test_no_offload_in_evaluation():
    model = tiny_lora_model()
    install_activation_offload(model)
    batch = SFTObjective(TunelabConfig(), SimpleNamespace(pad_token_id=0, eos_token_id=0)).collate(samples())
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert not out.logits.requires_grad
    assert install_activation_offload(model) == 3  # installing twice wraps once
    layer = model.base_model.model.model.layers[0]
    assert not hasattr(layer._compiled_call_impl.inner, "inner")


def test_memory_keys_through_apply_speed_levers(capsys):
    from tunelab.train.fast import apply_speed_levers
    from tunelab.train.fast.tiled_mlp import mlps_tiled

    model = tiny_lora_model()
    apply_speed_levers(model, TunelabConfig())  # auto on CPU: neither
    assert not offload_active(model) and not mlps_tiled(model)
    apply_speed_levers(model, TunelabConfig(activation_offload=True))
    assert "nothing to do on cpu" in capsys.readouterr().err and not mlps_tiled(model)  # auto tiles with offload only
    from tunelab.config import load_config

    apply_speed_levers(model, load_config(overrides=["tiled_mlp=true"]))  # YAML true, as a user writes it
    assert mlps_tiled(model)


@pytest.mark.parametrize("fused_loss", [False, True])
def test_frozen_head_in_bf16_changes_nothing_under_autocast(fused_loss):
    from tunelab.train.fast.memory import head_to_autocast_dtype

    model = tiny_lora_model().float()  # fp32 weights, as QLoRA's set-up leaves the head
    cfg = TunelabConfig(fused_loss=fused_loss)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_and_grads(model, cfg, samples())

    ref = run()
    assert head_to_autocast_dtype(model, torch.bfloat16)
    assert model.base_model.model.lm_head.weight.dtype == torch.bfloat16
    assert not head_to_autocast_dtype(model, torch.bfloat16)  # already done
    got = run()
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=0, atol=0, msg=name)


def test_out_of_memory_back_off_entry_point(monkeypatch):
    from tunelab.train.fast import memory
    from tunelab.train.fast.tiled_mlp import mlps_tiled

    model = tiny_lora_model()
    assert memory.offload_for_memory(model, TunelabConfig()) is False  # CPU: nothing to gain
    # Pretend the model is on a GPU: the back-off installs offload and tiles the MLPs, once.
    monkeypatch.setattr(memory, "enable_activation_offload", lambda m: install_activation_offload(m) > 0)
    assert memory.offload_for_memory(model, TunelabConfig(activation_offload=False)) is False
    assert memory.offload_for_memory(model, TunelabConfig()) is True
    assert offload_active(model) and mlps_tiled(model)
    assert memory.offload_for_memory(model, TunelabConfig()) is False


def test_lora_inputs_kept_bf16_under_autocast_save_memory_and_change_nothing():
    from tunelab.train.fast.memory import keep_lora_inputs_bf16

    model = tiny_lora_model(layers=1).to(torch.bfloat16)  # bf16 base, fp32 adapters: as training holds them
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    objective = SFTObjective(TunelabConfig(), SimpleNamespace(pad_token_id=0, eos_token_id=0))
    batch = objective.collate(samples())

    def run():
        stored = {}

        def pack(t):
            stored[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            total, _ = objective.loss(model, batch)
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return total.detach(), grads, sum(stored.values())

    ref_loss, ref_grads, ref_bytes = run()
    assert keep_lora_inputs_bf16(model) == 7  # every adapted linear of the layer
    loss, grads, saved_bytes = run()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0, msg=name)
    assert saved_bytes < 0.9 * ref_bytes
    with torch.no_grad():  # without autocast the adapters still get their input cast (no dtype clash)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    compile_decoder_layers(model, backend="eager")
    compiled_loss, compiled_grads, _ = run()
    torch.testing.assert_close(compiled_loss, ref_loss)
    for name in ref_grads:
        torch.testing.assert_close(compiled_grads[name], ref_grads[name], msg=name)


def test_auto_offloads_when_checkpointed_inputs_would_fill_a_quarter_of_the_gpu(monkeypatch):
    from tunelab.train.fast import offload

    model = tiny_lora_model()  # 3 layers x hidden 32 x 2 bytes = 192 bytes per token
    assert offload.offload_wanted(True, model, 1) and not offload.offload_wanted(False, model, 10**9)
    assert not offload.offload_wanted(None, model, 10**9)  # on CPU, never
    monkeypatch.setattr(offload, "_model_device", lambda m: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=192 * 4000))
    assert not offload.offload_wanted(None, model, 1000)  # exactly a quarter
    assert offload.offload_wanted(None, model, 1001)
