"""rope_scaling: written into the model config at load, positions scaled the way each type says."""

import math

import pytest
import torch

from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.model.loader import load_model

NATIVE = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=NATIVE, rope_theta=10000.0))
    folder = tmp_path_factory.mktemp("rope") / "m"
    model.save_pretrained(folder)
    return folder


def cos_sin(model, positions):
    rotary = model.model.rotary_emb
    x = torch.zeros(1, len(positions), 16)
    return rotary(x, torch.tensor([positions]))


def test_linear_scaling_divides_positions_by_the_factor(model_dir):
    plain = load_model(model_dir, dtype="float32", device="cpu")
    scaled = load_model(model_dir, dtype="float32", device="cpu", rope_scaling={"rope_type": "linear", "factor": 4},
                        cutoff_len=256)
    assert scaled.config.rope_parameters["rope_type"] == "linear"
    assert scaled.config.max_position_embeddings == 4 * NATIVE
    # Position 4k of the scaled model is position k of the native one.
    got = cos_sin(scaled, [0, 4, 40, 252])
    want = cos_sin(plain, [0.0, 1.0, 10.0, 63.0])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert not torch.allclose(cos_sin(scaled, [40])[0], cos_sin(plain, [40])[0])


def test_yarn_from_the_type_alone_takes_its_factor_from_cutoff_len(model_dir):
    scaled = load_model(model_dir, dtype="float32", device="cpu", rope_scaling="yarn", cutoff_len=3 * NATIVE + 1)
    params = scaled.config.rope_parameters
    assert params["factor"] == 4.0 and params["original_max_position_embeddings"] == NATIVE
    plain_inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    inv = scaled.model.rotary_emb.inv_freq
    # YaRN: the fastest frequencies are kept (extrapolated), the slowest interpolated by the factor.
    torch.testing.assert_close(inv[0], plain_inv[0])
    torch.testing.assert_close(inv[-1], plain_inv[-1] / 4)
    assert scaled.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)


def test_dynamic_keeps_native_positions_within_the_native_length(model_dir):
    plain = load_model(model_dir, dtype="float32", device="cpu")
    scaled = load_model(model_dir, dtype="float32", device="cpu", rope_scaling={"type": "dynamic", "factor": 2.0})
    assert scaled.config.max_position_embeddings == NATIVE
    for g, w in zip(cos_sin(scaled, list(range(NATIVE))), cos_sin(plain, list(range(NATIVE)))):
        torch.testing.assert_close(g, w)


def test_rope_scaling_key_forms_and_errors(model_dir):
    assert load_config(overrides=["rope_scaling=yarn"]).rope_scaling == "yarn"
    assert load_config(overrides=["rope_scaling={rope_type: linear, factor: 2}"]).rope_scaling == \
        {"rope_type": "linear", "factor": 2}
    with pytest.raises(TunelabError, match="not one of"):
        load_config(overrides=["rope_scaling=ntk"])
    with pytest.raises(TunelabError, match="factor must be"):
        load_config(overrides=["rope_scaling={rope_type: linear, factor: 0.5}"])
    with pytest.raises(TunelabError, match="nothing to scale"):
        load_model(model_dir, dtype="float32", device="cpu", rope_scaling="linear", cutoff_len=NATIVE)
