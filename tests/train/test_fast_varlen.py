"""Padding-free batches and per-sample attention compute what padded / packed batches compute."""

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.collate import IGNORE_INDEX, Sample, collate_packed, pack_samples, pad_batch
from tunelab.model.attention import varlen_attention
from tunelab.train.fast.varlen import flatten_batch


def _samples():
    return [Sample([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]),
            Sample([9, 10], [IGNORE_INDEX, 10]),
            Sample([11, 12, 13], [11, 12, 13])]


def test_padded_batch_flattens_to_real_tokens_with_per_sample_positions_and_targets():
    stream = flatten_batch(pad_batch(_samples(), pad_token_id=0))
    assert stream.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert stream.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    assert stream.cu_seqlens.tolist() == [0, 4, 6, 9] and stream.max_len == 4
    # targets[t] = labels[t + 1] inside a sample; a sample's last token predicts nothing.
    assert stream.targets.tolist() == [IGNORE_INDEX, 7, 8, IGNORE_INDEX, 10, IGNORE_INDEX, 12, 13, IGNORE_INDEX]


def test_packed_rows_flatten_to_the_same_targets_as_padded_samples():
    padded = flatten_batch(pad_batch(_samples(), pad_token_id=0))
    packed = flatten_batch(collate_packed(pack_samples(_samples(), max_len=6), pad_token_id=0))
    # Packing reorders samples; per sample, the tokens and targets must be the same.
    def per_sample(stream):
        bounds = stream.cu_seqlens.tolist()
        return sorted((tuple(stream.input_ids[0, a:b].tolist()), tuple(stream.targets[a:b].tolist()))
                      for a, b in zip(bounds[:-1], bounds[1:]))
    assert per_sample(packed) == per_sample(padded)
    assert int((padded.targets != IGNORE_INDEX).sum()) == int((pad_batch(_samples(), 0)["labels"][:, 1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_varlen_attention_equals_causal_attention_of_each_sample_alone(heads, kv_heads):
    g = torch.Generator().manual_seed(heads + kv_heads)
    lengths = [5, 1, 9]
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    q = torch.randn(15, heads, 8, generator=g, dtype=torch.float64)
    k = torch.randn(15, kv_heads, 8, generator=g, dtype=torch.float64)
    v = torch.randn(15, kv_heads, 8, generator=g, dtype=torch.float64)
    got = varlen_attention(q, k, v, cu, max(lengths), scale=0.3)
    start = 0
    for n in lengths:
        seg = slice(start, start + n)
        kk = k[seg].repeat_interleave(heads // kv_heads, dim=1)
        vv = v[seg].repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[seg], kk) * 0.3
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        ref = torch.einsum("hqk,khd->qhd", F.softmax(scores, dim=-1), vv)
        torch.testing.assert_close(got[seg], ref)
        start += n
