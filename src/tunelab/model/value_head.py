"""A scalar head on a causal LM: the reward model's score (stage rm) and PPO's value estimates.

The head reads the last decoder layer's hidden state: at the last real token of a sequence
for a reward (`sequence_scores`), at every token for values (`token_values`). It lives on
the model as the submodule `score_head`, so the optimizer, checkpoints and the device move
see it; a trained reward model keeps it beside its weights as `score_head.safetensors`,
and `load_reward_model(folder)` puts base, adapter and head back together as a scorer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import TunelabError

HEAD_FILE = "score_head.safetensors"
HEAD_INFO = "reward_model.json"


def hidden_size(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return config.hidden_size


def attach_head(model) -> nn.Linear:
    """A fresh fp32 linear head (hidden -> 1) as `model.score_head`, on the model's device."""
    head = nn.Linear(hidden_size(model), 1)
    nn.init.normal_(head.weight, std=1 / (hidden_size(model) + 1) ** 0.5)
    nn.init.zeros_(head.bias)
    head.to(next(model.parameters()).device)
    model.add_module("score_head", head)
    return head


def _last_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1]


def head_of(model) -> nn.Linear:
    return model.score_head


def apply_head(model, hidden: torch.Tensor) -> torch.Tensor:
    head = head_of(model)
    return head(hidden.to(head.weight.dtype)).squeeze(-1).float()


def token_values(model, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, per-token head outputs [batch, tokens]) of one forward."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    return out.logits, apply_head(model, out.hidden_states[-1])


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head's output at each row's last real token (right-padded rows)."""
    hidden = _last_hidden(model, input_ids, attention_mask)
    last = attention_mask.long().sum(-1) - 1
    return apply_head(model, hidden[torch.arange(len(last), device=hidden.device), last])


def save_head(model, folder: Path, base: str) -> None:
    """The head's weights and what it was trained on, next to the saved adapter or weights."""
    from safetensors.torch import save_file

    from tunelab.io import write_json_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head_of(model).state_dict().items()},
              str(folder / HEAD_FILE))
    write_json_atomic(folder / HEAD_INFO, {"kind": "reward_model", "base_model": base,
                                           "head": HEAD_FILE})


def is_reward_model(folder) -> bool:
    return (Path(folder) / HEAD_FILE).is_file()


class RewardModel:
    """A trained reward model as a scorer: `score(sequences)` -> one float per token sequence
    (prompt rendered with the trained template, then the answer and its end-of-turn token)."""

    def __init__(self, model, tokenizer, device):
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, device

    @torch.no_grad()
    def score(self, sequences: list[list[int]], batch_size: int = 8) -> list[float]:
        from tunelab.data.collate import pad_id_for

        pad = pad_id_for(self.tokenizer)
        out: list[float] = []
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=self.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=self.device)
            out.extend(sequence_scores(self.model, ids, mask).tolist())
        return out


def load_reward_model(folder, device="auto", dtype="auto") -> RewardModel:
    """Base + adapter (or full weights) + head of a `stage: rm` run folder."""
    from tunelab.model.adapters import adapter_tokenizer, load_adapter
    from tunelab.model.loader import load_model, resolve_device

    folder = Path(folder).expanduser()
    if not is_reward_model(folder):
        raise TunelabError(f"{folder} holds no reward model ({HEAD_FILE} is missing)", where=str(folder),
                           fix="train one with stage=rm, and point at its output_dir")
    info = json.loads((folder / HEAD_INFO).read_text(encoding="utf-8"))
    target = resolve_device(device)
    is_adapter = (folder / "adapter_config.json").is_file()
    base = info["base_model"] if is_adapter else str(folder)
    model = load_model(base, dtype=dtype, device=target)
    if is_adapter:
        model = load_adapter(model, folder).merge_and_unload()
    attach_head(model)
    from safetensors.torch import load_file

    head_of(model).load_state_dict(load_file(str(folder / HEAD_FILE)))
    return RewardModel(model, adapter_tokenizer(base, folder), target)
