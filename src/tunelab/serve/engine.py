"""One loaded model for `tunelab chat` and `tunelab serve`: base, adapters, template, limits.

Several LoRA adapters share one copy of the base weights (PEFT keeps each adapter's A/B
beside the base layers); a request picks one by name, or the base with adapters off.
Adapter selection is model-wide state, so callers must not interleave two requests'
generation steps: the server serialises them, the chat has only one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.data.templates import render, resolve_template
from tunelab.data.tokenize import _render_whole, encode_prompt, stop_token_ids
from tunelab.data.types import Conversation, Message
from tunelab.errors import TunelabError
from tunelab.model.adapters import load_adapter, read_adapter_config
from tunelab.model.generate import generate_batch, stream_generate
from tunelab.model.loader import load_model, load_tokenizer


@dataclass
class Engine:
    model: object  # a PreTrainedModel, or a PeftModel holding every adapter
    tokenizer: object
    template_src: str
    stop_ids: list[int]
    context_length: int
    base_name: str
    adapters: dict[str, Path] = field(default_factory=dict)  # the names clients use -> folders
    internal_names: dict[str, str] = field(default_factory=dict)  # client name -> PEFT adapter name

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def encode(self, messages: Sequence[Message]) -> list[int]:
        """Prompt ids of a conversation; text inside a message never becomes a special token."""
        return encode_prompt_untrusted(list(messages), self.tokenizer, self.template_src)

    def encode_text(self, text: str) -> list[int]:
        """A raw `/v1/completions` prompt: the client writes the whole prompt, special tokens included."""
        return list(self.tokenizer(text)["input_ids"])

    def uses_dora(self) -> bool:
        return any(read_adapter_config(folder).get("use_dora") for folder in self.adapters.values())

    def room_for(self, prompt_tokens: int) -> int:
        """How many tokens may still be generated after a prompt of this length."""
        return self.context_length - prompt_tokens

    @contextlib.contextmanager
    def using(self, name: str | None):
        """Run with adapter `name` active, or with adapters off for the base (None or base_name)."""
        if name not in (None, self.base_name) and name not in self.adapters:
            raise TunelabError(f"no model named {name!r}", where="model",
                               fix=f"use one of: {', '.join(self.model_names())}")
        if not self.adapters:
            yield
        elif name in (None, self.base_name):
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(self.internal_names[name])
            yield

    def generate(self, prompt_ids: Sequence[int], options, n: int = 1, adapter: str | None = None):
        """`n` completions of one prompt, batched (list of `Generation`)."""
        with self.using(adapter):
            return generate_batch(self.model, self.tokenizer, [list(prompt_ids)] * n, options,
                                  stop_ids=self.stop_ids, batch_size=n, progress=False)

    def stream(self, prompt_ids: Sequence[int], options, adapter: str | None = None) -> Iterator[str]:
        """Text deltas of one completion; the adapter stays active until the stream is closed."""
        with self.using(adapter):
            yield from stream_generate(self.model, self.tokenizer, list(prompt_ids), options, stop_ids=self.stop_ids)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt_untrusted(messages: list[Message], tokenizer, template_src: str) -> list[int]:
    """`data.tokenize.encode_prompt` for content a client wrote: a `<|im_end|>` typed into a
    message stays text, so no one can forge a turn (a system prompt) from inside a message.

    Content without any special-token string (nearly all) is encoded by `encode_prompt` itself,
    so the served prompt is token for token the one `tunelab eval` scores. Otherwise the
    rendered prompt is tokenized piecewise: the template's own text with special tokens,
    each message's content without.
    """
    specials = [t for t in tokenizer.all_special_tokens + list(getattr(tokenizer, "added_tokens_encoder", {})) if t]
    if not any(s in m.content for m in messages for s in specials):
        return encode_prompt(messages, tokenizer, template_src)
    folded, _ = _render_whole(Conversation(list(messages), source="prompt"), template_src, tokenizer)
    text = render(folded, template_src, tokenizer, add_generation_prompt=True)
    ids, cursor = [], 0
    for message in folded:
        start = text.find(message.content, cursor) if message.content else -1
        if start < 0:
            continue  # the template rewrote or dropped it: its text is the template's own below
        ids += tokenizer(text[cursor:start], add_special_tokens=False)["input_ids"]
        end = start + len(message.content)
        ids += tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        cursor = end
    return ids + tokenizer(text[cursor:], add_special_tokens=False)["input_ids"]


def parse_adapters(specs: Sequence[str]) -> dict[str, Path]:
    """`name=path` (or a bare path, named after its folder) -> {name: folder}, each checked."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else (None, "", spec)
        folder = Path(path).expanduser()
        name = name or folder.name
        if name in adapters:
            raise TunelabError(f"two adapters are named {name!r}", where=f"--adapter {spec}",
                               fix="name each adapter: --adapter support=runs/a --adapter sales=runs/b")
        read_adapter_config(folder)  # a missing or wrong folder fails here, before any model loads
        adapters[name] = folder
    return adapters


def load_engine(model: str, adapters: dict[str, Path] | None = None, *, template: str = "auto",
                quantization_bit: int | None = None, device: str = "auto", dtype: str = "auto",
                context_length: int | None = None) -> Engine:
    """Load the base once and every adapter onto it; ready to encode and generate."""
    adapters = dict(adapters or {})
    tokenizer = load_tokenizer(model)
    template_src = resolve_template(template, tokenizer)
    base = load_model(model, dtype=dtype, device=device, quantization_bit=quantization_bit)
    loaded, internal = base, {}
    for i, (name, folder) in enumerate(adapters.items()):
        # PEFT names the first adapter "default"; later ones get a slot name of our own,
        # so a user's adapter may be called anything, "default" included.
        internal[name] = "default" if i == 0 else f"adapter_{i}"
        if i == 0:
            loaded = load_adapter(base, folder)  # checks that the adapter fits this base
        else:
            _add_adapter(loaded, folder, internal[name])
    loaded.eval()
    return Engine(model=loaded, tokenizer=tokenizer, template_src=template_src,
                  stop_ids=stop_token_ids(tokenizer, template_src),
                  context_length=context_length or model_context_length(base, tokenizer),
                  base_name=model_display_name(model), adapters=adapters, internal_names=internal)


def _add_adapter(peft_model, folder: Path, slot: str) -> None:
    try:
        peft_model.load_adapter(str(folder), adapter_name=slot)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunelabError(f"the adapter does not fit the base model ({first})", where=str(folder),
                           fix="serve each adapter with the base model it was trained on") from None


def model_display_name(model: str) -> str:
    """What clients call the base in the `model` field: the alias, hub id or folder name."""
    path = Path(model).expanduser()
    return path.name if path.exists() else model


def model_context_length(model, tokenizer) -> int:
    """The positions the model was trained for; a tokenizer's smaller limit wins when it is set."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(config, "max_position_embeddings", None) or 2048
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < limit:
        limit = tokenizer_limit
    return int(limit)
