"""Activation offload recomputes each decoder layer from its saved input: same loss, same gradients."""

from types import SimpleNamespace

import pytest
import torch

from tunelab.config import TunelabConfig
from tunelab.data.collate import IGNORE_INDEX, Sample
from tunelab.train.fast import compile_decoder_layers
from tunelab.train.fast.offload import (
    enable_activation_offload, install_activation_offload, offload_active, remove_activation_offload,
)
from tunelab.train.objective import SFTObjective

VOCAB = 97


def tiny_lora_model(lora_dropout: float = 0.0, layers: int = 3):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256))
    base.set_attn_implementation("sdpa")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout,
                                            target_modules="all-linear"))
    for name, p in model.named_parameters():  # LoRA B starts at zero: make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.double().train()


def samples(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (7, 3, 12, 5):
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        out.append(Sample(ids, [IGNORE_INDEX] * 2 + ids[2:]))
    return out


def loss_and_grads(model, cfg: TunelabConfig, rows, seed: int = 0):
    objective = SFTObjective(cfg, SimpleNamespace(pad_token_id=0, eos_token_id=0))
    batch = objective.collate(rows)
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout draws on both paths
    total, _ = objective.loss(model, batch)
    (total / objective.weight(batch)).backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(got, ref):
    torch.testing.assert_close(got[0], ref[0], rtol=1e-9, atol=1e-9)
    assert got[1].keys() == ref[1].keys() and len(ref[1]) > 0
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("cfg", [TunelabConfig(), TunelabConfig(padding_free=True, fused_loss=True)],
                         ids=["padded", "padding_free"])
def test_offload_keeps_loss_and_lora_gradients(cfg):
    from tunelab.train.fast.varlen import use_varlen_attention

    model = tiny_lora_model()
    if cfg.padding_free:
        use_varlen_attention(model)
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
    model = tiny_lora_model().base_model.model  # a plain model: every weight trains
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
