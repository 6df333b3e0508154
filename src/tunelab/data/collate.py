"""Batching: length-grouped order, padding, and packing without cross-sample attention.

A batch is a dict of tensors. Padded batches carry `input_ids`, `labels` and a 2-D
`attention_mask`. Packed batches concatenate several samples in one row and carry
`position_ids` that restart at 0 for each sample plus `seq_lens` (the sample lengths
per row); `packed_attention_mask` turns those into a block-diagonal causal mask for
attention kernels that take a dense mask, and varlen/flash kernels use the positions.

Order is a pure function of (seed, epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from tunelab.data.types import IGNORE_INDEX


@dataclass
class Sample:
    """The collate-level view of one encoded example (or one packed row)."""

    input_ids: list[int]
    labels: list[int]
    seq_lens: tuple[int, ...] = ()  # lengths of the samples packed in this row; () = one sample
    rows: int = 1  # rows of the user's data it holds (a folded dialogue: data/fold.py); what batches count

    def __len__(self) -> int:
        return len(self.input_ids)


def pad_id_for(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS (padding is masked anyway), else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                group_by_length: bool = True, shuffle: bool = True,
                rows: Sequence[int] | None = None, per_step: int = 1) -> list[list[int]]:
    """Indices of each batch for one epoch.

    With `group_by_length`, samples are shuffled, cut into mega-batches of 64 batches,
    sorted by length inside each, then batches are shuffled: every batch holds similar
    lengths (little padding) while the epoch order stays random (as HF's
    LengthGroupedSampler). The longest batch goes first so an out-of-memory shows at
    step 1, not after an hour.

    `rows[i]` is how many rows of the user's data sample i holds (a folded dialogue holds
    several): then batches count those rows, not samples (`_row_slots`), and `per_step`
    (micro-batches per optimizer step) keeps every step's rows together.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        mega = batch_size * 64
        order = [i for start in range(0, len(order), mega)
                 for i in sorted(order[start:start + mega], key=lambda i: -lengths[i])]
    if rows is not None and any(n != 1 for n in rows):
        return _row_slots(order, lengths, rows, batch_size, per_step, rng if shuffle and group_by_length else None)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle and group_by_length and len(batches) > 1:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        first = batches.pop(longest)
        rng.shuffle(batches)
        batches.insert(0, first)
    return batches


def _row_slots(order: list[int], lengths: Sequence[int], rows: Sequence[int], batch_size: int, per_step: int,
               rng: random.Random | None) -> list[list[int]]:
    """Micro-batches that count rows of the user's data: as many as the rows one by one would
    fill (ceil(rows / batch_size)), so an epoch has the optimizer steps, and a step the rows,
    of the unfolded data.

    The rows of the ordered samples are laid end to end and cut every `batch_size` rows; a
    sample joins the micro-batch where its last row falls. So a micro-batch holds at most
    `batch_size` samples, a step (`per_step` micro-batches) about `batch_size * per_step` rows,
    and a micro-batch may be empty where a sample spans more than `batch_size` rows (the loop
    skips it). A sample of at most `batch_size * per_step` rows (data/fold.py folds no more)
    never empties a whole step. `rng` given: whole steps are shuffled, the longest first
    (the last, shorter step stays last, so steps keep their borders).
    """
    slots: list[list[int]] = [[] for _ in range(-(-sum(rows) // batch_size))]
    filled = 0
    for i in order:
        filled += rows[i]
        slots[(filled - 1) // batch_size].append(i)
    steps = [slots[s:s + per_step] for s in range(0, len(slots), per_step)]
    if any(not any(step) for step in steps):
        raise ValueError(f"samples of more than {batch_size * per_step} rows leave an optimizer step empty "
                         "(fold at most one step's rows: data/fold.py max_rows)")
    if rng is not None and len(steps) > 1:
        tail = [steps.pop()] if len(steps[-1]) < per_step else []
        longest = max(range(len(steps)), key=lambda s: max(lengths[i] for ids in steps[s] for i in ids))
        first = steps.pop(longest)
        rng.shuffle(steps)
        steps = [first, *steps, *tail]
    return [ids for step in steps for ids in step]


def micro_batch_tokens(ids: Sequence[int], lengths: Sequence[int], padded: bool) -> int:
    """Tokens a micro-batch computes on: samples x longest when padded, the sum when padding-free."""
    return len(ids) * max(lengths[i] for i in ids) if padded else sum(lengths[i] for i in ids)


def split_by_tokens(ids: Sequence[int], lengths: Sequence[int], max_tokens: int,
                    padded: bool = False) -> list[list[int]]:
    """Cut one optimizer step's samples into micro-batches of at most `max_tokens` tokens.

    A padded micro-batch costs (samples x longest); a padding-free one the sum of lengths.
    Longest first, so each micro-batch holds similar lengths; a sample longer than the budget
    goes alone (samples are never cut). The step's loss is averaged over all its target
    tokens whatever the split, so the budget changes memory and speed, never the math.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(ids, key=lambda i: -lengths[i]):
        grown = current + [i]
        if current and micro_batch_tokens(grown, lengths, padded) > max_tokens:
            batches.append(current)
            grown = [i]
        current = grown
    if current:
        batches.append(current)
    return batches


def pad_batch(samples: Sequence[Sample], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict:
    """Right-pad samples to the longest one; padding is masked out of attention and loss."""
    width = max(len(s) for s in samples)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(samples)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for row, s in enumerate(samples):
        input_ids[row, : len(s)] = torch.tensor(s.input_ids)
        labels[row, : len(s)] = torch.tensor(s.labels)
        attention_mask[row, : len(s)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack_samples(samples: Sequence[Sample], max_len: int) -> list[Sample]:
    """Pack samples into rows of at most `max_len` tokens (first-fit decreasing).

    Each row remembers its samples' lengths so that attention and positions restart
    at every sample border: packing changes speed, never the math.
    """
    bins: list[list[Sample]] = []
    room: list[int] = []
    for s in sorted(samples, key=len, reverse=True):
        if len(s) > max_len:
            raise ValueError(f"sample of {len(s)} tokens does not fit a packed row of {max_len}")
        for b, free in enumerate(room):
            if len(s) <= free:
                bins[b].append(s)
                room[b] -= len(s)
                break
        else:
            bins.append([s])
            room.append(max_len - len(s))
    return [_packed_row(row) for row in bins]


def pack_in_order(samples: Iterable[Sample], max_len: int) -> Iterator[Sample]:
    """Pack samples into rows of at most `max_len` tokens as they come (next-fit): for a stream,
    where first-fit decreasing (`pack_samples`) would need every sample first. The rows are
    built alike: attention and positions restart at every sample border."""
    row: list[Sample] = []
    room = max_len
    for s in samples:
        if len(s) > max_len:
            raise ValueError(f"sample of {len(s)} tokens does not fit a packed row of {max_len}")
        if row and len(s) > room:
            yield _packed_row(row)
            row, room = [], max_len
        row.append(s)
        room -= len(s)
    if row:
        yield _packed_row(row)


def _packed_row(row: Sequence[Sample]) -> Sample:
    return Sample(input_ids=[t for s in row for t in s.input_ids],
                  labels=[t for s in row for t in _labels_for_packing(s)],
                  seq_lens=tuple(len(s) for s in row))


def _labels_for_packing(s: Sample) -> list[int]:
    # The first label of each sample must not be predicted from the previous sample's
    # last token: the causal shift in the loss would otherwise join them. Masking the
    # first position costs nothing (it is never a target after the shift anyway).
    return [IGNORE_INDEX] + list(s.labels[1:])


def collate_packed(rows: Sequence[Sample], pad_token_id: int) -> dict:
    """Pad packed rows and add per-sample `position_ids` and `seq_lens`."""
    batch = pad_batch(rows, pad_token_id)
    width = batch["input_ids"].shape[1]
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for n in row.seq_lens or (len(row),):
            position_ids[r, start:start + n] = torch.arange(n)
            start += n
    batch["position_ids"] = position_ids
    batch["seq_lens"] = [list(row.seq_lens or (len(row),)) for row in rows]
    return batch


def packed_attention_mask(seq_lens: list[list[int]], width: int) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, T, T] (True = may attend) for packed rows."""
    masks = []
    causal = torch.tril(torch.ones((width, width), dtype=torch.bool))
    for lens in seq_lens:
        segment = torch.full((width,), -1, dtype=torch.long)  # padding attends nowhere
        start = 0
        for i, n in enumerate(lens):
            segment[start:start + n] = i
            start += n
        same = (segment[:, None] == segment[None, :]) & (segment[:, None] >= 0)
        # A padding row that attends to nothing yields NaN in softmax: let it see itself.
        same |= torch.eye(width, dtype=torch.bool)
        masks.append(same & causal)
    return torch.stack(masks)[:, None]


def count_label_tokens(batch: dict) -> int:
    """Target tokens after the causal shift: what the loss is averaged over."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
