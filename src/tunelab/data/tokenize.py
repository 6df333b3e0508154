"""Conversations -> token ids and labels, with every non-target token masked to -100.

The conversation is rendered once with its chat template and tokenized with offsets;
each target turn's span is located in the rendered *text* by rendering prefixes
(`messages[:i]` + generation prompt, and `messages[:i+1]`). Working on text rather than
token pieces means every template, the model's own included, is masked the same way,
and the tokens seen in training are exactly those of the full render.

A label span covers what the model must generate after the generation prompt: the turn's
content and its end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, `</s>`...), never the
role header the prompt already holds (for the `hotel` template the prompt stops at
`<|im_start|>`, so the role name is learned too).

Message content is text, never control tokens: `<|im_end|>\n<|im_start|>system` typed into
a user turn is tokenized as those characters, so a client cannot forge a system turn and
training data cannot smuggle one in. Only the template's own markers become special tokens.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import re
import sys
from dataclasses import dataclass

import jinja2

from tunelab.data.templates import end_of_turn_markers, fold_system, render
from tunelab.data.types import IGNORE_INDEX, STANDARD_ROLES, Conversation, Message
from tunelab.errors import TunelabError


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the model is not trained
    source: str = ""


# --- public API ------------------------------------------------------------------------

def encode_conversation(conv: Conversation, tokenizer, template_src: str, cutoff_len: int,
                        train_on: str = "all") -> EncodedExample:
    """Token ids and labels of one conversation: labels on its target turns only
    (`train_on="last"`: the final one), truncated to `cutoff_len` tokens."""
    if conv.is_plain_text:
        raise TunelabError("a plain-text record reached the chat encoder", where=conv.source,
                           fix="use stage=pt for plain text, or give the record user/assistant turns")
    targets = _target_indices(conv, train_on)
    conv = _protect_content(conv, tokenizer)
    messages, full = _render_whole(conv, template_src, tokenizer)
    markers = end_of_turn_markers(tokenizer, template_src)
    spans, close_with_eos = _target_spans(messages, targets, full, template_src, tokenizer, conv, markers)

    enc = _tokenize_with_offsets(full, tokenizer, conv.source)
    ids = list(enc["input_ids"])
    starts = [start for start, _ in enc["offset_mapping"]]
    token_spans = [(bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)) for s, e in spans]
    if close_with_eos and tokenizer.eos_token_id is not None:
        # The template never closes a final reply (GLM): add EOS so the model learns to stop.
        ids.append(tokenizer.eos_token_id)
        last_start, _ = token_spans[-1]
        token_spans[-1] = (last_start, len(ids))
    labels = _labels(ids, token_spans)
    return _truncate(EncodedExample(ids, labels, conv.source), token_spans, cutoff_len)


def encode_text(text: str, tokenizer, cutoff_len: int, source: str = "") -> list[EncodedExample]:
    """Continued pre-training: the text (+ EOS) split into `cutoff_len` chunks, every token a label."""
    ids = list(tokenizer(text, add_special_tokens=True, split_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    chunks = [ids[i:i + cutoff_len] for i in range(0, len(ids), cutoff_len)]
    # A one-token chunk has nothing to predict (the loss shifts labels by one).
    return [EncodedExample(chunk, list(chunk), source) for chunk in chunks if len(chunk) > 1]


def encode_each(items: list, encode, skip_invalid: bool, what: str = "record(s)") -> tuple[list, int]:
    """`encode(item)` -> a list of encoded rows, for every item in order. A record that cannot be
    encoded raises its `TunelabError`, or with `skip_invalid` is left out and counted; the count
    and the first error are printed once. Returns (rows, number skipped)."""
    rows, errors = [], []
    for item in items:
        try:
            rows.extend(encode(item))
        except TunelabError as exc:
            if not skip_invalid:
                raise
            errors.append(exc)
    if errors:
        print(f"tunelab: skipped {len(errors)} of {len(items)} {what} that could not be tokenized; "
              f"first: {errors[0].message()}", file=sys.stderr)
    return rows, len(errors)


def encode_prompt(messages: list[Message], tokenizer, template_src: str, tools: list | None = None) -> list[int]:
    """Token ids of `messages` followed by the generation prompt, for evaluation and serving."""
    conv = _protect_content(Conversation(list(messages), source="prompt", tools=tools), tokenizer)
    msgs, _ = _render_whole(conv, template_src, tokenizer)
    text = render(msgs, template_src, tokenizer, add_generation_prompt=True, tools=tools)
    return list(_tokenize(text, tokenizer, offsets=False)["input_ids"])


def stop_token_ids(tokenizer, template_src: str) -> list[int]:
    """Token ids at which generation stops: the template's end-of-turn token(s), then EOS."""
    ids = [tokenizer.convert_tokens_to_ids(m) for m in end_of_turn_markers(tokenizer, template_src)]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(i for i in ids if i is not None))


# --- content is text: control tokens come from the template only ------------------------

# Well-known control strings of chat templates, for `data check` when no tokenizer is at hand.
COMMON_CONTROL_STRINGS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|eot_id|>",
                          "<|start_header_id|>", "<|end_header_id|>", "<|end|>", "<|user|>", "<|assistant|>",
                          "<|system|>", "<start_of_turn>", "<end_of_turn>", "<｜User｜>", "<｜Assistant｜>",
                          "<｜end▁of▁sentence｜>", "[INST]", "[/INST]", "<s>", "</s>")
_PLACEHOLDER = 0xF0000  # Supplementary Private Use Area-A: code points real text does not use


# Reasoning markup is part of an answer's content: templates split replies on `</think>`.
CONTENT_MARKUP = ("<think>", "</think>")


@functools.lru_cache(maxsize=16)
def control_strings(tokenizer) -> tuple[str, ...]:
    """The tokenizer's special tokens as text, longest first (so `<|im_end|>` wins over `<|im`)."""
    found = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    found |= set(getattr(tokenizer, "all_special_tokens", []))
    return tuple(sorted((s for s in found if s and s not in CONTENT_MARKUP), key=lambda s: (-len(s), s)))


def forged_control_strings(text: str, strings) -> list[str]:
    """The control strings `text` holds (they are kept as plain text, never as control tokens)."""
    return [s for s in strings if s in text]


def _protect_content(conv: Conversation, tokenizer) -> Conversation:
    """Each control string in message content replaced by same-length private-use characters,
    so the template renders around it and every offset stays put; `_tokenize` puts the text
    back and tokenizes it as plain text."""
    strings = control_strings(tokenizer)
    if not any(forged_control_strings(m.content, strings) for m in conv.messages):
        return conv
    messages = [dataclasses.replace(m, content=_mask(m.content, strings)) for m in conv.messages]
    return dataclasses.replace(conv, messages=messages)


def _mask(text: str, strings: tuple[str, ...]) -> str:
    for k, s in enumerate(strings):
        text = text.replace(s, chr(_PLACEHOLDER + k) * len(s))
    return text


def _unmask(text: str, strings: tuple[str, ...]) -> str:
    for k, s in enumerate(strings):
        text = text.replace(chr(_PLACEHOLDER + k) * len(s), s)
    return text


def _tokenize(text: str, tokenizer, offsets: bool):
    """Token ids (and character offsets) of a render whose content was masked by `_protect_content`.

    Without masked content this is the tokenizer's own call. With it, the text is cut at the
    template's control tokens (as the tokenizer itself does) and each piece in between is
    tokenized with special-token parsing off, after the content's characters are put back.
    """
    extra = {"return_offsets_mapping": True} if offsets else {}
    strings = control_strings(tokenizer)
    if not strings or not any(_PLACEHOLDER <= ord(c) < _PLACEHOLDER + len(strings) for c in text):
        return tokenizer(text, add_special_tokens=False, **extra)
    ids, spans, pos = [], [], 0
    for match in [*re.finditer("|".join(map(re.escape, strings)), text), None]:
        end = match.start() if match else len(text)
        if end > pos:
            piece = tokenizer(_unmask(text[pos:end], strings), add_special_tokens=False, split_special_tokens=True,
                              **extra)
            ids += piece["input_ids"]
            spans += [(a + pos, b + pos) for a, b in piece.get("offset_mapping", [])]
        if match:
            ids.append(tokenizer.convert_tokens_to_ids(match.group()))
            spans.append(match.span())
            pos = match.end()
    return {"input_ids": ids, "offset_mapping": spans} if offsets else {"input_ids": ids}


# --- which turns, rendered how ---------------------------------------------------------

def _target_indices(conv: Conversation, train_on: str) -> list[int]:
    targets = [i for i, m in enumerate(conv.messages) if m.is_target()]
    if not targets:
        raise TunelabError("the record has no turn to learn from (no assistant or train=true turn)",
                           where=conv.source, fix="end the conversation with an assistant turn, or drop the record")
    return targets[-1:] if train_on == "last" else targets


def _render_whole(conv: Conversation, template_src: str, tokenizer) -> tuple[list[Message], str]:
    """The messages as the template accepts them and their full render. A leading system
    prompt is folded into a user turn where the template rejects a system role (Gemma:
    the first user turn) or drops it from a finished conversation (Mistral-Nemo writes it
    only into a final user turn: the last user turn, as at inference)."""
    messages = conv.messages
    try:
        full = render(messages, template_src, tokenizer, tools=conv.tools)
    except jinja2.TemplateError as first:
        if not messages or messages[0].role != "system":
            raise _template_error(conv, first) from None
        messages = fold_system(messages, into="first")
        full = _render_or_raise(messages, template_src, tokenizer, conv)
    if _drops_system_when_finished(messages, full, template_src, tokenizer, conv):
        messages = fold_system(messages, into="last")
        full = _render_or_raise(messages, template_src, tokenizer, conv)
    for m in messages:
        # Many templates silently skip roles they do not know: losing context must not be silent.
        if m.role not in STANDARD_ROLES and m.content.strip() not in full:
            raise TunelabError(f"the chat template drops the {m.role!r} turns", where=conv.source,
                               fix="use template=hotel or template=chatml, which render any role")
    return messages, full


def _drops_system_when_finished(messages: list[Message], full: str, template_src: str, tokenizer,
                                conv: Conversation) -> bool:
    """True where the system prompt shows in a prompt that ends on a user turn but not in
    the finished conversation (Mistral-Nemo)."""
    if not messages or messages[0].role != "system" or messages[0].content.strip() in full:
        return False
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        return False
    prompt = _render_or_raise(messages[:users[-1] + 1], template_src, tokenizer, conv)
    return messages[0].content.strip() in prompt


def _render_or_raise(messages: list[Message], template_src: str, tokenizer, conv: Conversation) -> str:
    try:
        return render(messages, template_src, tokenizer, tools=conv.tools)
    except jinja2.TemplateError as exc:
        raise _template_error(conv, exc) from None


def _template_error(conv: Conversation, exc: Exception) -> TunelabError:
    roles = "/".join(m.role for m in conv.messages)
    return TunelabError(f"the chat template refuses this conversation ({exc}); roles: {roles}", where=conv.source,
                        fix="fix the record's roles, or use template=chatml which renders any sequence of roles")


# --- locating label spans in the rendered text -----------------------------------------

def _target_spans(messages: list[Message], targets: list[int], full: str, template_src: str, tokenizer,
                  conv: Conversation, markers: tuple[str, ...]) -> tuple[list[tuple[int, int]], bool]:
    """Character spans of the target turns in `full`, and whether the last one needs an
    EOS appended (templates with no closing token after the final reply)."""
    # Targets are located by position in the original messages; after folding a system
    # prompt away every index shifts by one.
    shift = len(conv.messages) - len(messages)
    spans: list[tuple[int, int]] = []
    cursor = 0
    close_with_eos = False
    for index in (t - shift for t in targets if t >= shift):
        start, end = _locate_turn(messages, index, full, template_src, tokenizer, conv, markers, cursor)
        if not any(m in full[start:end] for m in markers):
            # No closing token of its own (GLM): the next turn's role token ends the reply.
            following = next((m for m in markers if full.startswith(m, end)), None)
            if following:
                end += len(following)
            elif not full[end:].strip():
                close_with_eos = True
        spans.append((start, end))
        cursor = end
    return spans, close_with_eos


def _locate_turn(messages: list[Message], i: int, full: str, template_src: str, tokenizer,
                 conv: Conversation, markers: tuple[str, ...], cursor: int) -> tuple[int, int]:
    """Character span of target turn `i` in `full`."""
    try:
        turn_start, start, upto = _span_in_prefix(messages, i, template_src, tokenizer, conv.tools)
    except jinja2.TemplateError as exc:
        raise TunelabError(f"the chat template refuses the conversation up to turn {i + 1} ({exc})",
                           where=conv.source, fix="fix the record's roles, or use template=chatml") from None
    end = _turn_end(upto, start, markers)
    if start < 0 or end <= start:
        raise TunelabError(f"the chat template does not render turn {i + 1} ({messages[i].role!r})",
                           where=conv.source, fix="use template=hotel or template=chatml, which render any role")
    if start >= cursor and full.startswith(upto[:end]):
        return start, end  # prefix-stable: the turn sits in the full render where the prefix render put it
    return _search_turn(messages[i], full, upto[turn_start:start], upto[start:end], conv, i, cursor)


def _span_in_prefix(messages: list[Message], i: int, template_src: str, tokenizer,
                    tools) -> tuple[int, int, str]:
    """Render `messages[:i + 1]` (turn `i` last) and say where turn `i` begins in it and
    where its label begins: after the part of the generation prompt the turn repeats. The
    hotel prompt ends at `<|im_start|>`, so its role name is learned; DeepSeek-R1's prompt
    opens a `<think>` the rendered turn lacks, so the label starts after `<｜Assistant｜>`."""
    prompt = render(messages[:i], template_src, tokenizer, add_generation_prompt=True, tools=tools)
    upto = render(messages[:i + 1], template_src, tokenizer, tools=tools)
    if upto.startswith(prompt):
        return len(prompt), len(prompt), upto
    before = render(messages[:i], template_src, tokenizer, tools=tools)
    if upto.startswith(before):
        generation_prompt = prompt[len(before):] if prompt.startswith(before) else ""
        return len(before), len(before) + _common_prefix_len(generation_prompt, upto[len(before):]), upto
    # Earlier turns render differently once this turn follows them (Mistral-Nemo puts the
    # system prompt into the last user turn): the label starts at the turn's own content.
    content = _visible_content(messages[i].content)
    start = upto.rfind(content) if content else -1
    return start, start, upto


def _search_turn(message: Message, full: str, header: str, turn: str, conv: Conversation, i: int,
                 cursor: int) -> tuple[int, int]:
    """Find a turn in the full render of a template that is not prefix-stable: Mistral-Nemo
    writes the tool list before the last user turn, Qwen3 an empty `<think>` block only
    into the final reply. The turn is searched after the previous target, preceded
    by its own role header so a user turn with the same words never matches."""
    content = _visible_content(message.content)
    offset = turn.find(content) if content else -1
    bodies = [turn] + ([turn[offset:]] if offset > 0 else [])
    for body in bodies:
        found = full.find(header + body, cursor)
        if found >= 0:
            return found + len(header), found + len(header) + len(body)
    raise TunelabError(f"cannot locate turn {i + 1} ({message.role!r}) in the rendered conversation",
                       where=conv.source,
                       fix="the template rewrites this turn; use template=chatml or a template of your own")


def _visible_content(content: str) -> str:
    # Reasoning templates (Qwen3, DeepSeek-R1, GLM) drop `<think>...</think>` from earlier replies.
    return content.split("</think>")[-1].strip()


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _turn_end(upto: str, start: int, markers: tuple[str, ...]) -> int:
    """End of the label span: just after the turn's first end-of-turn marker (so Phi's
    trailing `\\n<|endoftext|>` stays out), else the render's end without trailing space."""
    found = [p + len(m) for m in markers if (p := upto.find(m, start)) >= 0]
    return min(found) if found else len(upto.rstrip())


# --- tokens and truncation -------------------------------------------------------------

def _tokenize_with_offsets(text: str, tokenizer, source: str):
    if not getattr(tokenizer, "is_fast", False):
        raise TunelabError("label masking needs a fast tokenizer (character offsets)", where=source,
                           fix="load the model's tokenizer.json (AutoTokenizer with use_fast=True)")
    # The template writes BOS itself where the model wants one: never add a second.
    return _tokenize(text, tokenizer, offsets=True)


def _labels(ids: list[int], token_spans: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    for t0, t1 in token_spans:
        labels[t0:t1] = ids[t0:t1]
    return labels


def _truncate(example: EncodedExample, token_spans: list[tuple[int, int]], cutoff_len: int) -> EncodedExample:
    """Fit `cutoff_len`: drop whole trailing turns first (keep the prompt and the beginning);
    if not even the first target fits, cut inside it; fail if no label token is left."""
    ids, labels = example.input_ids, example.labels
    if len(ids) <= cutoff_len:
        return example
    whole = [t1 for _, t1 in token_spans if t1 <= cutoff_len]
    cut = whole[-1] if whole else cutoff_len
    if all(label == IGNORE_INDEX for label in labels[:cut]):
        prompt_len = token_spans[0][0]
        raise TunelabError(f"cutoff_len={cutoff_len} is smaller than the prompt of record {example.source} "
                           f"({prompt_len} tokens)", where=example.source,
                           fix=f"raise cutoff_len above {prompt_len}, or set skip_invalid=true to drop such records")
    return EncodedExample(ids[:cut], labels[:cut], example.source)
