"""Preference pairs and KTO examples -> token rows, and rows -> batches.

Each answer is encoded with the prompt through the same chat template and label masking
as SFT (`encode_conversation`, labels on the final answer only). The prompt is the part
both encodings share, so chosen and rejected always see the very same prompt tokens, and
they are truncated together: one budget for the prompt (its end is kept: the question and
the generation header the answer follows) and one for the longer answer.

A pair batch puts every chosen sequence first and every rejected one after it, so the
policy (and the reference) score both sides in one forward pass.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

import torch

from tunelab.data.collate import Sample, pad_batch
from tunelab.data.tokenize import encode_conversation, encode_each
from tunelab.data.types import IGNORE_INDEX, Conversation, KTOExample, Message, PreferencePair
from tunelab.errors import TunelabError

NO_CUTOFF = sys.maxsize


@dataclass
class PairRow:
    """One tokenized preference pair: shared prompt ids, then each answer's ids and labels."""

    prompt: list[int]
    chosen: list[int]
    chosen_labels: list[int]
    rejected: list[int]
    rejected_labels: list[int]
    source: str = ""
    ref_logps: tuple[float, float] | None = None  # (chosen, rejected), when precomputed

    def __len__(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class KTORow:
    """One tokenized KTO example, plus the completion of another example for the KL estimate."""

    prompt: list[int]
    completion: list[int]
    completion_labels: list[int]
    desirable: bool
    source: str = ""
    kl_completion: list[int] | None = None  # set by `assign_kl_completions`
    kl_completion_labels: list[int] | None = None
    ref_logps: tuple[float, float] | None = None  # (completion, mismatched), when precomputed

    def __len__(self) -> int:
        return len(self.prompt) + max(len(self.completion), len(self.kl_completion or ()))


# --- encoding --------------------------------------------------------------------------

def fit_lengths(prompt_len: int, answer_len: int, cutoff_len: int) -> tuple[int, int]:
    """How many prompt and answer tokens to keep so that prompt + answer <= cutoff_len.

    A short answer is kept whole; else a short prompt is; else both shrink in proportion
    (the split LLaMA-Factory uses), so neither side is cut to nothing.
    """
    if prompt_len + answer_len <= cutoff_len:
        return prompt_len, answer_len
    if 2 * answer_len < cutoff_len:
        max_answer = cutoff_len
    elif 2 * prompt_len < cutoff_len:
        max_answer = cutoff_len - prompt_len
    else:
        max_answer = int(cutoff_len * answer_len / (prompt_len + answer_len))
    answer = min(max_answer, answer_len)
    return min(cutoff_len - answer, prompt_len), answer


def _encode_answer(prompt: list[Message], answer: Message, source: str, tokenizer, template: str):
    # Only the final answer is labelled, whatever earlier assistant turns the prompt holds;
    # it is the target whatever its role (a hotel `search` call too).
    conv = Conversation(list(prompt) + [Message(answer.role, answer.content, train=True)], source=source)
    return encode_conversation(conv, tokenizer, template, NO_CUTOFF, train_on="last")


def _first_label(labels: list[int]) -> int:
    return next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _cut_prompt(prompt: list[int], keep: int) -> list[int]:
    return prompt[len(prompt) - keep:] if keep else []


def _check_labels(labels: list[int], name: str, source: str, cutoff_len: int) -> None:
    if all(t == IGNORE_INDEX for t in labels):
        raise TunelabError(f"no token of the {name} answer is left within cutoff_len={cutoff_len}", where=source,
                           fix="raise cutoff_len, or set skip_invalid=true to drop such records")


def encode_pair(pair: PreferencePair, tokenizer, template: str, cutoff_len: int) -> PairRow:
    """Tokenize a pair: one shared (left-truncated) prompt, each answer with its labels."""
    chosen = _encode_answer(pair.prompt, pair.chosen, pair.source, tokenizer, template)
    rejected = _encode_answer(pair.prompt, pair.rejected, pair.source, tokenizer, template)
    # The prompt is what both renders share up to the first label (the answers may start
    # with the same tokens; those stay part of the answers).
    split = min(_common_prefix(chosen.input_ids, rejected.input_ids),
                _first_label(chosen.labels), _first_label(rejected.labels))
    prompt = chosen.input_ids[:split]
    c_ids, c_labels = chosen.input_ids[split:], chosen.labels[split:]
    r_ids, r_labels = rejected.input_ids[split:], rejected.labels[split:]
    keep_prompt, keep_answer = fit_lengths(len(prompt), max(len(c_ids), len(r_ids)), cutoff_len)
    row = PairRow(_cut_prompt(prompt, keep_prompt), c_ids[:keep_answer], c_labels[:keep_answer],
                  r_ids[:keep_answer], r_labels[:keep_answer], pair.source)
    _check_labels(row.chosen_labels, "chosen", pair.source, cutoff_len)
    _check_labels(row.rejected_labels, "rejected", pair.source, cutoff_len)
    if row.chosen == row.rejected:
        raise TunelabError(f"chosen and rejected are the same within cutoff_len={cutoff_len} "
                           "(they differ only after the cut)", where=pair.source,
                           fix="raise cutoff_len, or set skip_invalid=true to drop such pairs")
    return row


def encode_kto(example: KTOExample, tokenizer, template: str, cutoff_len: int) -> KTORow:
    enc = _encode_answer(example.prompt, example.completion, example.source, tokenizer, template)
    split = _first_label(enc.labels)
    prompt, ids, labels = enc.input_ids[:split], enc.input_ids[split:], enc.labels[split:]
    keep_prompt, keep_answer = fit_lengths(len(prompt), len(ids), cutoff_len)
    row = KTORow(_cut_prompt(prompt, keep_prompt), ids[:keep_answer], labels[:keep_answer],
                 example.desirable, example.source)
    _check_labels(row.completion_labels, "completion", example.source, cutoff_len)
    return row


def encode_preferences(items: list, tokenizer, template: str, cutoff_len: int,
                       skip_invalid: bool = False) -> tuple[list, int]:
    """Encode pairs / KTO examples; a record that cannot be encoded raises, or with
    `skip_invalid` is dropped and counted. Returns (rows, number skipped)."""
    def encode(item) -> list:
        return [(encode_kto if isinstance(item, KTOExample) else encode_pair)(item, tokenizer, template, cutoff_len)]

    return encode_each(items, encode, skip_invalid, what="preference record(s)")


def unpair(pairs: list[PreferencePair]) -> list[KTOExample]:
    """Pairs as KTO data: the chosen answer is desirable, the rejected one undesirable."""
    out = []
    for p in pairs:
        out.append(KTOExample(p.prompt, p.chosen, True, p.source))
        out.append(KTOExample(p.prompt, p.rejected, False, p.source))
    return out


def assign_kl_completions(rows: list[KTORow], seed: int, cutoff_len: int) -> None:
    """Give each row the completion of another row (a seeded cyclic shift of a shuffled order),
    cut to fit beside this row's prompt: the mismatched pairs the KTO reference point z is
    estimated on. Fixed once, so the reference's log-probs on them can be precomputed."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    for k, i in enumerate(order):
        other = rows[order[(k + 1) % len(order)]]
        room = max(cutoff_len - len(rows[i].prompt), 1)
        rows[i].kl_completion = other.completion[:room]
        rows[i].kl_completion_labels = other.completion_labels[:room]


# --- batches ---------------------------------------------------------------------------

def _samples(prompts: list[list[int]], answers: list[list[int]], labels: list[list[int]]) -> list[Sample]:
    return [Sample(p + a, [IGNORE_INDEX] * len(p) + lab) for p, a, lab in zip(prompts, answers, labels)]


def collate_pairs(rows: list[PairRow], pad_token_id: int) -> dict:
    """[chosen_0 .. chosen_B-1, rejected_0 .. rejected_B-1] in one padded batch; `n_examples` = B."""
    prompts = [r.prompt for r in rows] * 2
    answers = [r.chosen for r in rows] + [r.rejected for r in rows]
    labels = [r.chosen_labels for r in rows] + [r.rejected_labels for r in rows]
    batch = pad_batch(_samples(prompts, answers, labels), pad_token_id)
    batch["n_examples"] = len(rows)
    if all(r.ref_logps is not None for r in rows):
        batch["ref_logps"] = torch.tensor([r.ref_logps[0] for r in rows] + [r.ref_logps[1] for r in rows])
    return batch


def collate_kto(rows: list[KTORow], pad_token_id: int) -> dict:
    """The examples (`input_ids`...) and their mismatched pairs (`kl_input_ids`...) as two batches."""
    prompts = [r.prompt for r in rows]
    batch = pad_batch(_samples(prompts, [r.completion for r in rows], [r.completion_labels for r in rows]),
                      pad_token_id)
    kl = pad_batch(_samples(prompts, [r.kl_completion for r in rows], [r.kl_completion_labels for r in rows]),
                   pad_token_id)
    batch |= {f"kl_{key}": value for key, value in kl.items()}
    batch["desirable"] = torch.tensor([r.desirable for r in rows])
    batch["n_examples"] = len(rows)
    if all(r.ref_logps is not None for r in rows):
        batch["ref_logps"] = torch.tensor([r.ref_logps[0] for r in rows])
        batch["ref_kl_logps"] = torch.tensor([r.ref_logps[1] for r in rows])
    return batch
