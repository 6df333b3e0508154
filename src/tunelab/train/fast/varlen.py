"""Padding-free attention: every batch becomes one stream of real tokens, attention per sample.

A padded batch spends compute on pad tokens; a packed batch needs a [T, T] block mask
that rules out the fast attention kernels. Here both become one row holding only the
real tokens, with `cu_seqlens` marking where each sample starts, and attention runs
through `torch.nn.attention.varlen.varlen_attn` (FlashAttention's variable-length
kernel, in torch >= 2.10) on CUDA. Positions restart at 0 for every sample and
targets are shifted inside each sample, so the math is that of the padded batch.

On CPU (tests, CI) and wherever the kernel is missing, the same function loops over
the samples with causal SDPA: slower, same numbers. The kernel call itself lives in
`model/attention.py`, which generation's prefill uses too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.data.collate import IGNORE_INDEX
from tunelab.model.attention import varlen_attention, varlen_kernel  # noqa: F401 - re-exported

ATTN_NAME = "tunelab_varlen"


@dataclass
class TokenStream:
    """A batch as one row of real tokens (shape [1, N]) plus the sample borders."""

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N], restarting at 0 in every sample
    targets: torch.Tensor  # [N]: the token each position predicts; IGNORE_INDEX where none
    cu_seqlens: torch.Tensor  # [S + 1] int32: sample starts, then N
    max_len: int

    def attention_kwargs(self) -> dict:
        # The names transformers forwards untouched from the model to the attention function.
        return {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_len, "max_length_k": self.max_len}


def sample_lengths(batch: dict) -> list[int]:
    """Lengths of the samples in the batch, row after row (packed rows hold several)."""
    if "seq_lens" in batch:
        return [n for row in batch["seq_lens"] for n in row if n > 0]
    return [n for n in batch["attention_mask"].sum(dim=1).tolist() if n > 0]


def flatten_batch(batch: dict) -> TokenStream:
    """Drop the padding of a padded or packed batch; shift the labels inside each sample."""
    keep = batch["attention_mask"].bool()
    input_ids = batch["input_ids"][keep]
    labels = batch["labels"][keep]
    lengths = sample_lengths(batch)
    device = input_ids.device
    lens = torch.tensor(lengths, device=device)
    if int(sum(lengths)) != input_ids.numel():
        raise ValueError(f"sample lengths sum to {sum(lengths)} but the batch has {input_ids.numel()} real tokens")
    starts = torch.cumsum(lens, 0) - lens
    position_ids = torch.arange(input_ids.numel(), device=device) - torch.repeat_interleave(starts, lens)
    # Each position predicts the next token of its own sample; a sample's last one predicts nothing.
    targets = torch.roll(labels, -1)
    targets[starts + lens - 1] = IGNORE_INDEX
    cu_seqlens = F.pad(torch.cumsum(lens, 0), (1, 0)).to(torch.int32)
    return TokenStream(input_ids[None], position_ids[None], targets, cu_seqlens, max(lengths))


# --- the attention function transformers calls (registered under ATTN_NAME) -------------------

def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers' attention interface: query [1, Hq, N, D], key/value [1, Hkv, N, D]."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError(f"{ATTN_NAME} attention needs a flattened batch (see flatten_batch) with cu_seq_lens_q")
    if sliding_window is not None or dropout:
        raise ValueError(f"{ATTN_NAME} attention supports neither sliding windows nor attention dropout")
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [N, H, D]
    out = varlen_attention(q, k, v, cu_seq_lens_q, int(max_length_q), scaling)
    return out[None], None  # [1, N, Hq, D], as the other implementations return


def register() -> None:
    """Make `attn_implementation=tunelab_varlen` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, varlen_attention_forward)


def base_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_varlen_attention(model) -> None:
    """Switch a loaded model's attention to the padding-free kernel (it then needs flattened batches)."""
    register()
    base_model(model).set_attn_implementation(ATTN_NAME)
