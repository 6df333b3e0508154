"""The memory estimate: exact parameter counts, measured activation coefficients, sane 7B numbers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.serve.estimate import (
    GIB,
    KNOWN_CONFIGS,
    Settings,
    architecture_from_config,
    architecture_lora_parameters,
    architecture_parameters,
    estimate_memory,
    format_estimate,
    layer_activation_bytes,
    load_architecture,
)

TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)


def meta_model(model_type: str, **cfg):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))


@pytest.mark.parametrize("model_type,extra", [
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True}),
    ("mistral", {"tie_word_embeddings": False, "head_dim": 32}),
    ("qwen2", {"tie_word_embeddings": False}),
    ("qwen3", {"tie_word_embeddings": True, "head_dim": 24}),
])
def test_parameter_count_equals_transformers(model_type, extra):
    cfg = {**TINY, **extra}
    model = meta_model(model_type, **cfg)
    arch = architecture_from_config({"model_type": model_type, **cfg})
    assert architecture_parameters(arch).total == sum(p.numel() for p in model.parameters())


def test_known_7b_config_counts_exactly():
    cfg = dict(KNOWN_CONFIGS["qwen2.5-7b-instruct"])
    model = meta_model(cfg.pop("model_type"), **cfg)
    assert architecture_parameters(load_architecture("Qwen/Qwen2.5-7B-Instruct")).total == sum(
        p.numel() for p in model.parameters()) == 7_615_616_512


def test_lora_count_equals_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**TINY))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    arch = architecture_from_config({"model_type": "llama", **TINY})
    assert architecture_lora_parameters(arch, 4, ["q_proj", "down_proj"]) == trainable


def saved_bytes_per_layer_token(method: str, padded: bool, b: int = 2, s: int = 24, tiled: bool = False) -> float:
    """Bytes autograd saves per token per decoder layer, measured (2 layers minus 1 layer)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def saved(layers: int) -> int:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": layers},
                                             attn_implementation="sdpa")).to(torch.bfloat16).train()
        if method == "lora":
            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        if tiled:
            from tunelab.train.fast.tiled_mlp import tile_mlps

            tile_mlps(model, tile_tokens=8)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, TINY["vocab_size"], (b, s))
        mask = torch.ones(b, s, dtype=torch.long)
        if padded:
            mask[0, :5] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, attention_mask=mask, labels=ids)
        return sum(storages.values())

    return (saved(2) - saved(1)) / (b * s)


@pytest.mark.parametrize("method,padded", [("full", True), ("full", False), ("lora", True), ("qlora", False)])
def test_activation_formula_matches_saved_tensors(method, padded):
    arch = architecture_from_config({"model_type": "llama", **TINY})
    settings = Settings(method=method, seq_len=24, batch=2, lora_rank=4, padded=padded)
    predicted, _ = layer_activation_bytes(arch, settings)
    # QLoRA's base layers save what a frozen 16-bit base saves; bitsandbytes is CUDA-only, so measure that.
    measured = saved_bytes_per_layer_token("full" if method == "full" else "lora", padded)
    assert predicted == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_tiled_mlp_formula_matches_saved_tensors(method):
    arch = architecture_from_config({"model_type": "llama", **TINY})
    predicted, _ = layer_activation_bytes(arch, Settings(method=method, seq_len=24, batch=2, lora_rank=4,
                                                         padded=False, tiled_mlp=True))
    assert predicted == pytest.approx(saved_bytes_per_layer_token(method, False, tiled=True), rel=0.02)


def test_memory_levers_lower_the_peak_of_a_long_sequence():
    arch = load_architecture("qwen2.5-7b-instruct")
    base = Settings(method="lora", batch=1, seq_len=131072, padded=False, gradient_checkpointing=True)
    plain = estimate_memory(arch, base)
    fused = estimate_memory(arch, dataclasses.replace(base, fused_loss=True))
    offload = estimate_memory(arch, dataclasses.replace(base, fused_loss=True, activation_offload=True))
    tiled = estimate_memory(arch, dataclasses.replace(base, fused_loss=True, activation_offload=True, tiled_mlp=True))
    assert plain.total > fused.total > offload.total > tiled.total
    host = [line for line in offload.lines if line.phase == "host"]
    # 28 layers x 131072 tokens x 3584 x 2 bytes wait in host memory, not counted in the GPU peak.
    assert len(host) == 1 and host[0].bytes == 28 * 131072 * 3584 * 2
    assert fused.total - offload.total == pytest.approx(26 * 131072 * 3584 * 2)
    assert "host memory" in format_estimate(offload)


def test_qwen_7b_table_in_sane_ranges():
    arch = load_architecture("qwen2.5-7b-instruct")
    lora = estimate_memory(arch, Settings(method="lora", batch=1, seq_len=1024, gradient_checkpointing=True))
    weights = lora.lines[0].bytes / GIB
    assert 14 <= weights <= 15  # 7.6e9 params x 2 bytes
    assert lora.trainable == 20_185_088  # r=8 on all seven linear layers of 28 layers
    assert 2 * 7.6e9 / GIB < lora.total / GIB < 22  # the "2N GB" floor plus activations
    full = estimate_memory(arch, Settings(method="full", batch=1, seq_len=1024, gradient_checkpointing=True))
    assert full.total > 4 * lora.total > 4 * weights  # weights + grads + AdamW states + scratch
    qlora = estimate_memory(arch, Settings(method="qlora", batch=1, seq_len=1024, gradient_checkpointing=True))
    # 6.5e9 linear weights at ~0.52 B + the 0.55e9 embedding in fp32 + the 0.55e9 head in bf16
    assert 5.8 < qlora.lines[0].bytes / GIB < 6.5
    infer = estimate_memory(arch, Settings(method="inference", batch=1, seq_len=32768))
    kv = next(line for line in infer.lines if line.name == "KV cache")
    assert kv.bytes == 2 * 28 * 4 * 128 * 2 * 32768  # 1.75 GiB at the full 32k context


def test_longer_sequences_and_no_checkpointing_cost_more():
    arch = load_architecture("llama-3-8b")
    base = estimate_memory(arch, Settings(method="lora", seq_len=512, batch=1)).total
    assert estimate_memory(arch, Settings(method="lora", seq_len=2048, batch=1)).total > base
    gc = estimate_memory(arch, Settings(method="lora", seq_len=512, batch=1, gradient_checkpointing=True)).total
    assert gc < base
    eight_bit = estimate_memory(arch, Settings(method="full", optimizer="adamw_8bit")).total
    assert eight_bit < estimate_memory(arch, Settings(method="full")).total


def test_table_shows_every_line_with_its_formula():
    text = format_estimate(estimate_memory(load_architecture("llama-3-8b"), Settings(method="qlora")))
    for needle in ("8,030,261,248 parameters", "weights (4-bit", "NF4", "optimizer states", "activations",
                   "logits and loss", "b*s*V", "estimated peak"):
        assert needle in text


def test_reads_config_from_a_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
    assert load_architecture(str(tmp_path)).hidden_size == 64


def test_bad_inputs_say_how_to_fix(tmp_path):
    with pytest.raises(TunelabError, match="did you mean 'llama-3-8b'"):
        load_architecture("llama-3-8")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(TunelabError, match="no 'num_attention_heads'"):
        load_architecture(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", **TINY}))
    with pytest.raises(TunelabError, match="mixtral"):
        load_architecture(str(tmp_path))
    arch = load_architecture("llama-3-8b")
    with pytest.raises(TunelabError, match="use --method qlora"):
        estimate_memory(arch, Settings(method="qlor"))
    with pytest.raises(TunelabError, match="lora-target"):
        estimate_memory(arch, Settings(method="lora", lora_target=["qproj"]))


def test_cli_prints_the_table(capsys):
    from tunelab.cli import main

    assert main(["estimate", "--model", "qwen2.5-7b-instruct", "--method", "lora", "--batch", "1",
                 "--gradient-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "7,615,616,512 parameters" in out and "estimated peak" in out
    assert main(["estimate", "--model", "qwen2.5-7b-instruct", "--method", "lora", "--optimizer", "adam"]) == 2
    assert "use --optimizer adamw" in capsys.readouterr().err
