"""Constrained decoding: the JSON-object prefix check and the logits processor built on it."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.model.constrain import JsonAfterMarker, JsonState, feed, is_complete

SLOTS = ("type", "facilities", "price_range_lower", "price_range_upper")


def check(text: str, keys=None) -> tuple[bool, bool]:
    state = JsonState()
    ok = feed(state, text, frozenset(keys) if keys else None)
    return ok, ok and is_complete(state)


@pytest.mark.parametrize("text", [
    '{}', '{"a": 1}', '{"a": [1, 2.5, -3e2, "x"], "b": {"c": null}, "d": true}',
    '{\n    "type": "舒适型",\n    "facilities": ["wifi"]\n}', '{"s": "a \\"quoted\\" \\u00e9"}',
])
def test_valid_objects_are_complete_and_every_prefix_is_accepted(text):
    json.loads(text)
    assert check(text) == (True, True)
    for cut in range(len(text)):
        assert check(text[:cut])[0], text[:cut]


@pytest.mark.parametrize("text", ['[1]', '"x"', '{"a" 1}', '{"a": 1,}', '{"a": 01}', '{"a": tru e}',
                                  '{"a": 1}}', '{"a": 1} x', '{a: 1}', '{"a": 1.}', '{"a": [1,]}', '{"a": "\x01"}'])
def test_what_no_json_object_can_continue_is_refused(text):
    try:
        assert not isinstance(json.loads(text), dict)  # valid JSON, but not an object
    except ValueError:
        pass
    assert check(text)[0] is False


def test_keys_restrict_the_object_keys_at_every_level_of_spelling():
    assert check('{"price_range_lo', SLOTS) == (True, False)
    assert check('{"prize', SLOTS)[0] is False
    assert check('{"type": "any value"}', SLOTS) == (True, True)


@pytest.fixture(scope="module")
def constrained(qwen2_tokenizer):
    prompt = qwen2_tokenizer("<|im_start|>user\nfind a hotel<|im_end|>\n<|im_start|>", add_special_tokens=False)
    stop = qwen2_tokenizer.convert_tokens_to_ids("<|im_end|>")

    def run(completion: str, preferred: list[str], keys=SLOTS):
        """The processor's choice when `preferred` pieces score highest, in that order."""
        ids = prompt["input_ids"] + qwen2_tokenizer(completion, add_special_tokens=False)["input_ids"]
        scores = torch.zeros(1, len(qwen2_tokenizer))
        for rank, piece in enumerate(preferred):
            token = stop if piece == "<|im_end|>" else qwen2_tokenizer(piece, add_special_tokens=False)["input_ids"][0]
            scores[0, token] = 100.0 - rank
        proc = JsonAfterMarker(qwen2_tokenizer, "search\n", [stop], len(prompt["input_ids"]), keys=keys, top_k=5)
        out = proc(torch.tensor([ids]), scores)
        chosen = int(out[0].argmax())
        return "<|im_end|>" if chosen == stop else qwen2_tokenizer.decode([chosen])

    return run


def test_processor_steers_a_search_turn_to_valid_json_and_stops_only_when_complete(constrained):
    # After a key the model prefers to close the object: not valid yet, so ':' wins.
    assert constrained('search\n{"type"', ["}", ":"]) == ":"
    # Unknown keys are refused when the schema is given.
    assert constrained('search\n{"', ["name", "type"]) == "type"
    # The end of the turn only once the object is closed.
    assert constrained('search\n{"type": "x"', ["<|im_end|>", "}"]) == "}"
    assert constrained('search\n{"type": "x"}', ["<|im_end|>", ","]) == "<|im_end|>"


def test_processor_leaves_other_roles_and_hopeless_rows_alone(constrained):
    assert constrained("assistant\nsure", ["}", "!"]) == "}"  # a reply is free text
    assert constrained("sear", ["}", "ch"]) == "}"  # the role is still being written
    # No candidate fits (all top-k break the JSON): the row stays free instead of stalling.
    assert constrained('search\n{"type"', ["}", "]", "x"]) == "}"


def test_generation_applies_the_constraint_only_when_asked(qwen2_tokenizer, monkeypatch):
    from conftest import tiny_llama
    from tunelab.model import constrain
    from tunelab.model.generate import GenerationOptions, generate_batch

    calls = []
    original = constrain.JsonAfterMarker.__call__

    def spy(self, input_ids, scores):
        calls.append((self.marker, self.width, self.keys, input_ids.shape[1]))
        return original(self, input_ids, scores)

    monkeypatch.setattr(constrain.JsonAfterMarker, "__call__", spy)
    model = tiny_llama(qwen2_tokenizer)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    plain = generate_batch(model, qwen2_tokenizer, prompts, GenerationOptions(max_new_tokens=3), progress=False)
    assert calls == []
    options = GenerationOptions(max_new_tokens=3, json_after="search\n", json_keys=("type",))
    constrained = generate_batch(model, qwen2_tokenizer, prompts, options, progress=False)
    assert [c[:3] for c in calls[:1]] == [("search\n", 5, frozenset({"type"}))]
    assert [c[3] for c in calls] == [5, 6, 7]  # prompt width, then one more token per step
    # A random model never writes "search\n": the constraint leaves its output as it was.
    assert [g.token_ids for g in constrained] == [g.token_ids for g in plain]


def test_eval_constrain_json_uses_the_tasks_marker_and_slots(tmp_path, tiny_model_dir, hotel_dir):
    from tunelab.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(hotel_dir / "test.jsonl"), "--task", "hotel",
                 "--limit", "2", "--max-new-tokens", "3", "--constrain-json", "--output-dir", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    generation = json.loads((out / "scores.json").read_text())["generation"]
    assert generation["json_after"] == "search\n" and "price_range_lower" in generation["json_keys"]
