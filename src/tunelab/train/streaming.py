"""Continued pre-training on a corpus larger than memory (`stage: pt`, `streaming: true`).

`BlockStream` reads the `dataset` records only as the loop asks for them (local JSONL / JSON /
Parquet / CSV files through data/readers.py, `org/name` through HF datasets' streaming mode),
tokenizes each (text + EOS in `cutoff_len` chunks, as `stage: pt` always does) and, with
`packing`, packs the chunks in arrival order into blocks of at most `cutoff_len` tokens
(attention restarts at every document). Only the current step's blocks are in memory.

- Order: the corpus's own, nothing is shuffled (shuffle the corpus beforehand).
- Validation: the first `val_size` records (a count) are held out and never trained on; or `eval_dataset`.
- Length: unknown, so `max_steps` says when to stop; the end of the stream ends an epoch and
  the next one reads it again from the start.
- Resume: the stream is read again and the blocks already trained on are skipped
  (`TrainerState.batch_in_epoch` micro-batches of `per_device_train_batch_size` blocks): the
  resumed run trains on exactly the blocks the uninterrupted one would, for the price of
  tokenizing the skipped ones again.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator

from tunelab.config import TunelabConfig, mix_strategy
from tunelab.data.collate import Sample, pack_in_order
from tunelab.data.readers import hub_options, iter_conversations, load_conversations
from tunelab.data.truncate import TruncationStats
from tunelab.data.types import Conversation
from tunelab.errors import TunelabError
from tunelab.train.dataset import sample_encoder


class BlockStream:
    """The training blocks of a streamed corpus, read again from the start at each `blocks()`."""

    def __init__(self, cfg: TunelabConfig, tokenizer):
        check_streaming(cfg)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.held_out = 0 if cfg.eval_dataset else int(cfg.val_size)  # records at the start kept for validation

    def records(self) -> Iterator[Conversation]:
        cfg = self.cfg
        convs = iter_conversations(cfg.dataset_paths, cfg.dataset_format, skip_invalid=cfg.skip_invalid,
                                   system_prompt=cfg.system_prompt, dataset_dir=cfg.dataset_dir,
                                   hub=hub_options(cfg))
        return itertools.islice(convs, cfg.max_samples)  # max_samples: the first N records (None: all)

    def samples(self, convs: Iterable[Conversation]) -> Iterator[Sample]:
        """Each record's `cutoff_len` chunks; a record that cannot be tokenized raises, or is left out
        with skip_invalid."""
        encode = sample_encoder(self.tokenizer, None, self.cfg, TruncationStats())
        for conv in convs:
            try:
                yield from encode(conv)
            except TunelabError:
                if not self.cfg.skip_invalid:
                    raise

    def blocks(self, skip: int = 0) -> Iterator[Sample]:
        """The training rows in stream order, after the held-out records and the first `skip` rows."""
        samples = self.samples(itertools.islice(self.records(), self.held_out, None))
        rows = pack_in_order(samples, self.cfg.cutoff_len) if self.cfg.packing else samples
        return itertools.islice(rows, skip, None)

    def validation(self) -> list[Sample]:
        cfg = self.cfg
        if cfg.eval_dataset:
            convs = load_conversations(cfg.eval_dataset, cfg.dataset_format, skip_invalid=cfg.skip_invalid,
                                       system_prompt=cfg.system_prompt, dataset_dir=cfg.dataset_dir)
        else:
            convs = list(itertools.islice(self.records(), self.held_out))
        rows = list(self.samples(convs))
        if cfg.eval_strategy != "no" and not rows:
            raise TunelabError(f"eval_strategy={cfg.eval_strategy} but the stream gives no validation data",
                               where=", ".join(cfg.dataset_paths),
                               fix="set val_size=N (the stream's first N records are held out) or "
                                   "eval_dataset=path/to/val.jsonl, or eval_strategy=no")
        source = "eval_dataset" if cfg.eval_dataset else f"the stream's first {len(convs)} records"
        print(f"streaming {', '.join(cfg.dataset_paths)}: training {'blocks' if cfg.packing else 'chunks'} are "
              f"read as the steps need them" + (f"; {len(rows)} validation samples from {source}" if rows else ""),
              file=sys.stderr)
        return rows


def check_streaming(cfg: TunelabConfig) -> None:
    """Refuse what needs the whole corpus in memory (its length, a share of it, a random draw, a
    sort, a mixture)."""
    def refuse(what: str, fix: str) -> None:
        raise TunelabError(f"streaming=true reads the corpus once, in order: {what}", where="config", fix=fix)

    if cfg.max_steps <= 0:  # config.validate says so first; kept here for a config built without it
        refuse("its length is unknown", "set max_steps=N")
    if 0 < cfg.val_size < 1 and not cfg.eval_dataset:
        refuse(f"val_size={cfg.val_size:g} is a fraction of a corpus whose size it does not know",
               "give a count (val_size=200 holds out the first 200 records) or eval_dataset=path/to/val.jsonl")
    if cfg.max_samples is not None and cfg.max_samples_strategy != "head":
        refuse("max_samples cannot be a random draw", "set max_samples_strategy=head (the first N records)")
    if cfg.group_by_length:
        refuse("group_by_length=true would sort it by length", "drop group_by_length (blocks are cutoff_len long)")
    if mix_strategy(cfg) != "concat" or cfg.replay is not None:
        refuse("a weighted mixture or replay needs every source's rows",
               "list the files to read one after another (no weights, no replay), or set streaming=false")
