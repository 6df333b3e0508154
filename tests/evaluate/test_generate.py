"""Batched generation must equal one-at-a-time generation, stop where told, and stream cleanly."""

from __future__ import annotations

import pytest
import torch

from conftest import HOTEL, shared_tokenizer, tiny_llama
from tunelab.errors import TunelabError
from tunelab.model.generate import GenerationOptions, _finish, generate_batch, stream_generate

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    "hello",
    "你好，我想找一个提供叫醒服务，评分是4分以上的经济型酒店住宿",
    "a much longer prompt with many words in it, so that the others get left padding",
    "x y",
    "北京",
]


@pytest.fixture(scope="module")
def tok():
    return shared_tokenizer("qwen2")


@pytest.fixture(scope="module")
def model(tok):
    # A wider init than the default makes a random model's greedy outputs vary token to
    # token, so equality checks compare real sequences, not one repeated token.
    return tiny_llama(tok, initializer_range=0.2)


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(t, add_special_tokens=False).input_ids for t in PROMPTS]


def one_by_one(model, tok, prompts, options, stop_ids=()):
    return [generate_batch(model, tok, [p], options, stop_ids, batch_size=1, progress=False)[0] for p in prompts]


def test_batched_greedy_equals_sequential_and_hf_generate(model, tok, prompts):
    options = GenerationOptions(max_new_tokens=10)
    batched = generate_batch(model, tok, prompts, options, batch_size=3, progress=False)
    single = one_by_one(model, tok, prompts, options)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert all(len(set(g.token_ids)) > 3 for g in single)  # real sequences, not one token repeated
    for prompt, ours in zip(prompts, single):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=None)
        assert ref[0, len(prompt):].tolist() == ours.token_ids
    assert all(g.finish_reason == "length" and g.prompt_tokens == len(p) for g, p in zip(batched, prompts))


def test_stop_tokens_cut_output_and_rows_leave_the_batch(model, tok, prompts):
    options = GenerationOptions(max_new_tokens=10)
    free = one_by_one(model, tok, prompts, options)
    # Stop row 1 at its 3rd token and row 3 at its 6th: they leave the batch early while
    # the others run on, which must not change anyone's tokens.
    stops = [free[1].token_ids[2], free[3].token_ids[5]]
    batched = generate_batch(model, tok, prompts, options, stop_ids=stops, batch_size=5, progress=False)
    single = one_by_one(model, tok, prompts, options, stops)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    for gen, unstopped in zip(batched, free):
        cut = next((i for i, t in enumerate(unstopped.token_ids) if t in stops), None)
        expected = unstopped.token_ids if cut is None else unstopped.token_ids[:cut]
        assert gen.token_ids == expected
        assert gen.finish_reason == ("length" if cut is None else "stop")
        assert not set(gen.token_ids) & set(stops)
        assert gen.text == tok.decode(expected, skip_special_tokens=True)
    assert batched[1].completion_tokens == 2


def test_sampling_is_reproducible_with_a_seed(model, tok, prompts):
    options = GenerationOptions(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    first = generate_batch(model, tok, prompts, options, batch_size=2, progress=False)
    again = generate_batch(model, tok, prompts, options, batch_size=2, progress=False)
    greedy = generate_batch(model, tok, prompts, GenerationOptions(max_new_tokens=8), progress=False)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.token_ids for g in first] != [g.token_ids for g in greedy]


def test_stream_yields_the_same_text_and_stops_when_the_consumer_does(model, tok, prompts):
    options = GenerationOptions(max_new_tokens=12)
    full = one_by_one(model, tok, prompts, options)
    for prompt, ref in zip(prompts, full):
        deltas = list(stream_generate(model, tok, prompt, options))
        assert "".join(deltas) == ref.text
        assert all(deltas) and not any("\ufffd" in d for d in deltas)
    stops = [full[1].token_ids[4]]
    stopped = "".join(stream_generate(model, tok, prompts[1], options, stops))
    assert stopped == tok.decode(full[1].token_ids[:4], skip_special_tokens=True)
    stream = stream_generate(model, tok, prompts[2], options)
    next(stream)
    stream.close()  # the consumer hung up: the generator ends, nothing keeps decoding
    with pytest.raises(StopIteration):
        next(stream)


def test_bad_inputs_are_user_errors(model, tok):
    with pytest.raises(TunelabError, match="prompt 1 is empty"):
        generate_batch(model, tok, [[1, 2], []], progress=False)
    with pytest.raises(TunelabError, match="temperature"):
        GenerationOptions(temperature=-1)
    with pytest.raises(TunelabError, match="max_new_tokens"):
        GenerationOptions(max_new_tokens=0)


@pytest.mark.parametrize("slots", [False, None], ids=["static batches", "default: slots"])
@pytest.mark.parametrize("options", [GenerationOptions(max_new_tokens=12),
                                     GenerationOptions(max_new_tokens=12, repetition_penalty=1.3)])
def test_static_cache_path_equals_the_dynamic_loop_and_hf_generate(model, tok, prompts, options, slots):
    """The CUDA fast path (static cache; graphs only on CUDA) runs here on the CPU."""
    free = one_by_one(model, tok, prompts, GenerationOptions(max_new_tokens=12))
    stops = [free[1].token_ids[2], free[3].token_ids[5]]  # two rows stop early, the batch keeps its shape
    for stop_ids in ((), stops):
        dynamic = generate_batch(model, tok, prompts, options, stop_ids, batch_size=5, progress=False, fast=False)
        static = generate_batch(model, tok, prompts, options, stop_ids, batch_size=5, progress=False, fast=True,
                                slots=slots)
        assert [g.token_ids for g in static] == [g.token_ids for g in dynamic]
        assert [g.finish_reason for g in static] == [g.finish_reason for g in dynamic]
    if options.repetition_penalty == 1.0:
        for prompt, ours in zip(prompts, generate_batch(model, tok, prompts, options, batch_size=5, progress=False,
                                                         fast=True, slots=slots)):
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=None)
            assert ref[0, len(prompt):].tolist() == ours.token_ids


def test_grouped_query_decode_attention_equals_repeated_key_value_heads():
    """One query token: the query heads of a key/value head as its query rows, no cache copy."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import repeat_kv

    from tunelab.model.attention import decode_attention

    torch.manual_seed(0)
    query, key, value = torch.randn(3, 6, 1, 8), torch.randn(3, 2, 10, 8), torch.randn(3, 2, 10, 8)
    allowed = torch.rand(3, 1, 1, 10) > 0.3
    allowed[..., 0] = True
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ours, _ = decode_attention(SimpleNamespace(num_key_value_groups=3), query, key, value, mask, scaling=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(query, repeat_kv(key, 3), repeat_kv(value, 3),
                                                           attn_mask=mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("slots", [False, None], ids=["static batches", "default: slots"])
def test_static_decode_runs_the_grouped_query_attention_and_restores_sdpa(model, tok, prompts, monkeypatch, slots):
    import tunelab.model.attention as attention

    calls = []
    original = attention.decode_attention

    def counting(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return original(module, query, *args, **kwargs)

    monkeypatch.setattr(attention, "decode_attention", counting)
    monkeypatch.setattr(model.config, "_attn_implementation", "sdpa")
    options = GenerationOptions(max_new_tokens=4)
    expected = generate_batch(model, tok, prompts, options, batch_size=5, progress=False, fast=False)
    static = generate_batch(model, tok, prompts, options, batch_size=3, progress=False, fast=True, slots=slots)
    assert [g.token_ids for g in static] == [g.token_ids for g in expected]
    assert 1 in calls and max(calls) > 1  # decode steps and the prefill went through it
    assert model.config._attn_implementation == "sdpa"


def test_a_completion_cut_inside_a_character_keeps_only_complete_characters(tok):
    ids = tok.encode("ab𰻞", add_special_tokens=False)  # one rare character spread over 4 byte tokens
    assert len(ids) == 5 and tok.decode(ids[:4]).endswith("\ufffd")
    cut = _finish(tok, [1], ids[:4], stop_ids=set())
    assert cut.text == "ab" and cut.finish_reason == "length" and cut.token_ids == ids[:4]
    assert _finish(tok, [1], ids, stop_ids=set()).text == "ab𰻞"


# --- continuous batching (`_slot_decode`): slots refilled as rows finish ----------------------

def slot_rows(model, tok, prompts, options, stop_ids=(), slots=2, bucketed=False):
    """`_slot_decode` as `generate_batch` runs it (length-sorted), back in input order, stop token cut."""
    from tunelab.model.generate import _slot_decode

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    # bucketed: as a GPU runs it, also reading which rows finished every 3 steps only
    rows = _slot_decode(model, [prompts[i] for i in order], options, stop_ids, tok.pad_token_id, slots,
                        use_graph=False, bucketed=bucketed, sync_steps=3 if bucketed else 1)
    out = [None] * len(prompts)
    for index, row in zip(order, rows):
        out[index] = _finish(tok, prompts[index], row, set(stop_ids)).token_ids
    return out


@pytest.mark.parametrize("bucketed", [False, True], ids=["exact rows", "graph buckets"])
@pytest.mark.parametrize("slots", [1, 2, 4])
def test_slots_refilled_as_rows_finish_equal_static_batches_and_hf_generate(model, tok, prompts, slots, bucketed):
    """fp32: more prompts than slots (each slot decodes several prompts in turn), prompts of different
    lengths in unsorted order, rows that stop early and rows that reach max_new_tokens. `bucketed`:
    the rows and columns a GPU's CUDA graphs replay (free rows, unused columns) on the CPU, and
    finished rows freed only every few steps (they decode on meanwhile, past the longest prompt's
    max_new_tokens)."""
    options = GenerationOptions(max_new_tokens=12)
    free = one_by_one(model, tok, prompts, options)
    stops = [free[1].token_ids[2], free[3].token_ids[5]]
    for stop_ids in ((), stops):
        static = generate_batch(model, tok, prompts, options, stop_ids, batch_size=5, progress=False,
                                fast=True, slots=False)
        ours = slot_rows(model, tok, prompts, options, stop_ids, slots, bucketed)
        assert ours == [g.token_ids for g in static]
    assert [g.finish_reason for g in static] == ["length", "stop", "length", "stop", "length"]
    for prompt, row in zip(prompts, slot_rows(model, tok, prompts, options, (), slots, bucketed)):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=None)
        assert ref[0, len(prompt):].tolist() == row


def test_generate_batch_decodes_in_slots_by_default(model, tok, prompts, monkeypatch):
    """`generate_batch` takes the slot decoder unless told `slots=False` (static batches) or
    `fast=False` (the dynamic loop); results in input order, the `Generation`s of the static
    batches; small prefill groups change nothing."""
    import tunelab.model.generate as generate

    calls = []
    original = generate._slot_decode
    monkeypatch.setattr(generate, "_slot_decode", lambda *a, **k: calls.append(a[5]) or original(*a, **k))
    options = GenerationOptions(max_new_tokens=10)
    stops = [one_by_one(model, tok, prompts, options)[2].token_ids[3]]
    calls.clear()
    static = generate_batch(model, tok, prompts, options, stops, batch_size=3, progress=False, fast=True, slots=False)
    dynamic = generate_batch(model, tok, prompts, options, stops, batch_size=3, progress=False, fast=False)
    assert calls == [] and static == dynamic
    ours = generate_batch(model, tok, prompts, options, stops, batch_size=3, progress=False)
    assert calls == [3] and ours == static
    monkeypatch.setattr(generate, "PREFILL_TOKENS", 12)  # one or two prompts per prefill forward
    assert generate_batch(model, tok, prompts, options, stops, batch_size=4, progress=False, fast=True) == static
    assert generate_batch(model, tok, [], options, progress=False) == []


@pytest.mark.parametrize("slots", [True, False], ids=["slots", "static batches"])
def test_the_progress_bar_counts_samples_and_generated_tokens_a_second(model, tok, prompts, monkeypatch, slots):
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n, self.postfix = total, 0, {}
            bars.append(self)

        def update(self, n):
            self.n += n

        def set_postfix(self, **values):
            self.postfix = values

        def reset(self):
            self.n = 0

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    options = GenerationOptions(max_new_tokens=6)
    out = generate_batch(model, tok, prompts, options, batch_size=2, fast=True, slots=slots)
    (bar,) = bars
    assert bar.n == bar.total == len(prompts)
    assert float(bar.postfix["tok_s"]) > 0 and sum(len(g.token_ids) for g in out) == len(prompts) * 6


def test_a_finished_decode_frees_its_kv_cache_without_the_cycle_collector(model, tok, prompts, monkeypatch):
    """The slot decoder's cache must go when the decode ends: a reference cycle (decoder <-> its
    layers) kept every finished decode's KV cache on the GPU until gc ran, and repeated decodes
    (evaluation during training, several eval files, serve restarts) ran out of memory."""
    import gc
    import weakref

    import tunelab.model.generate as generate

    made = []
    original = generate.SlotDecoder.__init__

    def remember(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(generate.SlotDecoder, "__init__", remember)
    gc.disable()
    try:
        generate_batch(model, tok, prompts, GenerationOptions(max_new_tokens=4), batch_size=2, progress=False)
        assert made and all(ref() is None for ref in made)
    finally:
        gc.enable()


@pytest.mark.parametrize("per_octave", [1, 2, 4])
def test_window_buckets_cover_the_longest_row_and_waste_at_most_one_grid_step(per_octave, monkeypatch):
    import tunelab.model.generate as generate

    monkeypatch.setattr(generate, "WINDOW_STEPS_PER_OCTAVE", per_octave)
    windows = [generate.window_bucket(n) for n in range(1, 9000)]
    assert all(w >= n for n, w in zip(range(1, 9000), windows))
    assert windows == sorted(windows)  # a longer row never gets a smaller window
    assert all(w <= max(generate.SMALLEST_WINDOW, n * (1 + 1 / per_octave)) for n, w in zip(range(1, 9000), windows))
    assert len(set(windows)) <= 1 + per_octave * 8  # 64 .. 16384: eight octaves of per_octave buckets
    assert generate.window_bucket(1024) == 1024 and generate.window_bucket(64) == 64


def test_slots_with_repetition_penalty_equal_each_prompt_alone(tok, prompts):
    """The penalty sees each row's own prompt and tokens (no padding of a batch-mate's length).
    This narrower init repeats tokens: the penalty changes every answer."""
    model = tiny_llama(tok, initializer_range=0.05)
    options = GenerationOptions(max_new_tokens=12, repetition_penalty=1.5)
    alone = [g.token_ids for g in one_by_one(model, tok, prompts, options)]
    plain = [g.token_ids for g in one_by_one(model, tok, prompts, GenerationOptions(max_new_tokens=12))]
    assert all(a != p for a, p in zip(alone, plain))
    assert slot_rows(model, tok, prompts, options, slots=2, bucketed=True) == alone


def test_slots_sample_reproducibly_with_a_seed(model, tok, prompts):
    options = GenerationOptions(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    first = slot_rows(model, tok, prompts, options, slots=2, bucketed=True)
    assert first == slot_rows(model, tok, prompts, options, slots=2, bucketed=True)
    assert first != slot_rows(model, tok, prompts, GenerationOptions(max_new_tokens=8), slots=2)
    assert [len(row) for row in first] == [8] * len(prompts)


def test_what_a_slot_cannot_hold_keeps_the_batched_decoders(model, tok, prompts, monkeypatch):
    """json_after's processor tracks rows from one batch-wide prompt width, and a slot is a plain
    full-length KV row (a sliding-window layer keeps less): neither runs in slots."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    import tunelab.model.generate as generate

    def refuse(*args, **kwargs):
        raise AssertionError("the slot decoder ran")

    monkeypatch.setattr(generate, "_slot_decode", refuse)
    options = GenerationOptions(max_new_tokens=6, json_after="")
    assert generate_batch(model, tok, prompts[:2], options, batch_size=2, progress=False, fast=True) == \
        generate_batch(model, tok, prompts[:2], options, batch_size=2, progress=False, fast=False)
    torch.manual_seed(0)
    windowed = MistralForCausalLM(MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, pad_token_id=tok.pad_token_id)).eval()
    options = GenerationOptions(max_new_tokens=6)
    assert generate_batch(windowed, tok, prompts[:3], options, batch_size=2, progress=False) == \
        generate_batch(windowed, tok, prompts[:3], options, batch_size=2, progress=False, fast=False)


@pytest.mark.slow
def test_slots_on_the_embedded_model_equal_the_dynamic_loop_and_static_batches():
    """The real 135M model in fp32: hotel prompts that run to max_new_tokens and chat questions it
    answers and stops (<|im_end|>) within it, unsorted, 2 slots decoding as a GPU does."""
    from tunelab.data.templates import resolve_template
    from tunelab.data.tokenize import stop_token_ids
    from tunelab.evaluate.runner import encode_prompts
    from tunelab.evaluate.tasks import get_task
    from tunelab.model.loader import load_model, load_tokenizer

    tok, model = load_tokenizer("smollm2-135m-instruct"), load_model("smollm2-135m-instruct", device="cpu")
    template = resolve_template("hotel", tok)
    hotel = sorted(encode_prompts(get_task("hotel").load(HOTEL / "test.jsonl", limit=40), tok, template), key=len)
    chat = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for q in ("What is the capital of France?", "Hi!")]
    prompts = [hotel[3], chat[0], hotel[0], hotel[2], chat[1], hotel[1]]
    stops = stop_token_ids(tok, template)
    options = GenerationOptions(max_new_tokens=32)
    dynamic = generate_batch(model, tok, prompts, options, stops, batch_size=6, progress=False, fast=False)
    static = generate_batch(model, tok, prompts, options, stops, batch_size=6, progress=False, fast=True, slots=False)
    assert [g.token_ids for g in static] == [g.token_ids for g in dynamic]
    assert slot_rows(model, tok, prompts, options, stops, slots=2, bucketed=True) == [g.token_ids for g in dynamic]
    assert {g.finish_reason for g in dynamic} == {"stop", "length"}


def test_slots_reading_only_each_rows_columns_equal_the_masked_window(model, tok, prompts, monkeypatch):
    """With the length-aware decode attention (`model/decode_kernel.py`, CUDA; masked SDPA computes the
    same here) every step reads the whole cache as one window, each row only up to its own column:
    the same tokens as the bucketed windows, one window for every step."""
    import tunelab.model.attention as attention
    import tunelab.model.generate as generate

    options = GenerationOptions(max_new_tokens=12)
    stops = [one_by_one(model, tok, prompts, options)[1].token_ids[2]]
    windowed = [slot_rows(model, tok, prompts, options, s, slots=2, bucketed=True) for s in ((), stops)]
    seen = []
    original_init, original_attention = generate.SlotDecoder.__init__, attention.decode_by_length

    def length_aware(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.length_aware = True

    def recorded(query, key, value, lengths, scale=None):
        seen.append((key.shape[2], lengths.tolist()))
        return original_attention(query, key, value, lengths, scale)

    monkeypatch.setattr(generate.SlotDecoder, "__init__", length_aware)
    monkeypatch.setattr(attention, "decode_by_length", recorded)
    assert [slot_rows(model, tok, prompts, options, s, slots=2, bucketed=True) for s in ((), stops)] == windowed
    # One window for every step: the cache's width (the longest prompt, 12 new tokens, 3 steps between syncs)
    assert {window for window, _ in seen} == {max(map(len, prompts)) + 12 + 3}
    assert all(max(lengths) <= window for window, lengths in seen)
    assert any(len(set(lengths)) > 1 for _, lengths in seen)  # rows of different lengths in one step
