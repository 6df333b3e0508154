"""Reward models (stage rm): a scalar head on the base, trained on preference pairs with the
Bradley-Terry loss -log s(r(chosen) - r(rejected)).

The pairs are read and tokenized as for DPO (one shared prompt, chosen and rejected stacked,
one forward); the score is the head's output at each sequence's last token (model/value_head.py).
The run folder holds the adapter (or full weights) and `score_head.safetensors`; load it as a
scorer with `model.value_head.load_reward_model`, as `reward:` of grpo / ppo does and
`tunelab eval --reward-model` (pairwise accuracy, best-of-n reranking).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.train.objectives.preference import PreferenceObjective


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen - rejected)


class RMObjective(PreferenceObjective):
    stage = "rm"
    keys = frozenset()
    speed_paths = frozenset()  # the head reads the last hidden state of each padded row
    uses_reference = False
    multi_process = False

    def setup(self, model, device) -> None:
        from tunelab.model.value_head import attach_head

        attach_head(model)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        from tunelab.model.value_head import sequence_scores

        scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
        n = batch["n_examples"]
        chosen, rejected = scores[:n], scores[n:]
        losses = bradley_terry_loss(chosen, rejected)
        return losses.sum(), {"rewards/chosen": float(chosen.detach().sum()),
                              "rewards/rejected": float(rejected.detach().sum()),
                              "rewards/margins": float((chosen - rejected).detach().sum()),
                              "rewards/accuracies": float((chosen > rejected).float().sum())}

    def save(self, model, folder) -> None:
        from tunelab.model.value_head import save_head

        save_head(model, folder, base=self.cfg.model_name_or_path)
