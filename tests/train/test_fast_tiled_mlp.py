"""The token-tiled MLP gives the plain MLP's loss and gradients, alone and under activation offload."""

import pytest
import torch
from memory_case import assert_same, loss_and_grads, samples, tiny_lora_model

from tunelab.config import TunelabConfig
from tunelab.train.fast import compile_decoder_layers
from tunelab.train.fast.offload import install_activation_offload
from tunelab.train.fast.tiled_mlp import mlps_tiled, tile_mlps, untile_mlps


@pytest.mark.parametrize("cfg", [TunelabConfig(), TunelabConfig(padding_free=True, fused_loss=True)],
                         ids=["padded", "padding_free"])
def test_tiled_mlp_keeps_loss_and_gradients(cfg):
    model = tiny_lora_model(padding_free=cfg.padding_free)
    ref = loss_and_grads(model, cfg, samples())
    assert tile_mlps(model, tile_tokens=5) == 3 and mlps_tiled(model)  # 27 real tokens: 6 tiles
    assert_same(loss_and_grads(model, cfg, samples()), ref)
    install_activation_offload(model)  # tiles recomputed inside the offloaded layer's recomputation
    assert_same(loss_and_grads(model, cfg, samples()), ref)
    untile_mlps(model)
    assert not mlps_tiled(model)


@pytest.mark.slow  # dynamo traces the layer for each grad mode and the tiled graph break: ~1 min on CPU
def test_tiled_mlp_in_compiled_offloaded_layers_and_full_finetuning():
    model = tiny_lora_model(layers=1).base_model.model  # 1 layer: compiled once
    model.requires_grad_(True)
    ref = loss_and_grads(model, TunelabConfig(), samples())
    compile_decoder_layers(model, backend="eager")
    tile_mlps(model, tile_tokens=7)
    assert_same(loss_and_grads(model, TunelabConfig(), samples()), ref)
    install_activation_offload(model)  # all three levers at once
    assert_same(loss_and_grads(model, TunelabConfig(), samples()), ref)


def test_tiled_mlp_keeps_only_its_input_for_backward():
    model = tiny_lora_model()
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)

    def saved(fn):
        count = [0]

        def pack(t):
            count[0] += 1
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        return count[0]

    plain = saved(mlp)
    tile_mlps(model, tile_tokens=4)
    assert saved(mlp) == 1 < plain
    with torch.no_grad():  # evaluation through tiles: the same numbers
        tiled_out = mlp(x)
    untile_mlps(model)
    with torch.no_grad():
        torch.testing.assert_close(tiled_out, mlp(x), rtol=1e-12, atol=1e-12)
