"""A tiny LoRA model and the loss + gradients of one batch: what the memory levers must not change."""

from types import SimpleNamespace

import torch

from tunelab.config import TunelabConfig
from tunelab.data.collate import IGNORE_INDEX, Sample
from tunelab.train.objectives.sft import SFTObjective

VOCAB = 97


def tiny_lora_model(lora_dropout: float = 0.0, layers: int = 3, padding_free: bool = False):
    """A tiny Qwen2 with LoRA on every linear layer (B non-zero), in float64; `padding_free`:
    attention through the varlen path, as `padding_free=true` runs it."""
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
    if padding_free:
        from tunelab.train.fast.varlen import use_varlen_attention

        use_varlen_attention(model)
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
