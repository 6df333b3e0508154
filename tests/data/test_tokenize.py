"""Label masking, token by token, on real tokenizers and the families' real templates.

Each family's multi-turn chat is encoded and every run of labelled tokens is decoded: it
must be exactly an assistant reply plus that template's end-of-turn marker, and the
system/user text must sit only in the masked part.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import pytest
from tokenizers import Regex, decoders, normalizers, pre_tokenizers

from conftest import HOTEL, shared_tokenizer
from tunelab.config import TunelabConfig
from tunelab.data.templates import render, resolve_template
from tunelab.data.tokenize import IGNORE_INDEX, encode_conversation, encode_prompt, encode_text, stop_token_ids
from tunelab.data.types import Conversation, Message
from tunelab.errors import TunelabError
from tunelab.train.dataset import encode_samples

SYSTEM = "You answer in one short sentence."
USER_1, REPLY_1 = "Which city is the capital of France?", "Paris is the capital of France."
USER_2, REPLY_2 = "And of Italy, please?", "Rome is the capital of Italy."


def train_encode(convs: list[Conversation], tokenizer, template_src: str, cutoff_len: int, **cfg) -> list:
    """The samples training builds (train/dataset.py: context-keeping truncation, skip_invalid)."""
    samples, _ = encode_samples(convs, tokenizer, template_src, TunelabConfig(cutoff_len=cutoff_len, **cfg))
    return samples


def chat(system: bool = True) -> Conversation:
    head = [Message("system", SYSTEM)] if system else []
    return Conversation(head + [Message("user", USER_1), Message("assistant", REPLY_1),
                                Message("user", USER_2), Message("assistant", REPLY_2)], source="chat.jsonl:1")


@dataclass
class Family:
    """A template, the vocabulary it runs on, and what its labelled replies decode to."""
    template: str
    vocab: str
    end: str  # end-of-turn marker that closes every reply
    last_end: str | None = None  # a different closing of the final reply (GLM appends EOS)
    prefix: str = ""  # text the model writes before every reply
    last_prefix: str | None = None  # ... before the final reply only (Qwen3's empty think block)
    added: list[str] = field(default_factory=list)  # the family's own special tokens
    attrs: dict = field(default_factory=dict)

    def expected(self, reply: str, last: bool) -> str:
        prefix = self.last_prefix if last and self.last_prefix is not None else self.prefix
        end = self.last_end if last and self.last_end is not None else self.end
        return prefix + reply + end


EOS_DS = "<｜end▁of▁sentence｜>"
FAMILIES = {
    "qwen2.5": Family("qwen2.5", "qwen2", "<|im_end|>"),
    "qwen3": Family("qwen3", "qwen2", "<|im_end|>", last_prefix="<think>\n\n</think>\n\n",
                    added=["<think>", "</think>"]),
    "llama3.1": Family("llama3", "llama3", "<|eot_id|>", attrs={"eos_token": "<|eot_id|>"}),
    "llama3.2": Family("llama3.2", "llama3", "<|eot_id|>", attrs={"eos_token": "<|eot_id|>"}),
    "deepseek-llm": Family("deepseek", "deepseek", EOS_DS, prefix=" ", attrs={"eos_token": EOS_DS}),
    "deepseek-r1": Family("deepseek-r1", "qwen2", EOS_DS,
                          added=["<｜begin▁of▁sentence｜>", EOS_DS, "<｜User｜>", "<｜Assistant｜>"],
                          attrs={"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": EOS_DS}),
    "gemma2": Family("gemma2", "llama3", "<end_of_turn>", added=["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
                     attrs={"bos_token": "<bos>", "eos_token": "<eos>"}),
    "mistral-nemo": Family("mistral-nemo", "llama3", "</s>", added=["<s>", "</s>", "[INST]", "[/INST]"],
                           attrs={"bos_token": "<s>", "eos_token": "</s>"}),
    "phi3.5": Family("phi3.5", "phi3", "<|end|>"),
    "glm4.6": Family("glm4", "qwen2", "<|user|>", last_end="<|endoftext|>", prefix="\n<think></think>\n",
                     added=["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                            "<think>", "</think>"], attrs={"eos_token": "<|endoftext|>"}),
    "smollm3": Family("smollm3", "qwen2", "<|im_end|>"),
}


@pytest.fixture(scope="module")
def vocabs(qwen2_tokenizer):
    # Reuse the session's Qwen2 vocabulary (loading one takes seconds); the others are
    # repaired below, so they are loaded for this module alone.
    return {"qwen2": qwen2_tokenizer}


def family_tokenizer(vocabs: dict, family: Family):
    """The family's tokenizer: a shared vocabulary plus the family's special tokens
    (built once per module: loading a 150k vocabulary takes seconds)."""
    key = (family.vocab, tuple(family.added), tuple(family.attrs.items()))
    if key in vocabs:
        return vocabs[key]
    if family.vocab not in vocabs:
        vocabs[family.vocab] = _repaired(shared_tokenizer(family.vocab), family.vocab)
    tok = copy.deepcopy(vocabs[family.vocab]) if family.added or family.attrs else vocabs[family.vocab]
    if family.added:
        tok.add_special_tokens({"additional_special_tokens": family.added})
    for key, value in family.attrs.items():
        setattr(tok, key, value)
    vocabs[key] = tok
    return tok


def _repaired(tok, vocab: str):
    # transformers' GGUF conversion leaves some vocabularies incomplete; restore what the
    # models' own tokenizer.json files hold (Llama-3's split regex, Phi-3's `▁` spaces,
    # DeepSeek's byte-level decoder) so tokens and decoded text are the real ones.
    if vocab == "llama3":
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if vocab == "deepseek":
        tok.backend_tokenizer.decoder = decoders.ByteLevel()
    if vocab == "phi3":
        tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                                 normalizers.Replace(" ", "▁")])
    return tok


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def label_runs(example, tok) -> list[str]:
    """The decoded text of each maximal run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        assert label in (token, IGNORE_INDEX), "a label is neither the input token nor masked"
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(run) for run in runs]


def masked_text(example, tok) -> str:
    return tok.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX])


# --- every family, token by token ------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_labels_are_exactly_the_replies_and_their_end_markers(vocabs, name):
    family = FAMILIES[name]
    tok = family_tokenizer(vocabs, family)
    example = encode_conversation(chat(), tok, resolve_template(family.template, tok), cutoff_len=4096)
    assert label_runs(example, tok) == [family.expected(REPLY_1, last=False), family.expected(REPLY_2, last=True)]
    context = masked_text(example, tok)
    for text in (SYSTEM, USER_1, USER_2):
        assert text in context  # present in the input (Gemma folds the system prompt into a user turn)...
        assert all(text not in run for run in label_runs(example, tok))  # ...and never a label


@pytest.mark.parametrize("name", FAMILIES)
def test_training_prompt_is_the_inference_prompt(vocabs, name):
    """The tokens before the final reply are exactly what `encode_prompt` feeds at inference."""
    family = FAMILIES[name]
    tok = family_tokenizer(vocabs, family)
    src = resolve_template(family.template, tok)
    example = encode_conversation(chat(), tok, src, cutoff_len=4096, train_on="last")
    first_label = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    prompt = encode_prompt(chat().messages[:-1], tok, src)
    if name == "deepseek-r1":
        # R1's generation prompt opens a `<think>` block, which its rendered replies do not hold.
        assert tok.decode(prompt[first_label:]).startswith("<think>\n")
        prompt = prompt[:first_label]
    assert prompt == example.input_ids[:first_label]


@pytest.mark.parametrize("name", FAMILIES)
def test_generation_stops_at_the_end_of_turn(vocabs, name):
    family = FAMILIES[name]
    tok = family_tokenizer(vocabs, family)
    stops = stop_token_ids(tok, resolve_template(family.template, tok))
    assert stops[0] == tok.convert_tokens_to_ids(family.end)
    assert tok.eos_token_id in stops


def test_no_second_bos(vocabs):
    tok = family_tokenizer(vocabs, FAMILIES["llama3.1"])
    ids = encode_conversation(chat(), tok, resolve_template("llama3", tok), 4096).input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


# --- templates that are not prefix-stable -----------------------------------------------

def test_qwen3_keeps_reasoning_only_in_the_final_reply(vocabs):
    tok = family_tokenizer(vocabs, FAMILIES["qwen3"])
    conv = chat()
    conv.messages[2].content = "<think>\nEasy.\n</think>\n\n" + REPLY_1
    conv.messages[4].content = "<think>\nAlso easy.\n</think>\n\n" + REPLY_2
    runs = label_runs(encode_conversation(conv, tok, resolve_template("qwen3", tok), 4096), tok)
    assert runs == [REPLY_1 + "<|im_end|>", "<think>\nAlso easy.\n</think>\n\n" + REPLY_2 + "<|im_end|>"]


def test_mistral_puts_the_system_prompt_in_the_last_user_turn(vocabs):
    tok = family_tokenizer(vocabs, FAMILIES["mistral-nemo"])
    example = encode_conversation(chat(), tok, resolve_template("mistral-nemo", tok), 4096)
    assert f"[INST]{SYSTEM}\n\n{USER_2}[/INST]" in tok.decode(example.input_ids)


def test_gemma_folds_the_system_prompt_into_the_first_user_turn(vocabs):
    tok = family_tokenizer(vocabs, FAMILIES["gemma2"])
    example = encode_conversation(chat(), tok, resolve_template("gemma2", tok), 4096)
    assert f"<start_of_turn>user\n{SYSTEM}\n\n{USER_1}<end_of_turn>" in tok.decode(example.input_ids)


def test_gemma_refusal_of_the_roles_names_the_record(vocabs):
    tok = family_tokenizer(vocabs, FAMILIES["gemma2"])
    conv = Conversation([Message("user", "a"), Message("user", "b"), Message("assistant", "c")], source="x.jsonl:7")
    with pytest.raises(TunelabError) as err:
        encode_conversation(conv, tok, resolve_template("gemma2", tok), 4096)
    assert err.value.where == "x.jsonl:7" and "alternate" in err.value.what


def test_tool_results_are_context(vocabs):
    tok = family_tokenizer(vocabs, FAMILIES["qwen2.5"])
    conv = Conversation([Message("user", "Weather in Oslo?"), Message("assistant", "Let me check."),
                         Message("tool", '{"temp": -3}'), Message("assistant", "It is -3 degrees.")])
    example = encode_conversation(conv, tok, resolve_template("qwen2.5", tok), 4096)
    assert label_runs(example, tok) == ["Let me check.<|im_end|>", "It is -3 degrees.<|im_end|>"]
    assert '{"temp": -3}' in masked_text(example, tok)


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                  "parameters": {"type": "object",
                                                                 "properties": {"city": {"type": "string"}}}}}


@pytest.mark.parametrize("name", ["qwen2.5", "llama3.1", "mistral-nemo"])
def test_tool_schemas_are_context(vocabs, name):
    """Tool schemas move turns around (Llama: into the first user turn; Mistral: before the
    last one); the labels stay exactly the replies."""
    family = FAMILIES[name]
    tok = family_tokenizer(vocabs, family)
    conv = chat()
    conv.tools = [WEATHER_TOOL]
    example = encode_conversation(conv, tok, resolve_template(family.template, tok), 4096)
    assert label_runs(example, tok) == [family.expected(REPLY_1, last=False), family.expected(REPLY_2, last=True)]
    assert "get_weather" in masked_text(example, tok)


def test_custom_role_targets_under_chatml_learn_the_role_name(vocabs):
    tok = family_tokenizer(vocabs, FAMILIES["qwen2.5"])
    conv = Conversation([Message("user", "find one"), Message("search", '{"type": "x"}', train=True)])
    example = encode_conversation(conv, tok, resolve_template("chatml", tok), 4096)
    # The chatml prompt says `assistant\n`; a `search` turn departs from it at the role name.
    assert label_runs(example, tok) == ['search\n{"type": "x"}<|im_end|>']


# --- the hotel recipe on real rows -------------------------------------------------------

def hotel_turn(turn: dict, train: bool) -> Message:
    if turn["role"] == "search":
        args = {k: v for k, v in turn["arguments"].items() if v is not None}
        return Message("search", json.dumps(args, indent=4, ensure_ascii=False), train)
    if turn["role"] == "return":
        return Message("return", json.dumps(turn["records"], indent=4, ensure_ascii=False), train)
    return Message(turn["role"], turn["content"], train)


def hotel_rows(n: int) -> list[Conversation]:
    convs = []
    with open(HOTEL / "train.jsonl", encoding="utf-8") as f:
        for line_no, line in zip(range(1, n + 1), f):
            row = json.loads(line)
            context = [hotel_turn(t, False) for t in json.loads(row["context"])]
            convs.append(Conversation(context + [hotel_turn(json.loads(row["response"]), True)],
                                      source=f"train.jsonl:{line_no}"))
    return convs


def test_hotel_labels_are_the_response_with_its_role(vocabs):
    tok = family_tokenizer(vocabs, FAMILIES["qwen2.5"])
    src = resolve_template("hotel", tok)
    convs = hotel_rows(80)
    examples = train_encode(convs, tok, src, cutoff_len=8192)
    assert {c.messages[-1].role for c in convs} == {"search", "assistant"}
    for conv, example in zip(convs, examples):
        response = conv.messages[-1]
        assert label_runs(example, tok) == [f"{response.role}\n{response.content}<|im_end|>"]
        prompt = encode_prompt(conv.messages[:-1], tok, src)
        assert example.input_ids[:len(prompt)] == prompt and example.labels[len(prompt)] != IGNORE_INDEX


def test_hotel_rows_under_a_template_that_drops_search_turns(vocabs):
    tok = family_tokenizer(vocabs, FAMILIES["qwen2.5"])
    conv = hotel_rows(2)[1]  # user, search, return -> assistant
    with pytest.raises(TunelabError) as err:
        encode_conversation(conv, tok, resolve_template("qwen2.5", tok), 8192)
    assert "drops the 'search' turns" in err.value.what and "template=hotel" in err.value.fix


# --- train_on, truncation, batches --------------------------------------------------------

@pytest.fixture(scope="module")
def qwen(vocabs):
    tok = family_tokenizer(vocabs, FAMILIES["qwen2.5"])
    return tok, resolve_template("qwen2.5", tok)


def test_train_on_last_labels_only_the_final_reply(qwen):
    tok, src = qwen
    both = encode_conversation(chat(), tok, src, 4096)
    last = encode_conversation(chat(), tok, src, 4096, train_on="last")
    assert last.input_ids == both.input_ids
    assert label_runs(last, tok) == [REPLY_2 + "<|im_end|>"]


def reply_end(example, which: int) -> int:
    """Token index just after the `which`-th labelled run."""
    ends = [i + 1 for i in range(len(example.labels)) if example.labels[i] != IGNORE_INDEX
            and (i + 1 == len(example.labels) or example.labels[i + 1] == IGNORE_INDEX)]
    return ends[which]


def test_truncation_drops_whole_trailing_turns(qwen):
    tok, src = qwen
    full = encode_conversation(chat(), tok, src, 4096)
    end_1 = reply_end(full, 0)
    cut = encode_conversation(chat(), tok, src, cutoff_len=len(full.input_ids) - 3)
    assert cut.input_ids == full.input_ids[:end_1]
    assert label_runs(cut, tok) == [REPLY_1 + "<|im_end|>"]


def test_truncation_inside_the_first_reply_keeps_only_reply_tokens(qwen):
    tok, src = qwen
    full = encode_conversation(chat(), tok, src, 4096)
    first_label = full.labels.index(next(label for label in full.labels if label != IGNORE_INDEX))
    cut = encode_conversation(chat(), tok, src, cutoff_len=first_label + 3)
    assert cut.input_ids == full.input_ids[:first_label + 3]
    (run,) = label_runs(cut, tok)
    assert len(run) > 0 and REPLY_1.startswith(run)


def test_cutoff_smaller_than_the_prompt_is_a_clear_error(qwen):
    tok, src = qwen
    full = encode_conversation(chat(), tok, src, 4096)
    prompt_len = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    with pytest.raises(TunelabError) as err:
        encode_conversation(chat(), tok, src, cutoff_len=prompt_len)
    assert err.value.what == (f"cutoff_len={prompt_len} is smaller than the prompt of record chat.jsonl:1 "
                              f"({prompt_len} tokens)")
    assert "raise cutoff_len" in err.value.fix


def test_training_raises_or_skips_bad_records(qwen, capsys):
    tok, src = qwen
    bad = Conversation([Message("user", "no reply here")], source="bad.jsonl:3")
    with pytest.raises(TunelabError, match="no turn to learn from"):
        train_encode([chat(), bad], tok, src, 4096)
    examples = train_encode([chat(), bad, chat()], tok, src, 4096, skip_invalid=True)
    assert len(examples) == 2
    err = capsys.readouterr().err
    assert "skipped 1 of 3 record(s)" in err and "bad.jsonl:3" in err


def test_plain_text_is_chunked_with_every_token_a_label(qwen):
    tok, src = qwen
    text = " ".join(f"word{i}" for i in range(200))
    chunks = encode_text(text, tok, cutoff_len=64, source="doc.txt:1")
    ids = [t for chunk in chunks for t in chunk.input_ids]
    assert ids == tok(text)["input_ids"] + [tok.eos_token_id]
    assert all(len(c.input_ids) <= 64 and c.labels == c.input_ids for c in chunks)
    mixed = train_encode([Conversation([Message("text", text)], source="doc.txt:1"), chat()], tok, src, 64)
    assert [s.input_ids for s in mixed[:len(chunks)]] == [c.input_ids for c in chunks]
    assert len(mixed) == len(chunks) + 1


def test_plain_text_given_to_the_chat_encoder_is_refused(qwen):
    tok, src = qwen
    with pytest.raises(TunelabError, match="plain-text"):
        encode_conversation(Conversation([Message("text", "abc")], source="t:1"), tok, src, 64)


def test_encode_prompt_appends_the_generation_prompt(qwen):
    tok, src = qwen
    messages = chat().messages[:2]
    assert tok.decode(encode_prompt(messages, tok, src)) == render(messages, src, tok, add_generation_prompt=True)
