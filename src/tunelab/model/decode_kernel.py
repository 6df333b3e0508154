"""Decode attention that reads only each row's own key/value columns.

A slot decoder's rows (`model/generate.SlotDecoder`) hold requests of very different lengths
in one static cache. SDPA with a mask reads every row's columns up to the batch's window (the
longest row, rounded up to a captured bucket) and masks most of them away: on the hotel test
set a decode step read about 10x the columns its rows use (`bench/slot_windows.py`), and with
a 135M model those reads are most of the step. torch's FlashAttention varlen kernel would take
per-row key lengths (`seqused_k`) only in releases newer than the one on our GPU image, so this
is a small Triton kernel of our own: one program per (row, key/value head) walks the row's
first `lengths[row]` columns in blocks with an online softmax (the query heads that share the
key/value head are the rows of one tensor-core product, as in FlashDecoding). The lengths are
read on the device, so a step stays capturable as one CUDA graph whatever its rows' lengths.

`decode_by_length` runs the kernel on CUDA (where Triton is installed) and the same attention
through masked SDPA elsewhere (the reference the kernel is tested against).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BLOCK_COLUMNS = 64  # key/value columns per iteration of a program


def kernel_available(device: torch.device) -> bool:
    """Whether `decode_by_length` runs the Triton kernel on `device` (else masked SDPA): CUDA, Triton
    installed, and the kernel builds and agrees with the reference there."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None and _kernel_works(device)


@functools.cache
def _kernel_works(device: torch.device) -> bool:
    """Run the kernel once on a small case (once a device and process). Triton compiles its launcher
    with the host's C compiler, which a slim container may lack: decoding then keeps masked SDPA
    with a warning, rather than failing in the middle of an evaluation or a server's start."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(shape, generator=generator).to(device, torch.bfloat16)
                         for shape in ((2, 1, 3, 64), (2, 1, 80, 64), (2, 1, 80, 64)))
    lengths = torch.tensor([1, 70], device=device)
    try:
        out = decode_by_length(query, key, value, lengths, use_kernel=True).float()
    except Exception as exc:  # noqa: BLE001 - any failure to build or launch: the reference still works
        log.warning("the length-aware decode kernel does not run here (%s: %s); decoding reads the masked window "
                    "(slower on long prompts)", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return False
    expected = decode_by_length_reference(query.float(), key.float(), value.float(), lengths, 64 ** -0.5)
    if not torch.allclose(out, expected, atol=2e-2, rtol=2e-2):
        log.warning("the length-aware decode kernel disagrees with SDPA here (max difference %.3g); decoding "
                    "reads the masked window", (out - expected).abs().max().item())
        return False
    return True


def uses_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Half precision on CUDA (fp32 would go through TF32 tensor cores: the reference keeps it exact)."""
    return dtype in (torch.bfloat16, torch.float16) and kernel_available(device)


def decode_by_length(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor,
                     scale: float | None = None, use_kernel: bool | None = None) -> torch.Tensor:
    """One query token per row. query [rows, kv_heads, groups, dim] (the query heads of key/value
    head h in row h); key/value [rows, kv_heads, window, dim]; row r attends to its columns
    0 .. lengths[r] - 1 (lengths >= 1). Returns [rows, kv_heads, groups, dim] in query's dtype."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if use_kernel is None:
        use_kernel = uses_kernel(query.device, query.dtype) and key.dtype == value.dtype == query.dtype
    if not use_kernel:
        return decode_by_length_reference(query, key, value, lengths, scale)
    rows, heads, groups, dim = query.shape
    out = torch.empty_like(query)
    on_device = torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext()
    with on_device:  # Triton launches on the current device: the tensors' own (--device cuda:1)
        _kernel()[(rows, heads)](
            query, key, value, lengths, out, scale,
            *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *out.stride()[:3],
            GROUPS=groups, GROUPS_PAD=_padded(groups), DIM=dim, DIM_PAD=_padded(dim), BLOCK=BLOCK_COLUMNS)
    return out


def _padded(n: int) -> int:
    """A tile side for n: a power of two, at least 16 (the smallest tensor-core product)."""
    return max(16, 1 << (n - 1).bit_length())


def decode_by_length_reference(query, key, value, lengths, scale: float) -> torch.Tensor:
    """The same attention as masked SDPA over the whole window."""
    allowed = torch.arange(key.shape[2], device=key.device)[None, :] < lengths[:, None]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None, None, :], scale=scale)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def decode_kernel(Q, K, V, Lengths, Out, scale,
                      sq_row, sq_head, sq_group, sk_row, sk_head, sk_col, sv_row, sv_head, sv_col,
                      so_row, so_head, so_group,
                      GROUPS: tl.constexpr, GROUPS_PAD: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        n = tl.load(Lengths + row)
        group = tl.arange(0, GROUPS_PAD)
        d = tl.arange(0, DIM_PAD)
        q_mask = (group[:, None] < GROUPS) & (d[None, :] < DIM)
        q = tl.load(Q + row * sq_row + head * sq_head + group[:, None] * sq_group + d[None, :], mask=q_mask, other=0.0)
        k_start = K + row * sk_row + head * sk_head
        v_start = V + row * sv_row + head * sv_head
        best = tl.full([GROUPS_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUPS_PAD], tl.float32)
        acc = tl.zeros([GROUPS_PAD, DIM_PAD], tl.float32)
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            kv_mask = (cols[:, None] < n) & (d[None, :] < DIM)
            k = tl.load(k_start + cols[:, None] * sk_col + d[None, :], mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale  # [GROUPS_PAD, BLOCK] in fp32
            scores = tl.where(cols[None, :] < n, scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            rescale = tl.exp(best - new_best)
            p = tl.exp(scores - new_best[:, None])
            total = total * rescale + tl.sum(p, axis=1)
            v = tl.load(v_start + cols[:, None] * sv_col + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        out = acc / total[:, None]
        tl.store(Out + row * so_row + head * so_head + group[:, None] * so_group + d[None, :],
                 out.to(Out.dtype.element_ty), mask=q_mask)

    return decode_kernel
