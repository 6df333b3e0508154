"""Template resolution and rendering: built-ins, model templates, files, and the errors."""

from __future__ import annotations

import pytest

from conftest import TEMPLATES
from tunelab.data.templates import builtin_templates, end_of_turn_markers, fold_system, render, resolve_template
from tunelab.data.types import Message
from tunelab.errors import TunelabError

# Built-in name -> the family's real template it must stay a verbatim copy of.
FAMILY_COPIES = {
    "qwen2.5": "Qwen-Qwen2.5-7B-Instruct.jinja",
    "qwen3": "Qwen-Qwen3-0.6B.jinja",
    "llama3": "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "llama3.2": "meta-llama-Llama-3.2-3B-Instruct.jinja",
    "deepseek": "deepseek-llm-7b-chat.jinja",
    "deepseek-r1": "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
    "gemma2": "google-gemma-2-2b-it.jinja",
    "mistral-nemo": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
    "phi3.5": "microsoft-Phi-3.5-mini-instruct.jinja",
    "glm4": "GLM-4.6.jinja",
    "smollm3": "HuggingFaceTB-SmolLM3-3B.jinja",
}

HOTEL_CHAT = [Message("user", "找一家经济型酒店"), Message("search", '{\n    "type": "经济型"\n}'),
              Message("return", "[]"), Message("assistant", "没有找到。")]


@pytest.fixture
def qwen2(qwen2_tokenizer):
    return qwen2_tokenizer  # session-wide: loading the vocabulary takes seconds


@pytest.fixture
def llama3(llama3_tokenizer):
    return llama3_tokenizer


@pytest.mark.parametrize("name, filename", FAMILY_COPIES.items())
def test_family_builtins_are_verbatim_copies(qwen2, name, filename):
    assert resolve_template(name, qwen2) == (TEMPLATES / filename).read_text(encoding="utf-8")


def test_builtin_names_include_the_documented_ones():
    assert {"chatml", "hotel", *FAMILY_COPIES} <= set(builtin_templates())


def test_auto_is_the_tokenizers_own_template(qwen2):
    assert resolve_template("auto", qwen2) == qwen2.chat_template


def test_auto_without_a_template_names_the_model_and_the_fix(llama3):
    with pytest.raises(TunelabError) as err:
        resolve_template("auto", llama3)
    assert "no chat template" in err.value.what and str(llama3.name_or_path) in err.value.what
    assert "template=chatml" in err.value.fix and ".jinja" in err.value.fix


def test_a_jinja_file_is_read(tmp_path, qwen2):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}", encoding="utf-8")
    src = resolve_template(str(path), qwen2)
    assert render([Message("user", "hi")], src, qwen2) == "[user]hi"


def test_unknown_name_suggests_the_nearest(qwen2):
    with pytest.raises(TunelabError) as err:
        resolve_template("chatlm", qwen2)
    assert "template=chatml" in err.value.fix


def test_missing_jinja_file_is_reported(tmp_path, qwen2):
    with pytest.raises(TunelabError, match="does not exist"):
        resolve_template(str(tmp_path / "nope.jinja"), qwen2)


def test_chatml_renders_any_role_and_prompts_the_assistant(qwen2):
    src = resolve_template("chatml", qwen2)
    text = render(HOTEL_CHAT[:2], src, qwen2, add_generation_prompt=True)
    assert text == ("<|im_start|>user\n找一家经济型酒店<|im_end|>\n"
                    '<|im_start|>search\n{\n    "type": "经济型"\n}<|im_end|>\n<|im_start|>assistant\n')


def test_hotel_prompt_stops_before_the_role_so_the_model_picks_it(qwen2):
    src = resolve_template("hotel", qwen2)
    assert render(HOTEL_CHAT[:1], src, qwen2) == "<|im_start|>user\n找一家经济型酒店<|im_end|>\n"
    assert render(HOTEL_CHAT[:1], src, qwen2, add_generation_prompt=True).endswith("<|im_end|>\n<|im_start|>")
    assert "<|im_start|>return\n[]<|im_end|>\n" in render(HOTEL_CHAT, src, qwen2)


def test_render_matches_apply_chat_template(qwen2, llama3):
    chat = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello")]
    dicts = [{"role": m.role, "content": m.content} for m in chat]
    for tok, name in ((qwen2, "qwen2.5"), (llama3, "llama3")):
        src = resolve_template(name, tok)
        for gen in (False, True):
            expected = tok.apply_chat_template(dicts[:2] if gen else dicts, chat_template=src, tokenize=False,
                                               add_generation_prompt=gen)
            assert render(chat[:2] if gen else chat, src, tok, add_generation_prompt=gen) == expected
    # The tokenizer's special tokens reach the template: Llama's starts with BOS.
    assert render(chat, resolve_template("llama3", llama3), llama3).startswith(llama3.bos_token)


def test_fold_system_first_and_last():
    chat = [Message("system", "S"), Message("user", "a"), Message("assistant", "b"), Message("user", "c")]
    assert [(m.role, m.content) for m in fold_system(chat)] == [("user", "S\n\na"), ("assistant", "b"), ("user", "c")]
    assert [(m.role, m.content) for m in fold_system(chat, into="last")] == [
        ("user", "a"), ("assistant", "b"), ("user", "S\n\nc")]
    assert fold_system(chat[1:]) == chat[1:]


def test_end_of_turn_markers(qwen2, llama3):
    assert end_of_turn_markers(qwen2, resolve_template("chatml", qwen2)) == ("<|im_end|>",)
    assert end_of_turn_markers(qwen2, resolve_template("hotel", qwen2)) == ("<|im_end|>",)
    assert end_of_turn_markers(llama3, resolve_template("llama3", llama3)) == ("<|eot_id|>",)
