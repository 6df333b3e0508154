"""From config to token samples: read, split off validation, render and mask.

Kept apart from the loop so the loop reads as a recipe and so benchmarks and
preference stages can build the same samples.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

import jinja2

from tunelab.config import TOKEN_STAGES, TunelabConfig
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
    mixture: dict | None = None  # what each source gave (RUN_DIR/data_mixture.json)


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


@dataclass
class TrainingData:
    train: list
    eval: list
    skipped: int  # records dropped as invalid (skip_invalid)
    mixture: dict  # what each source gave (RUN_DIR/data_mixture.json)


def read_training_data(cfg: TunelabConfig, load=None, log: bool = True) -> TrainingData:
    """Training and validation items as the config says: each `dataset` source read, `max_samples`
    drawn, validation split off (before mixing: a held-out row is never trained on, even repeated),
    then the mixture drawn (data/mixture.py) and the `replay` rows added.

    `load(paths, limit) -> (items, skipped)` reads files (default: conversations); the preference
    stages pass their own."""
    from tunelab.config import mix_strategy
    from tunelab.data import mixture

    if not cfg.dataset:
        raise TunelabError("no training data given", where="config",
                           fix="set dataset: path/to/train.jsonl (or dataset=... on the command line)")
    load = load or (lambda paths, limit: _load_conversations(paths, cfg, limit))
    sources, strategy = cfg.dataset_sources, mix_strategy(cfg)
    head = cfg.max_samples if cfg.max_samples_strategy == "head" else None
    parts, skipped = [], 0
    for source in sources:
        remaining = None if head is None else head - sum(map(len, parts))
        items, n_skipped = load([source.path], remaining) if remaining is None or remaining > 0 else ([], 0)
        parts.append(list(items))
        skipped += n_skipped
    if cfg.max_samples is not None and cfg.max_samples_strategy == "random":
        parts = _regroup(mixture.subsample(_flat(parts), cfg.max_samples, cfg.seed), len(parts))
    if cfg.eval_dataset:
        evals, n_skipped = load(cfg.eval_dataset, None)
        skipped += n_skipped
    else:
        kept, evals = split_validation([item for _, item in _flat(parts)], cfg.val_size, cfg.seed, cfg.val_split_by)
        kept_ids = {id(item) for item in kept}
        parts = [[item for item in part if id(item) in kept_ids] for part in parts]
    train, takes = mixture.mix(parts, sources, strategy, cfg.seed)
    replay = None
    if cfg.replay_spec is not None:
        rows, replay = replay_rows(cfg)
        train = train + rows
    if log and (strategy != "concat" or replay or any(t.taken != t.available for t in takes)):
        for take in takes + ([replay] if replay else []):
            print(f"data mixture ({strategy}): {take.describe()}", file=sys.stderr)
    return TrainingData(train, list(evals), skipped, mixture.report(takes, strategy, replay))


def _load_conversations(paths, cfg: TunelabConfig, limit: int | None) -> tuple[list, int]:
    from tunelab.data.readers import hub_options

    loaded = load_conversations(paths, cfg.dataset_format, skip_invalid=cfg.skip_invalid, max_samples=limit,
                                system_prompt=cfg.system_prompt, dataset_dir=cfg.dataset_dir, hub=hub_options(cfg))
    return loaded, loaded.skipped


def _flat(parts: list[list]) -> list[tuple[int, object]]:
    return [(i, item) for i, part in enumerate(parts) for item in part]


def _regroup(flat: list[tuple[int, object]], n_parts: int) -> list[list]:
    parts = [[] for _ in range(n_parts)]
    for i, item in flat:
        parts[i].append(item)
    return parts


def replay_rows(cfg: TunelabConfig):
    """This stage's share of an earlier stage's data: `fraction` of its rows or `samples` of them,
    drawn with their own seed so the replayed rows do not depend on this stage's mixture."""
    from tunelab.data.mixture import SourceTake, draw

    spec = cfg.replay_spec
    rows, _ = earlier_conversations(spec.data, spec.split, "replay")
    n = spec.samples if spec.samples is not None else max(1, round(spec.fraction * len(rows)))
    taken, repeated = draw(rows, n, random.Random(cfg.seed + 1))
    label = f"{spec.data} (replay, {spec.split})"
    return taken, SourceTake(label, len(rows), len(taken), None, repeated, spec.fraction)


def earlier_conversations(ref: str, split: str, key: str) -> tuple[list[Conversation], TunelabConfig | None]:
    """Conversations of a file, or of an earlier run folder: its training rows (its mixture and
    replay included) or its held-out validation rows, rebuilt from its config.yaml (seeded, so
    exactly the rows it used). The run's config comes too (None for a file)."""
    from pathlib import Path

    from tunelab.config import load_config

    path = Path(ref)
    if not path.exists():
        raise TunelabError(f"{ref} does not exist", where=key,
                           fix="give a data file or the folder of an earlier tunelab run")
    if not path.is_dir():
        return load_conversations(path), None
    if not (path / "config.yaml").is_file():
        raise TunelabError(f"{ref} is a folder without config.yaml, not a tunelab run", where=key,
                           fix="give the output_dir of an earlier `tunelab train`, or a data file")
    earlier = load_config(path / "config.yaml")
    if earlier.stage not in TOKEN_STAGES:
        raise TunelabError(f"{ref} was a {earlier.stage} run: its data are preference pairs, not conversations",
                           where=key, fix="name an sft or pt run, or a conversation file")
    data = read_training_data(earlier, log=False)
    rows = data.train if split == "train" else data.eval
    if not rows:
        raise TunelabError(f"{ref} has no {split} rows", where=key,
                           fix="use split: train, or an earlier run that held out validation data (val_size)")
    return rows, earlier


def read_conversations(cfg: TunelabConfig) -> tuple[list[Conversation], list[Conversation], int]:
    """(train, validation) conversations as the config says, unfolded, and how many records
    were skipped as invalid. The task-metric evaluation during training reads the same split."""
    data = read_training_data(cfg, log=False)
    return data.train, data.eval, data.skipped


def load_sft_data(cfg: TunelabConfig, tokenizer, chat: bool = True) -> SFTData:
    """Samples of an sft run (`chat`: rendered with the chat template, dialogues folded as the
    config says) or of continued pre-training (`chat=False`: plain text, no template)."""

    data = read_training_data(cfg)
    train_convs, eval_convs = data.train, data.eval
    if cfg.eval_strategy != "no" and not eval_convs:
        raise no_validation_data(cfg, train_convs)
    # The tokenizer saved with the weights carries this template (and the system prompt).
    template = lock_template(tokenizer, cfg.template, cfg.system_prompt) if chat else None
    # After the split, each side folded on its own: a validation row is never folded into a training one.
    # A training sequence holds at most one optimizer step's rows: batches count rows (collate.batch_order).
    train, _ = encode_side(train_convs, tokenizer, template, cfg, "training",
                           max_rows=cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps)
    evals, _ = encode_side(eval_convs, tokenizer, template, cfg, "validation")
    if not train:
        raise TunelabError("no training sample is left after tokenization", where=", ".join(cfg.dataset_paths),
                           fix="check the data with `tunelab data check`, or raise cutoff_len")
    return SFTData(train, evals, data.mixture)


def encode_side(convs: list[Conversation], tokenizer, template, cfg: TunelabConfig, what: str,
                max_rows: int | None = None) -> tuple[list, int]:
    """One side of the data (training, validation, an eval set) folded (chat data, unless
    fold_dialogues=false) and tokenized; a folded sequence holds at most `max_rows` rows."""
    if cfg.fold_dialogues is not False and template is not None:
        convs = _fold(convs, cfg, tokenizer, template, what, max_rows)
    return encode_samples(convs, tokenizer, template, cfg)


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
                        f"because training keeps at least one {unit}", where=", ".join(cfg.dataset_paths),
                        fix="add records, give eval_dataset=path/to/val.jsonl, or set eval_strategy=no")


def _fold(convs: list[Conversation], cfg: TunelabConfig, tokenizer, template: str, what: str,
          max_rows: int | None = None) -> list[Conversation]:
    def renders_as_prefix(short: Conversation, long: Conversation) -> bool:
        try:
            return render(long.messages, template, tokenizer, tools=long.tools).startswith(
                render(short.messages, template, tokenizer, tools=short.tools))
        except jinja2.TemplateError:  # the encoder will say what is wrong, row by row
            return False

    folded, stats = fold_dialogues(convs, cfg.train_on, renders_as_prefix, max_rows)
    if stats.folded_rows:
        print(f"{what}: {stats.summary()}", file=sys.stderr)
    return folded


def encode_samples(convs: list[Conversation], tokenizer, template, cfg: TunelabConfig) -> tuple[list[Sample], int]:
    """Tokenize conversations into samples; bad ones raise, or are counted with skip_invalid.
    Samples over cutoff_len lose their oldest context first (`truncation=context`, data/truncate.py)."""
    shortened = TruncationStats()
    samples, skipped = tokenize.encode_each(convs, sample_encoder(tokenizer, template, cfg, shortened), cfg.skip_invalid)
    if shortened.samples:
        print(shortened.summary(len(convs), cfg.cutoff_len), file=sys.stderr)
    return samples, skipped


def sample_encoder(tokenizer, template, cfg: TunelabConfig, shortened: TruncationStats):
    """`encode(conversation) -> [Sample]`: plain text in `cutoff_len` chunks, a conversation rendered
    and masked (shortened as `truncation` says, counted into `shortened`)."""

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
        return [Sample(e.input_ids, e.labels, rows=conv.meta.get("folded_rows", 1)) for e in encoded]

    return encode
