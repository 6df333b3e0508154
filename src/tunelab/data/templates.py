"""Chat templates: which Jinja source renders a conversation, and rendering it as HF does.

A template is plain Jinja source, exactly what a tokenizer's `chat_template` holds, so a
model's own template, a built-in one and a user's `.jinja` file all behave the same.
Built-ins live in `tunelab/templates/*.jinja`: `chatml`, `hotel`, and verbatim copies of
the families' own templates for checkpoints (base models, GGUF vocabularies) that ship
without one.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import jinja2
from transformers.utils.chat_template_utils import render_jinja_template

from tunelab.data.types import Message
from tunelab.errors import TunelabError, nearest

BUILTIN_DIR = resources.files("tunelab") / "templates"

# Text of the probe conversation used to learn how a template closes a turn. Plain words
# that no template adds or strips, so they can be found again in the render.
_PROBE_USER, _PROBE_REPLY, _PROBE_NEXT = "probe question", "probe answer", "probe follow-up"


def builtin_templates() -> list[str]:
    """Names accepted by `template=NAME`, e.g. chatml, hotel, llama3, qwen2.5."""
    return sorted(p.name.removesuffix(".jinja") for p in BUILTIN_DIR.iterdir() if p.name.endswith(".jinja"))


def resolve_template(template: str, tokenizer) -> str:
    """Jinja source for `template`: "auto" (the tokenizer's own), a built-in name, a
    `.jinja` path, or Jinja source itself (anything containing `{{` or `{%`)."""
    if template == "auto":
        return _tokenizer_template(tokenizer)
    if "{{" in template or "{%" in template:
        return template
    builtin = BUILTIN_DIR / f"{template}.jinja"
    if builtin.is_file():
        return builtin.read_text(encoding="utf-8")
    path = Path(template).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if template.endswith(".jinja") or "/" in template:
        raise TunelabError(f"template file {template} does not exist", where=f"template={template}",
                           fix="give the path of a .jinja file, or a built-in name: " + ", ".join(builtin_templates()))
    hint = nearest(template, builtin_templates())
    raise TunelabError(f"unknown template {template!r}", where=f"template={template}",
                       fix=(f"did you mean template={hint}? " if hint else "")
                       + "built-ins: " + ", ".join(builtin_templates()) + "; or a path to a .jinja file")


def _tokenizer_template(tokenizer) -> str:
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # several named templates: the default one is the chat template
        source = source.get("default")
    if not source:
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise TunelabError(f"the tokenizer of {name} has no chat template", where="template=auto",
                           fix="set template=chatml (or another built-in: " + ", ".join(builtin_templates())
                           + ") or template=path/to/template.jinja")
    return source


def as_dicts(messages: list[Message] | list[dict]) -> list[dict]:
    """Messages as the dicts a Jinja chat template expects."""
    return [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]


def render(messages: list[Message] | list[dict], template_src: str, tokenizer,
           add_generation_prompt: bool = False, tools: list | None = None, **template_kwargs) -> str:
    """The conversation as text, exactly as `tokenizer.apply_chat_template(tokenize=False)`
    renders it (same Jinja environment, the tokenizer's special tokens passed in).

    Raises `jinja2.TemplateError` when the template refuses the messages (callers turn
    that into a `TunelabError` naming the record)."""
    kwargs = {**tokenizer.special_tokens_map, **template_kwargs}
    # Called directly rather than through apply_chat_template so that an empty prefix
    # (the prompt before a conversation's first turn) renders instead of raising.
    rendered, _ = render_jinja_template(conversations=[as_dicts(messages)], tools=tools, chat_template=template_src,
                                        add_generation_prompt=add_generation_prompt, **kwargs)
    return rendered[0]


def fold_system(messages: list[Message], into: str = "first") -> list[Message]:
    """Merge a leading system message into the first user turn (as LLaMA-Factory does for
    templates that reject a system role, such as Gemma's) or the last one (where Mistral
    puts it at inference, for templates that drop it from a finished conversation)."""
    if not messages or messages[0].role != "system":
        return messages
    system, rest = messages[0], list(messages[1:])
    users = [i for i, m in enumerate(rest) if m.role == "user"]
    if not users:
        return [Message("user", system.content, system.train)] + rest
    i = users[0] if into == "first" else users[-1]
    rest[i] = Message("user", f"{system.content}\n\n{rest[i].content}", rest[i].train)
    return rest


def end_of_turn_markers(tokenizer, template_src: str) -> tuple[str, ...]:
    """The special token(s) with which this template ends an assistant turn, e.g.
    `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`; GLM's `<|user|>` (it has no closing
    token: the next role header ends the reply). Learned from rendering a probe chat."""
    return _end_markers(tokenizer, template_src)


@functools.lru_cache(maxsize=64)
def _end_markers(tokenizer, template_src: str) -> tuple[str, ...]:
    probe = [Message("user", _PROBE_USER), Message("assistant", _PROBE_REPLY), Message("user", _PROBE_NEXT)]
    try:
        text = render(probe, template_src, tokenizer)
    except jinja2.TemplateError:
        return ()
    start = text.find(_PROBE_REPLY)
    end = text.find(_PROBE_NEXT, start)
    if start < 0 or end < 0:
        return ()
    between = text[start + len(_PROBE_REPLY):end]
    ids = tokenizer(between, add_special_tokens=False)["input_ids"]
    if not ids or ids[0] not in tokenizer.added_tokens_decoder:
        return ()
    return (tokenizer.convert_ids_to_tokens(ids[0]),)
