"""Chat templates: which Jinja source renders a conversation, and rendering it as HF does.

A template is plain Jinja source, exactly what a tokenizer's `chat_template` holds, so a
model's own template, a built-in one and a user's `.jinja` file all behave the same.
Built-ins live in `tunelab/templates/*.jinja`: `chatml`, `hotel`, and verbatim copies of
the families' own templates for checkpoints (base models, GGUF vocabularies) that ship
without one.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import jinja2
from transformers.utils.chat_template_utils import render_jinja_template

from tunelab.data.types import IGNORE_INDEX, Message
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


# --- the template lock: the prompt format travels with the trained model ----------------
#
# Training writes the exact Jinja it rendered with into every saved tokenizer's
# `chat_template` (transformers, PEFT and vLLM read it from there) and, beside it,
# LOCK_FILE with the template's name, stop tokens and system prompt. `eval`, `chat`,
# `serve` and `merge` use the locked template by default and refuse an explicit
# `--template` that would prompt the model differently.

LOCK_FILE = "tunelab_template.json"

# Conversations on which two templates must agree to count as "the same prompt format".
_SAME_PROBES = (
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Book a room."}],
)


@dataclass
class TemplateLock:
    chat_template: str  # Jinja source, exactly what training rendered with
    template: str = "auto"  # what the config named: auto, a built-in, a path
    stop_tokens: list[str] = field(default_factory=list)  # end-of-turn marker(s), then EOS
    system_prompt: str | None = None  # the default system prompt training added (already in the Jinja)

    def to_json(self) -> dict:
        return {"format": 1, **asdict(self)}


def with_default_system(template_src: str, system_prompt: str | None) -> str:
    """`template_src` that adds `system_prompt` where a conversation has no system message,
    as `system_prompt=` did to every training record: a PEFT/vLLM user who sends only the
    user turn then gets the tokens the model was trained on."""
    if not system_prompt:
        return template_src
    # json.dumps makes a valid Jinja string literal (Jinja decodes the same backslash escapes).
    literal = json.dumps(system_prompt, ensure_ascii=False)
    header = ("{#- tunelab: the run's system_prompt, added where a conversation has none #}\n"
              "{%- if not messages or messages[0]['role'] != 'system' %}"
              f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
              "{%- endif %}\n")
    return header + template_src


def lock_template(tokenizer, template: str, system_prompt: str | None = None) -> str:
    """Resolve `template` for training and make it the tokenizer's own `chat_template`, so
    every folder training saves carries it. Returns the Jinja source to render with."""
    source = with_default_system(resolve_template(template, tokenizer), system_prompt)
    attach_lock(tokenizer, TemplateLock(source, template, stop_tokens(tokenizer, source), system_prompt))
    return source


def stop_tokens(tokenizer, template_src: str) -> list[str]:
    """The template's end-of-turn marker(s), then EOS: where generation stops."""
    tokens = list(end_of_turn_markers(tokenizer, template_src))
    if tokenizer.eos_token:
        tokens.append(tokenizer.eos_token)
    return list(dict.fromkeys(tokens))


def template_lock(tokenizer) -> TemplateLock | None:
    """The lock `lock_template` / `attach_lock` gave this tokenizer, if any."""
    return getattr(tokenizer, "_tunelab_lock", None)


def attach_lock(tokenizer, lock: TemplateLock | None):
    """Make `lock` the tokenizer's chat template (and what `save_lock` writes); returns the tokenizer."""
    if lock is not None:
        tokenizer.chat_template = lock.chat_template
        tokenizer._tunelab_lock = lock
    return tokenizer


def save_lock(tokenizer, folder: Path) -> TemplateLock | None:
    """Write LOCK_FILE into `folder` for a tokenizer that training locked (or `attach_lock`
    gave a lock); nothing for a plain tokenizer."""
    lock = template_lock(tokenizer)
    if lock is None:
        return None
    (Path(folder) / LOCK_FILE).write_text(json.dumps(lock.to_json(), indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
    return lock


def read_lock(folder) -> TemplateLock | None:
    """The lock a training run left in `folder` (a run, checkpoint, adapter or merged
    folder), or None for folders tunelab did not train."""
    path = Path(folder).expanduser() / LOCK_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return TemplateLock(chat_template=data["chat_template"], template=data.get("template", "auto"),
                            stop_tokens=list(data.get("stop_tokens") or []), system_prompt=data.get("system_prompt"))
    except (ValueError, KeyError, TypeError) as exc:
        raise TunelabError(f"{LOCK_FILE} is unreadable ({exc})", where=str(path),
                           fix="restore it from the training run (config.yaml names the template), "
                               "or delete it to fall back to the tokenizer's chat_template") from None


def find_lock(folders) -> TemplateLock | None:
    """The one lock of `folders` (adapters first, then the model); TunelabError when two
    of them were trained with templates that prompt differently."""
    found = [(str(f), lock) for f in folders if f and (lock := read_lock(f)) is not None]
    for where, lock in found[1:]:
        if lock.chat_template != found[0][1].chat_template:
            raise TunelabError(f"{where} and {found[0][0]} were trained with different chat templates",
                               where=where, fix="serve or evaluate them separately, each with its own template")
    return found[0][1] if found else None


def same_prompts(a: str, b: str, tokenizer) -> bool:
    """Whether two templates render the probe conversations to the same text (and so the
    same tokens), the generation prompt included; refusing a conversation counts too."""
    def outcome(src: str, messages: list[dict]) -> str:
        try:
            return render(messages, src, tokenizer, add_generation_prompt=True)
        except jinja2.TemplateError as exc:
            return f"refused: {type(exc).__name__}"

    return a == b or all(outcome(a, m) == outcome(b, m) for m in _SAME_PROBES)


def choose_template(requested: str | None, tokenizer, lock: TemplateLock | None, *, force: bool = False,
                    fallback: str = "auto", where: str = "--template") -> str:
    """The Jinja source to prompt with. A locked model gets its trained template unless
    `requested` renders the same conversations identically (or `force`); an unlocked one
    gets `requested`, else `fallback` (a task's template, or the tokenizer's own)."""
    if lock is None:
        return resolve_template(requested or fallback, tokenizer)
    if requested is None:
        return lock.chat_template
    source = resolve_template(requested, tokenizer)
    if force or same_prompts(source, lock.chat_template, tokenizer):
        return source
    raise TunelabError(f"{where} {requested} prompts the model differently from the template it was trained with "
                       f"({lock.template})", where=where,
                       fix=f"drop {where} to use the trained template, or add --force-template to prompt it "
                           "in another format anyway (answers usually get worse)")


def mark_trained(ids: list[int], labels: list[int], tokenizer, ignore: int = IGNORE_INDEX,
                 open_mark: str = "[[", close_mark: str = "]]") -> str:
    """The rendered tokens as text with each run of trained-on tokens (label != ignore)
    wrapped in [[ ]], special tokens shown as they are."""
    out, run, trained = [], [], None
    for token, label in zip(ids, labels):
        is_trained = label != ignore
        if trained is not None and is_trained != trained:
            out.append(_segment(run, tokenizer, trained, open_mark, close_mark))
            run = []
        run.append(token)
        trained = is_trained
    if run:
        out.append(_segment(run, tokenizer, bool(trained), open_mark, close_mark))
    return "".join(out)


def _segment(ids: list[int], tokenizer, trained: bool, open_mark: str, close_mark: str) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return f"{open_mark}{text}{close_mark}" if trained else text
