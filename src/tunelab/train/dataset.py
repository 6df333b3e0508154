"""From config to token samples: read, split off validation, render and mask.

Kept apart from the loop so the loop reads as a recipe and so benchmarks and
preference stages can build the same samples.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

from tunelab.config import TunelabConfig
from tunelab.data.collate import Sample
from tunelab.data.types import Conversation
from tunelab.errors import TunelabError


@dataclass
class SFTData:
    train: list[Sample]
    eval: list[Sample]
    n_train_records: int
    n_eval_records: int
    n_skipped: int = 0


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
        from tunelab.data.tools.common import first_user_turn

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
    from tunelab.data.readers import hub_options, load_conversations

    if not cfg.dataset:
        raise TunelabError("no training data given", where="config",
                           fix="set dataset: path/to/train.jsonl (or dataset=... on the command line)")
    read = dict(fmt=cfg.dataset_format, skip_invalid=cfg.skip_invalid, system_prompt=cfg.system_prompt,
                hub=hub_options(cfg))
    convs = load_conversations(cfg.dataset, max_samples=cfg.max_samples, **read)
    if cfg.eval_dataset:
        train_convs, eval_convs = convs, load_conversations(cfg.eval_dataset, **read)
    else:
        train_convs, eval_convs = split_validation(convs, cfg.val_size, cfg.seed, cfg.val_split_by)
    return train_convs, eval_convs, getattr(convs, "skipped", 0)


def load_sft_data(cfg: TunelabConfig, tokenizer) -> SFTData:
    from tunelab.data.templates import lock_template

    train_convs, eval_convs, n_skipped = read_conversations(cfg)
    if cfg.eval_strategy != "no" and not eval_convs:
        raise TunelabError(f"eval_strategy={cfg.eval_strategy} but there is no validation data", where="config",
                           fix="set val_size=0.1 (hold out 10%) or eval_dataset=path/to/val.jsonl")
    n_train_records, n_eval_records = len(train_convs), len(eval_convs)
    # The tokenizer saved with the weights carries this template (and the system prompt).
    template = None if cfg.stage == "pt" else lock_template(tokenizer, cfg.template, cfg.system_prompt)
    if cfg.fold_dialogues and cfg.stage == "sft":
        # After the split, each side on its own: a validation row is never folded into a training one.
        train_convs = _fold(train_convs, cfg, tokenizer, template, "training")
        eval_convs = _fold(eval_convs, cfg, tokenizer, template, "validation")
    train, skipped = encode_samples(train_convs, tokenizer, template, cfg)
    evals, skipped_eval = encode_samples(eval_convs, tokenizer, template, cfg)
    if not train:
        raise TunelabError("no training sample is left after tokenization", where=", ".join(cfg.dataset),
                           fix="check the data with `tunelab data check`, or raise cutoff_len")
    return SFTData(train, evals, n_train_records, n_eval_records, n_skipped + skipped + skipped_eval)


def _fold(convs: list[Conversation], cfg: TunelabConfig, tokenizer, template: str, what: str) -> list[Conversation]:
    import jinja2

    from tunelab.data.fold import fold_dialogues
    from tunelab.data.templates import render

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
    from tunelab.data import tokenize
    from tunelab.data.truncate import TruncationStats, encode_fitted

    samples, errors, shortened = [], [], TruncationStats()
    for conv in convs:
        try:
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
        except TunelabError as exc:
            if not cfg.skip_invalid:
                raise
            errors.append(exc)
            continue
        samples.extend(Sample(e.input_ids, e.labels) for e in encoded)
    if shortened.samples:
        print(shortened.summary(len(convs), cfg.cutoff_len), file=sys.stderr)
    if errors:
        print(f"skipped {len(errors)} record(s) that could not be tokenized; first: {errors[0].message()}",
              file=sys.stderr)
    return samples, len(errors)
