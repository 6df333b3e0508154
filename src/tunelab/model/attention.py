"""Attention kernels shared by training and generation.

- `varlen_attention`: causal attention within each sample of a token stream (no padding):
  FlashAttention's variable-length kernel (`torch.nn.attention.varlen`) on CUDA, causal SDPA
  per sample elsewhere (same numbers). Training's padding-free path (`train/fast/varlen.py`)
  and generation's prefill both call it.
- `decode_attention` / `grouped_query_decode`: what the static-cache decoder
  (`model/generate.py`) runs in place of transformers' SDPA. Prefill: the left-padded prompts'
  real tokens as one stream through `varlen_attention` (transformers would run SDPA with a
  [batch, 1, width, cache] additive mask: no flash kernel, and on the hotel test set's longest
  batch that prefill took 2.4 s of a 3.6 s batch on an H100). Decode: one query token per row,
  the query heads of a key/value head read as that head's query rows, so the cache is never
  copied per head (transformers < 5.2x repeats every key/value head when a mask is given: the
  whole static cache copied in every layer at every step). Under `decode_lengths` (the slot
  decoder on CUDA) each row reads only its own columns (`model/decode_kernel.py`).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.model.decode_kernel import decode_by_length


def varlen_kernel():
    """torch's varlen_attn and the keyword it takes for causality, or None where unusable."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    gqa = {"enable_gqa": True} if "enable_gqa" in params else {}
    return varlen_attn, causal | gqa


def _per_sample_sdpa(q, k, v, cu_seqlens, scale):
    """The reference: causal SDPA on each sample alone. q: [N, Hq, D], k/v: [N, Hkv, D]."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        seg = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]  # [1, H, n, D]
        out[start:end] = F.scaled_dot_product_attention(
            *seg, is_causal=True, scale=scale, enable_gqa=True)[0].transpose(0, 1)
    return out


def varlen_attention(q, k, v, cu_seqlens, max_len: int, scale: float | None, use_kernel: bool = True):
    """Causal attention within each sample of a token stream. q: [N, Hq, D], k/v: [N, Hkv, D]."""
    kernel = varlen_kernel() if use_kernel and q.is_cuda else None
    if kernel is None:
        return _per_sample_sdpa(q, k, v, cu_seqlens, scale)
    varlen_attn, options = kernel
    if q.dtype not in (torch.float16, torch.bfloat16):
        # FlashAttention takes half precision only; SDPA under autocast would cast the same way
        # (QLoRA keeps norms in fp32, so q/k/v arrive in fp32).
        if not torch.is_autocast_enabled("cuda"):
            return _per_sample_sdpa(q, k, v, cu_seqlens, scale)
        low = torch.get_autocast_dtype("cuda")
        return varlen_attention(q.to(low), k.to(low), v.to(low), cu_seqlens, max_len, scale).to(q.dtype)
    if "enable_gqa" not in options and k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale, **options)


# --- the static-cache decoder's attention -----------------------------------------------------

DECODE_ATTENTION = "tunelab_decode_sdpa"


@dataclass
class PrefillLayout:
    """Where the real tokens of a left-padded [batch, width] prompt block are."""

    keep: torch.Tensor  # [real tokens] flat indices into batch * width
    cu_seqlens: torch.Tensor  # [batch + 1] int32
    max_len: int

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> PrefillLayout:
        lengths = mask.sum(dim=1)
        cu_seqlens = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
        return cls(mask.reshape(-1).nonzero().squeeze(1), cu_seqlens, int(lengths.max()))


_PREFILL: contextvars.ContextVar[PrefillLayout | None] = contextvars.ContextVar("tunelab_prefill", default=None)
_DECODE_LENGTHS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("tunelab_decode_lengths",
                                                                                     default=None)


@contextlib.contextmanager
def prefill_layout(layout: PrefillLayout):
    """Prefill forwards inside this block attend within each prompt's real tokens only."""
    token = _PREFILL.set(layout)
    try:
        yield
    finally:
        _PREFILL.reset(token)


@contextlib.contextmanager
def decode_lengths(lengths: torch.Tensor):
    """Decode steps inside this block attend to the first lengths[row] key/value columns of each
    row (`model/decode_kernel.py`): no mask is read, and no column past a row's own."""
    token = _DECODE_LENGTHS.set(lengths)
    try:
        yield
    finally:
        _DECODE_LENGTHS.reset(token)


def _prefill_attention(query, key, value, layout: PrefillLayout, scaling):
    """query [batch, Hq, width, D]; key/value: the cache [batch, Hkv, slots, D], prompt in 0..width."""
    batch, heads, width, dim = query.shape

    def stream(t):  # [batch, H, width, D] -> [real tokens, H, D]
        return t[:, :, :width].transpose(1, 2).reshape(batch * width, t.shape[1], dim)[layout.keep]

    out = varlen_attention(stream(query), stream(key), stream(value), layout.cu_seqlens, layout.max_len, scaling)
    full = out.new_zeros(batch * width, heads, dim)
    full[layout.keep] = out
    return full.view(batch, width, heads, dim)


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface, for the static-cache decoder (see the module text)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = _PREFILL.get()
    batch, heads, length, dim = query.shape
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if length > 1 and layout is not None:
        return _prefill_attention(query, key, value, layout, scaling), None
    groups = getattr(module, "num_key_value_groups", 1)
    lengths = _DECODE_LENGTHS.get()
    if length != 1 or (groups == 1 and lengths is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    # [batch, heads, 1, dim] -> [batch, kv_heads, groups, dim]: query head h uses kv head h // groups.
    packed = query.reshape(batch, heads // groups, groups, dim)
    if lengths is not None:
        out = decode_by_length(packed, key, value, lengths, scaling)
    else:
        out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def grouped_query_decode(model):
    """Run `decode_attention` in place of SDPA while decoding; yields whether it is active
    (only models that use SDPA: eager and other implementations keep their own)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)
    config._attn_implementation = DECODE_ATTENTION
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"
