import random

import pytest
import torch

from conftest import tiny_llama
from tunelab.data.collate import (
    IGNORE_INDEX,
    Sample,
    batch_order,
    collate_packed,
    count_label_tokens,
    pack_samples,
    pad_batch,
)
from tunelab.train.losses import causal_lm_loss_sum


def _samples(n=9, seed=0, vocab=500):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 20)
        ids = [rng.randrange(1, vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        out.append(Sample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def test_batch_order_is_a_permutation_reproducible_per_epoch_and_grouped():
    lengths = [random.Random(i).randint(1, 500) for i in range(1000)]
    a = batch_order(lengths, 8, seed=3, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(1000))
    assert a == batch_order(lengths, 8, seed=3, epoch=0)
    assert a != batch_order(lengths, 8, seed=3, epoch=1)
    # Grouping keeps each batch's lengths close: far less padding than random batches.
    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    random_batches = batch_order(lengths, 8, seed=3, epoch=0, group_by_length=False)
    assert padding(a) < padding(random_batches) / 5
    # The longest batch comes first, so an out-of-memory error shows at once.
    assert max(lengths[i] for i in a[0]) == max(lengths)


def test_pad_batch_masks_padding_from_attention_and_loss():
    batch = pad_batch([Sample([5, 6, 7], [-100, 6, 7]), Sample([8], [8])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert count_label_tokens(batch) == 2  # the shift drops each row's first label


def test_packing_keeps_every_token_and_fits_rows():
    samples = _samples(30)
    rows = pack_samples(samples, max_len=40)
    assert all(len(r) <= 40 for r in rows)
    assert sum(len(r) for r in rows) == sum(len(s) for s in samples)
    assert len(rows) < len(samples)
    with pytest.raises(ValueError):
        pack_samples([Sample([1] * 50, [1] * 50)], max_len=40)


def test_packed_loss_equals_unpacked_loss(qwen2_tokenizer):
    """Packing must not change the math: no attention across samples, positions restart."""
    model = tiny_llama(qwen2_tokenizer)
    samples = _samples(7, seed=1)
    with torch.no_grad():
        separate = [causal_lm_loss_sum(model, pad_batch([s], 0)) for s in samples]
        rows = pack_samples(samples, max_len=64)
        packed_sum, packed_n = causal_lm_loss_sum(model, collate_packed(rows, 0))
    assert packed_n == sum(n for _, n in separate)
    assert packed_sum.item() == pytest.approx(sum(s.item() for s, _ in separate), rel=1e-4)


def test_padded_batch_loss_equals_per_sample_loss(qwen2_tokenizer):
    model = tiny_llama(qwen2_tokenizer)
    samples = _samples(5, seed=2)
    with torch.no_grad():
        separate = sum(causal_lm_loss_sum(model, pad_batch([s], 0))[0].item() for s in samples)
        together, _ = causal_lm_loss_sum(model, pad_batch(samples, 0))
    assert together.item() == pytest.approx(separate, rel=1e-4)
