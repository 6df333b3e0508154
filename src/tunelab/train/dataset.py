"""From config to token samples: read, split off validation, render and mask.

Kept apart from the loop so the loop reads as a recipe and so benchmarks and
preference stages can build the same samples.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

import jinja2

from tunelab.config import TunelabConfig
from tunelab.data import tokenize
from tunelab.data.collate import Sample
from tunelab.data.fold import fold_dialogues
from tunelab.data.readers import load_conversations
from tunelab.data.templates import lock_template, render
from tunelab.data.tools.common import first_user_turn
from tunelab.data.truncate import TruncationStats, encode_fitted
from tunelab.data.types import Conversation
from tunelab.errors import TunelabError


@dataclass
class SFTData:
    train: list[Sample]
    eval: list[Sample]


def split_validation(records: list, val_size: float, seed: int, by: str = "dialogue") -> tuple[list, list]:
    """Hold out `val_size` (a fraction < 1, or a count >= 1) of the records, seeded.

    `by="dialogue"` keeps the rows of one dialogue (rows that start with the same user
    turn, as the hotel set's growing prefixes do) on one side, so validation never scores
    a row whose prefix was trained on; `by="record"` draws rows independently.
    """
    if val_size <= 0:
        return records, []
    n_val = int(round(len(records) * val_size)) if val_size < 1 else int(val_size)
    n_val = max(1, min(n_val, len(records) - 1))
    rng = random.Random(seed)
    if by == "record":
        order = list(range(len(records)))
        rng.shuffle(order)
        held = set(order[:n_val])
    else:
        groups: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            groups.setdefault(first_user_turn(record), []).append(i)
        members = list(groups.values())
        rng.shuffle(members)
        held = set()
        for group in members[:-1]:  # the last group always trains: never an empty train set
            if len(held) >= n_val:
                break
            held.update(group)
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def read_conversations(cfg: TunelabConfig) -> tuple[list[Conversation], list[Conversation], int]:
    """(train, validation) conversations as the config says, unfolded, and how many records
    were skipped as invalid. The task-metric evaluation during training reads the same split."""
    if not cfg.dataset:
        raise TunelabError("no training data given", where="config",
                           fix="set dataset: path/to/train.jsonl (or dataset=... on the command line)")
    read = dict(fmt=cfg.dataset_format, skip_invalid=cfg.skip_invalid, system_prompt=cfg.system_prompt)
    convs = load_conversations(cfg.dataset, max_samples=cfg.max_samples, **read)
    if cfg.eval_dataset:
        train_convs, eval_convs = convs, load_conversations(cfg.eval_dataset, **read)
    else:
        train_convs, eval_convs = split_validation(convs, cfg.val_size, cfg.seed, cfg.val_split_by)
    return train_convs, eval_convs, getattr(convs, "skipped", 0)


def load_sft_data(cfg: TunelabConfig, tokenizer) -> SFTData:
    train_convs, eval_convs, _ = read_conversations(cfg)
    if cfg.eval_strategy != "no" and not eval_convs:
        raise no_validation_data(cfg, train_convs)
    # The tokenizer saved with the weights carries this template (and the system prompt).
    template = None if cfg.stage == "pt" else lock_template(tokenizer, cfg.template, cfg.system_prompt)
    if cfg.fold_dialogues and cfg.stage == "sft":
        # After the split, each side on its own: a validation row is never folded into a training one.
        train_convs = _fold(train_convs, cfg, tokenizer, template, "training")
        eval_convs = _fold(eval_convs, cfg, tokenizer, template, "validation")
    train, _ = encode_samples(train_convs, tokenizer, template, cfg)
    evals, _ = encode_samples(eval_convs, tokenizer, template, cfg)
    if not train:
        raise TunelabError("no training sample is left after tokenization", where=", ".join(cfg.dataset),
                           fix="check the data with `tunelab data check`, or raise cutoff_len")
    return SFTData(train, evals)


def no_validation_data(cfg: TunelabConfig, train_convs: list[Conversation]) -> TunelabError:
    what = f"eval_strategy={cfg.eval_strategy} but there is no validation data"
    if cfg.eval_dataset:
        return TunelabError(what, where=", ".join(cfg.eval_dataset), fix="give an eval_dataset that holds records")
    if cfg.val_size <= 0:
        return TunelabError(what, where="config", fix="set val_size=0.1 (hold out 10%) or eval_dataset=path/to/val.jsonl")
    # val_size is set, yet nothing was held out: training always keeps at least one record
    # (with val_split_by=dialogue, one dialogue), so there is nothing to spare.
    unit = "dialogue" if cfg.val_split_by == "dialogue" else "record"
    return TunelabError(f"{what}: val_size={cfg.val_size:g} holds out nothing from {len(train_convs)} record(s), "
                        f"because training keeps at least one {unit}", where=", ".join(cfg.dataset),
                        fix="add records, give eval_dataset=path/to/val.jsonl, or set eval_strategy=no")


def _fold(convs: list[Conversation], cfg: TunelabConfig, tokenizer, template: str, what: str) -> list[Conversation]:
    def renders_as_prefix(short: Conversation, long: Conversation) -> bool:
        try:
            return render(long.messages, template, tokenizer, tools=long.tools).startswith(
                render(short.messages, template, tokenizer, tools=short.tools))
        except jinja2.TemplateError:  # the encoder will say what is wrong, row by row
            return False

    folded, stats = fold_dialogues(convs, cfg.train_on, renders_as_prefix)
    if stats.folded_rows:
        print(f"{what}: {stats.summary()}", file=sys.stderr)
    return folded


def encode_samples(convs: list[Conversation], tokenizer, template, cfg: TunelabConfig) -> tuple[list[Sample], int]:
    """Tokenize conversations into samples; bad ones raise, or are counted with skip_invalid.
    Samples over cutoff_len lose their oldest context first (`truncation=context`, data/truncate.py)."""
    shortened = TruncationStats()

    def encode(conv: Conversation) -> list[Sample]:
        if conv.is_plain_text:
            encoded = tokenize.encode_text(conv.messages[0].content, tokenizer, cfg.cutoff_len, source=conv.source)
        else:
            # A folded row carries its target turns as explicit flags (see data/fold.py).
            train_on = "all" if conv.meta.get("folded_rows") else cfg.train_on
            if cfg.truncation == "context":
                example, actions = encode_fitted(conv, tokenizer, template, cfg.cutoff_len, train_on)
                shortened.add(actions)
            else:
                example = tokenize.encode_conversation(conv, tokenizer, template, cfg.cutoff_len, train_on)
            encoded = [example]
        return [Sample(e.input_ids, e.labels) for e in encoded]

    samples, skipped = tokenize.encode_each(convs, encode, cfg.skip_invalid)
    if shortened.samples:
        print(shortened.summary(len(convs), cfg.cutoff_len), file=sys.stderr)
    return samples, skipped
