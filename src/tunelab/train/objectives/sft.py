"""Next-token loss: supervised fine-tuning on the target turns (sft), or on all text (pt)."""

from __future__ import annotations

import sys

import torch

from tunelab.config import TunelabConfig
from tunelab.data.collate import collate_packed, count_label_tokens, pack_samples, pad_batch, pad_id_for
from tunelab.train.losses import causal_lm_loss_sum


class SFTObjective:
    """Next-token loss on the target turns of chat-rendered conversations."""

    stage = "sft"
    keys = frozenset({"fold_dialogues", "train_on", "truncation"})
    speed_paths = frozenset({"packing", "padding_free", "fused_loss"})
    perplexity = True  # the validation loss is a per-token NLL: eval_perplexity is logged
    trains_on_conversations = True  # its validation split is what task metrics generate on
    sharded = True  # runs under FSDP
    chat = True  # rendered with the chat template (pt: plain text)

    def __init__(self, cfg: TunelabConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.pad_id = pad_id_for(tokenizer)
        self.mixture: dict | None = None  # what each dataset source gave (RUN_DIR/data_mixture.json)

    def load_data(self) -> tuple[list, list]:
        from tunelab.train.dataset import load_sft_data

        data = load_sft_data(self.cfg, self.tokenizer, chat=self.chat)
        self.mixture = data.mixture
        train = pack_samples(data.train, self.cfg.cutoff_len) if self.cfg.packing else data.train
        print(f"{len(data.train)} training samples ({len(train)} rows{' packed' if self.cfg.packing else ''}), "
              f"{len(data.eval)} validation", file=sys.stderr)
        return train, data.eval

    @staticmethod
    def first_sample(cfg: TunelabConfig, tokenizer, template) -> tuple[str, list[int], list[int]]:
        """(source, input ids, labels) of the first training record as training encodes it
        (`tunelab train --dry-run`)."""
        return first_conversation_sample(cfg, tokenizer, template)

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


class PTObjective(SFTObjective):
    """Continued pre-training: next-token loss on every token of plain text."""

    stage = "pt"
    keys = frozenset({"train_on", "truncation"})  # conversations given to pt still render their turns
    chat = False

    def load_data(self) -> tuple:
        """With `streaming`: the corpus as a stream of blocks, read as the loop asks (train/streaming.py)."""
        if not self.cfg.streaming:
            return super().load_data()
        from tunelab.train.streaming import BlockStream

        stream = BlockStream(self.cfg, self.tokenizer)
        return stream, stream.validation()


def first_conversation_sample(cfg: TunelabConfig, tokenizer, template) -> tuple[str, list[int], list[int]]:
    """The first training conversation, folded, cut and masked by the training code."""
    from dataclasses import replace

    from tunelab.train.dataset import encode_samples, read_conversations

    convs = read_conversations(replace(cfg, max_samples=1, val_size=0.0, eval_dataset=[]))[0]
    sample = encode_samples(convs, tokenizer, template, cfg)[0][0]
    return convs[0].source, sample.input_ids, sample.labels

