"""What a training stage optimises: data rows, batching and the loss.

The loop in `loop.py` is the same for every stage; a stage plugs in an objective:

    rows    = objective.load_data()             -> (train rows, eval rows)
    batch   = objective.collate(rows)           -> dict of tensors
    weight  = objective.weight(batch)           -> what the loss is averaged over
    total, metrics = objective.loss(model, batch)  -> summed loss (+ summed extra metrics)

The loop divides the summed loss by the summed weight of the whole optimizer step,
so accumulation gives the loss of one big batch. SFT and continued pre-training
average over target tokens; preference stages (train/preference.py) over pairs.
"""

from __future__ import annotations

import sys

import torch

from tunelab.config import TunelabConfig
from tunelab.data.collate import collate_packed, count_label_tokens, pack_samples, pad_batch, pad_id_for
from tunelab.train.losses import causal_lm_loss_sum


class SFTObjective:
    """Next-token loss on the target turns (SFT) or on all text (pt)."""

    def __init__(self, cfg: TunelabConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.pad_id = pad_id_for(tokenizer)
        self.mixture: dict | None = None  # what each dataset source gave (RUN_DIR/data_mixture.json)

    def load_data(self) -> tuple[list, list]:
        from tunelab.train.dataset import load_sft_data

        data = load_sft_data(self.cfg, self.tokenizer)
        self.mixture = data.mixture
        train = pack_samples(data.train, self.cfg.cutoff_len) if self.cfg.packing else data.train
        print(f"{len(data.train)} training samples ({len(train)} rows{' packed' if self.cfg.packing else ''}), "
              f"{len(data.eval)} validation", file=sys.stderr)
        return train, data.eval

    def setup(self, model, device) -> None:
        """Nothing to prepare for next-token loss (preference stages score their reference here)."""

    def collate(self, rows) -> dict:
        if rows and rows[0].seq_lens:
            return collate_packed(rows, self.pad_id)
        return pad_batch(rows, self.pad_id)

    def weight(self, batch: dict) -> int:
        return count_label_tokens(batch)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        if self.cfg.padding_free or self.cfg.fused_loss:
            from tunelab.train.fast import fast_causal_lm_loss_sum

            total, _ = fast_causal_lm_loss_sum(model, batch, self.cfg.padding_free, self.cfg.fused_loss)
        else:
            total, _ = causal_lm_loss_sum(model, batch)
        return total, {}
