"""Token counts of records as training sees them: rendered with the chat template and
truncated with the training rule (`tunelab.data.tokenize`), plus content lengths per role."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.data.types import IGNORE_INDEX, Conversation, Item, Message, PreferencePair
from tunelab.errors import TunelabError


@dataclass
class RecordTokens:
    """One training sequence (a conversation, or one side of a preference pair)."""

    role_lengths: list[tuple[str, int]]  # (role, content tokens) of each turn
    total: int  # tokens of the whole rendered sequence
    targets: int  # label tokens before truncation
    cut_targets: int  # label tokens truncation at cutoff_len removes


@dataclass
class TokenCounter:
    tokenizer: object
    template: str = "auto"  # a name, .jinja path or "auto" (the tokenizer's own)
    cutoff_len: int = 2048
    _template_src: str | None = field(default=None, init=False)

    def template_src(self) -> str:
        if self._template_src is None:
            from tunelab.data.templates import resolve_template

            self._template_src = resolve_template(self.template, self.tokenizer)
        return self._template_src

    def count(self, item: Item) -> list[RecordTokens]:
        """Token counts of each sequence `item` trains on; TunelabError if it cannot be encoded."""
        return [self._count(conv) for conv in sequences(item)]

    def _count(self, conv: Conversation) -> RecordTokens:
        lengths = [len(ids) for ids in self.tokenizer([m.content for m in conv.messages], add_special_tokens=False,
                                                      split_special_tokens=True)["input_ids"]]
        role_lengths = [(m.role, n) for m, n in zip(conv.messages, lengths)]
        if conv.is_plain_text:
            # Pre-training text is cut into cutoff_len chunks: nothing is lost.
            return RecordTokens(role_lengths, lengths[0], lengths[0], 0)
        from tunelab.data.tokenize import encode_conversation

        full = encode_conversation(conv, self.tokenizer, self.template_src(), cutoff_len=2**31)
        targets = sum(label != IGNORE_INDEX for label in full.labels)
        cut = 0
        if len(full.input_ids) > self.cutoff_len:
            from tunelab.data.truncate import encode_fitted

            try:  # training's default truncation (oldest tool results and turns go first)
                kept, _ = encode_fitted(conv, self.tokenizer, self.template_src(), self.cutoff_len)
                cut = targets - sum(label != IGNORE_INDEX for label in kept.labels)
            except TunelabError:  # not even the prompt fits: training drops the whole record
                cut = targets
        return RecordTokens(role_lengths, len(full.input_ids), targets, cut)


def sequences(item: Item) -> list[Conversation]:
    """The sequences a record trains on: a pair gives prompt+chosen and prompt+rejected,
    each trained on its final answer only (as the preference losses do)."""
    if isinstance(item, Conversation):
        return [item]
    answers = [item.chosen, item.rejected] if isinstance(item, PreferencePair) else [item.completion]
    prompt = [Message(m.role, m.content, train=False) for m in item.prompt]
    return [Conversation([*prompt, Message(a.role, a.content, train=True)], source=item.source) for a in answers]
