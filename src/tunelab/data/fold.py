"""Dialogue folding: rows that are prefixes of one dialogue become one sequence.

Many chat data sets (the hotel set among them) store each turn of a dialogue as its own
row holding the whole prefix: row k = turns 1..k, trained on turn k. Training on every
row recomputes the shared prefix once per row. Folding keeps only the longest row of each
chain and marks, in it, every turn that some absorbed row trained on: the same target
tokens after the same preceding tokens (a causal model sees nothing after a position, and
the absorbed row's tokens are exactly the first tokens of the longer one), so the loss
terms are the same, computed once.

A row is absorbed into a longer row when its messages (role and content), tools and
system prompt are the longer row's first messages. Identical rows are not folded into
each other or into the same longer row: each keeps its own loss term, as without folding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tunelab.data.types import Conversation, Message


@dataclass
class FoldStats:
    rows: int  # conversations in
    sequences: int  # conversations out
    folded_rows: int  # rows absorbed into a longer row of their dialogue

    def summary(self) -> str:
        return (f"folded {self.folded_rows} dialogue-prefix rows into longer rows of their dialogue: "
                f"{self.rows} rows -> {self.sequences} sequences (fold_dialogues=false turns this off)")


def _turn_key(m: Message) -> tuple[str, str]:
    return m.role, m.content


def prefix_keys(conv: Conversation) -> list[int]:
    """Hash of messages[:k] for every k = 1..n (role and content; tools included), built
    incrementally: equal keys = equal prefixes (the leakage check uses them too)."""
    h = hash(repr(conv.tools))
    keys = []
    for m in conv.messages:
        h = hash((h, _turn_key(m)))
        keys.append(h)
    return keys


def _is_prefix(short: Conversation, long: Conversation) -> bool:
    n = len(short.messages)
    return (short.tools == long.tools and n < len(long.messages)
            and all(_turn_key(a) == _turn_key(b) for a, b in zip(short.messages, long.messages[:n])))


def _targets(conv: Conversation, train_on: str) -> list[int]:
    targets = [i for i, m in enumerate(conv.messages) if m.is_target()]
    return targets[-1:] if train_on == "last" else targets


def fold_dialogues(convs: list[Conversation], train_on: str = "all",
                   renders_as_prefix: Callable[[Conversation, Conversation], bool] | None = None,
                   max_rows: int | None = None) -> tuple[list[Conversation], FoldStats]:
    """Fold rows that are strict prefixes of a longer row into it.

    `renders_as_prefix(short, long)`, when given, must also hold: the short row's rendered
    text begins the long row's. Chat templates that render a turn differently once others
    follow it (Qwen3 and DeepSeek-R1 drop the reasoning of earlier replies) fail it, and
    their rows are then trained one by one, as they would be without folding.

    `max_rows`: a sequence holds at most this many rows (training: the rows of one optimizer
    step, so batches can still count rows, collate.batch_order); a longer dialogue folds into
    several sequences, the rows nearest its end into the longest.

    Returns the conversations (folded ones with explicit `train` flags on each turn, to be
    encoded with `train_on="all"`, and `meta["folded_rows"]` = how many rows they hold;
    untouched rows as they were, in their original order) and the counts.
    """
    chat = [i for i, c in enumerate(convs) if not c.is_plain_text and c.messages]
    keys = {i: prefix_keys(convs[i]) for i in chat}
    by_full_key: dict[int, list[int]] = {}
    for i in chat:
        by_full_key.setdefault(keys[i][-1], []).append(i)

    # Longest rows first: each prefix row joins the longest row it begins (the first found).
    absorbed: dict[int, list[int]] = {}  # leaf -> rows folded into it
    owner: dict[int, int] = {}
    for leaf in sorted(chat, key=lambda i: (-len(convs[i].messages), i)):
        if leaf in owner:
            continue
        found = []
        for key in keys[leaf][:-1]:
            # At most one row per prefix: a duplicate row stays a sequence of its own, so its
            # loss term is still counted twice, as without folding.
            row = next((r for r in by_full_key.get(key, ())
                        if r not in owner and r != leaf and _is_prefix(convs[r], convs[leaf])
                        and (renders_as_prefix is None or renders_as_prefix(convs[r], convs[leaf]))), None)
            if row is not None:
                found.append(row)
        # The rows nearest the leaf join it; those over max_rows stay free: a shorter leaf
        # later in this loop (the longest of them) takes them.
        keep = len(found) if max_rows is None else max(max_rows - 1, 0)
        for row in found[max(len(found) - keep, 0):]:
            owner[row] = leaf
            absorbed.setdefault(leaf, []).append(row)

    out = []
    for i, conv in enumerate(convs):
        if i in owner:
            continue
        out.append(_fold(conv, [convs[r] for r in absorbed[i]], train_on) if i in absorbed else conv)
    return out, FoldStats(len(convs), len(out), len(owner))


def _fold(leaf: Conversation, rows: list[Conversation], train_on: str) -> Conversation:
    """The leaf row with every absorbed row's target turns marked as targets too."""
    targets = set(_targets(leaf, train_on))
    for row in rows:
        targets.update(_targets(row, train_on))
    messages = [Message(m.role, m.content, train=i in targets) for i, m in enumerate(leaf.messages)]
    meta = dict(leaf.meta, folded_rows=len(rows) + 1)
    return Conversation(messages, source=leaf.source, tools=leaf.tools, meta=meta)
