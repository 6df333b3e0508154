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


def test_batch_order_counts_the_rows_folded_samples_hold():
    """Folded dialogues (data/fold.py) hold several rows: batches count rows, so an epoch has the
    unfolded data's micro-batches and optimizer steps, and a step about the same rows."""
    rng = random.Random(0)
    rows = [rng.randint(1, 6) for _ in range(300)]
    lengths = [100 * n + rng.randint(0, 50) for n in rows]
    batch, per_step = 4, 4
    order = batch_order(lengths, batch, seed=3, epoch=0, rows=rows, per_step=per_step)
    assert len(order) == -(-sum(rows) // batch)  # the micro-batches of the rows one by one
    assert sorted(i for b in order for i in b) == list(range(300))
    assert all(len(b) <= batch for b in order)
    steps = [order[s:s + per_step] for s in range(0, len(order), per_step)]
    step_rows = [sum(rows[i] for ids in step for i in ids) for step in steps]
    assert all(step_rows)  # no step is empty
    assert all(abs(n - batch * per_step) < max(rows) for n in step_rows[:-1])
    assert sum(step_rows) == sum(rows)
    assert order == batch_order(lengths, batch, seed=3, epoch=0, rows=rows, per_step=per_step)
    assert order != batch_order(lengths, batch, seed=3, epoch=1, rows=rows, per_step=per_step)
    assert max(lengths[i] for ids in steps[0] for i in ids) == max(lengths)  # the longest step first
    # One row per sample: the order is the one it always was.
    plain = [random.Random(i).randint(1, 500) for i in range(100)]
    assert batch_order(plain, 8, 3, 0, rows=[1] * 100, per_step=2) == batch_order(plain, 8, 3, 0)
    with pytest.raises(ValueError, match="more than 4 rows"):
        batch_order([5, 5, 5], 2, 0, 0, rows=[1, 10, 1], per_step=2)
