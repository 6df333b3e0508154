"""Evaluation tasks: reading samples and scoring predictions (no model involved)."""

from __future__ import annotations

import json

import pytest

from tunelab.errors import TunelabError
from tunelab.evaluate.metrics import sentence_bleu4, sentence_bleu4_char
from tunelab.evaluate.runner import parse_metrics, score
from tunelab.evaluate.tasks import get_task
from tunelab.evaluate.tasks.hotel import split_role


def rows_for(samples, predictions):
    return [{"reference": s.reference, "prediction": p, "meta": s.meta} for s, p in zip(samples, predictions)]


@pytest.fixture(scope="module")
def hotel_samples(hotel_dir):
    return get_task("hotel").load(hotel_dir / "test.jsonl", limit=5)


def test_hotel_samples_are_the_rows_context_and_next_turn(hotel_samples, hotel_dir):
    first = json.loads((hotel_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    response = json.loads(first["response"])
    sample = hotel_samples[0]
    assert len(hotel_samples) == 5
    assert [m.role for m in sample.prompt] == ["user"]
    assert sample.meta == {"role": "search", "arguments": response["arguments"]}
    assert sample.reference == "search\n" + json.dumps(response["arguments"], indent=4, ensure_ascii=False)
    assert sample.source.endswith("test.jsonl:1")
    reply = hotel_samples[1]
    assert reply.meta == {"role": "assistant"}
    assert reply.reference == "assistant\n" + json.loads(
        json.loads((hotel_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()[1])["response"])["content"]
    assert [m.role for m in reply.prompt] == ["user", "search", "return"]


def test_hotel_perfect_predictions_score_100(hotel_samples):
    task = get_task("hotel")
    rows = rows_for(hotel_samples, [s.reference for s in hotel_samples])
    summary = score(task, rows, task.default_metrics)
    assert summary["slot_f1"] == pytest.approx(100.0)
    assert summary["bleu4"] == pytest.approx(100.0)
    assert summary["role_accuracy"] == 100.0 and summary["empty_predictions"] == 0
    assert summary["search_rows"] + summary["assistant_rows"] == 5


def test_hotel_scoring_follows_the_recipe():
    task = get_task("hotel")
    ref_args = {"type": "经济型", "facilities": ["叫醒服务", "wifi"], "rating_range_lower": 4.0}
    search_ref = "search\n" + json.dumps(ref_args, ensure_ascii=False)
    rows = [
        # right role, two of four slots right (4 == 4.0), one wrong value
        {"reference": search_ref, "meta": {"role": "search", "arguments": ref_args},
         "prediction": 'search\n{"type": "豪华型", "facilities": ["wifi"], "rating_range_lower": 4}'},
        # valid JSON arguments but the model answered as the assistant: not a search -> {}
        {"reference": search_ref, "meta": {"role": "search", "arguments": ref_args},
         "prediction": 'assistant\n{"type": "经济型"}'},
        # a search whose JSON does not parse -> {}
        {"reference": search_ref, "meta": {"role": "search", "arguments": ref_args},
         "prediction": 'search\n{"type": "经济型",'},
        {"reference": "assistant\n好的，推荐如家酒店。", "meta": {"role": "assistant"},
         "prediction": "assistant\n好的，推荐汉庭酒店。"},
        {"reference": "assistant\n有的。", "meta": {"role": "assistant"}, "prediction": "   "},
    ]
    summary = score(task, rows, ("slots", "bleu"))
    assert (summary["slot_correct"], summary["slot_predicted"], summary["slot_expected"]) == (2, 3, 12)
    precision, recall = 2 / 3, 2 / 12
    assert summary["slot_precision"] == pytest.approx(100 * precision)
    assert summary["slot_f1"] == pytest.approx(100 * 2 * precision * recall / (precision + recall))
    expected_bleu = (sentence_bleu4_char("好的，推荐汉庭酒店。", "好的，推荐如家酒店。") + 0.0) / 2
    assert summary["bleu4"] == pytest.approx(100 * expected_bleu)
    assert rows[3]["scores"]["bleu4"] == pytest.approx(100 * expected_bleu * 2)
    assert rows[4]["scores"] == {"role_correct": False, "empty": True, "bleu4": 0.0}
    assert summary["empty_predictions"] == 1
    assert summary["role_accuracy"] == pytest.approx(100 * 3 / 5)
    assert split_role("search\n{}") == ("search", "{}") and split_role("no role line") == ("no role line", "")


def test_hotel_role_line_with_nothing_after_it_is_an_empty_answer():
    task = get_task("hotel")
    rows = [{"reference": "assistant\n有的。", "meta": {"role": "assistant"}, "prediction": "assistant\n"},
            {"reference": "assistant\n有的。", "meta": {"role": "assistant"}, "prediction": "assistant\n  \n"},
            {"reference": "assistant\n有的。", "meta": {"role": "assistant"}, "prediction": "assistant\n有"}]
    summary = score(task, rows, ("bleu",))
    assert [r["scores"]["empty"] for r in rows] == [True, True, False]
    assert summary["empty_predictions"] == 2


def test_hotel_rows_without_meta_take_the_role_and_arguments_from_the_reference():
    task = get_task("hotel")
    ref_args = {"type": "经济型", "rating_range_lower": 4.0}
    rows = [{"reference": "search\n" + json.dumps(ref_args, ensure_ascii=False),
             "prediction": 'search\n{"type": "经济型"}'},
            {"reference": "assistant\n好的。", "prediction": "assistant\n好的。", "meta": {}}]
    summary = score(task, rows, ("slots", "bleu"))
    assert rows[0]["meta"] == {"role": "search", "arguments": ref_args}
    assert (summary["slot_correct"], summary["slot_expected"]) == (1, 2) and summary["role_accuracy"] == 100.0
    with pytest.raises(TunelabError, match="not JSON"):
        score(task, [{"reference": "search\n{oops", "prediction": "search\n{}", "source": "p.jsonl:3"}], ("slots",))


def test_generic_bleu_counts_words_for_english_and_characters_for_cjk():
    import nltk.translate.bleu_score as nltk_bleu

    task = get_task("generic")
    english = ("the cat sat on the mat today", "the cat sat on a mat today")
    rows = [{"reference": english[1], "prediction": english[0], "meta": {}}]
    summary = score(task, rows, ("bleu",))
    words = nltk_bleu.sentence_bleu([english[1].split()], english[0].split(),
                                    smoothing_function=nltk_bleu.SmoothingFunction().method3)
    assert summary["bleu4"] == pytest.approx(100 * words)
    assert words != pytest.approx(sentence_bleu4_char(*english))  # what it used to report
    assert summary["bleu4_unit"] == "words"
    cjk = [{"reference": "天气很好", "prediction": "天气不错", "meta": {}}]
    summary = score(task, cjk, ("bleu",))
    assert summary["bleu4"] == pytest.approx(100 * sentence_bleu4_char("天气不错", "天气很好"))
    assert summary["bleu4_unit"] == "characters (CJK text)"
    assert sentence_bleu4("a b c d", "a b c d", unit="word") == pytest.approx(1.0)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_generic_reference_is_the_last_assistant_turn(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "Paris."}]},
    ])
    (sample,) = get_task("generic").load(data)
    assert sample.reference == "Paris."
    assert [m.role for m in sample.prompt] == ["system", "user", "assistant", "user"]
    assert sample.conversation().messages[-1].is_target()
    assert not any(m.is_target() for m in sample.conversation().messages[:-1])


def test_generic_rows_without_a_reference_are_named(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello",
                                                           "weight": 0}]},
    ])
    with pytest.raises(TunelabError) as err:
        get_task("generic").load(data)
    assert "chat.jsonl:2" in err.value.where and "no assistant answer" in err.value.what
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain pre-training text"}])
    with pytest.raises(TunelabError) as err:
        get_task("generic").load(text)
    assert "text.jsonl:1" in err.value.where and "reference" in err.value.what


def test_generic_metrics_and_empty_predictions():
    task = get_task("generic")
    rows = [{"reference": "The cat sat.", "prediction": "The cat sat.", "meta": {}},
            {"reference": "天气很好", "prediction": "天气不错", "meta": {}},
            {"reference": "Yes", "prediction": "", "meta": {}}]
    summary = score(task, rows, ("bleu", "rouge", "em"))
    assert summary["exact_match"] == pytest.approx(100 / 3)
    assert rows[0]["scores"]["rouge1"] == pytest.approx(100.0)
    assert rows[1]["scores"]["rouge1"] == pytest.approx(50.0)  # CJK is compared by character
    assert rows[2]["scores"] == {"empty": True, "bleu4": 0.0, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0,
                                 "exact_match": 0.0}
    assert summary["empty_predictions"] == 1 and summary["samples"] == 3
    assert summary["rouge1"] == pytest.approx((100 + 50 + 0) / 3)


def test_unknown_task_metric_and_missing_losses_are_user_errors():
    with pytest.raises(TunelabError, match="did you mean --task hotel"):
        get_task("hotle")
    with pytest.raises(TunelabError, match="choose from slots,bleu,ppl"):
        parse_metrics(get_task("hotel"), "slots,rouge")
    assert parse_metrics(get_task("generic"), "BLEU, ppl") == ("bleu", "ppl")
    with pytest.raises(TunelabError, match="perplexity"):
        score(get_task("generic"), [{"reference": "a", "prediction": "a", "meta": {}}], ("ppl",))


def test_hotel_reward_is_the_task_score_of_one_completion():
    """What grpo / ppo optimise with `reward: hotel` is what `tunelab eval --task hotel` measures."""
    from tunelab.evaluate.tasks import get_task

    reward = get_task("hotel").reward
    search = 'search\n{"type": "经济型", "rating_range_lower": 4.0}'
    assert reward("", search, search) == pytest.approx(1.0)
    assert reward("", 'search\n{"type": "经济型"}', search) == pytest.approx(0.2 + 0.2 + 0.6 * 2 / 3)  # F1 2/3
    assert reward("", "search\n{not json", search) == pytest.approx(0.2)  # right role only
    assert reward("", "assistant\n好的", search) == 0.0  # wrong role
    assert reward("", "assistant\n好的，推荐这家。", "assistant\n好的，推荐这家。") == pytest.approx(1.0)
    same = "the very same words again"  # word-level BLEU-4 for English text, as the generic headline bleu4
    assert get_task("generic").reward("", same, same) == pytest.approx(1.0)


def test_lend_reward_gives_the_task_score_for_reward_task():
    """`reward: hotel` (grpo / ppo): what the CLI and the Python API lend training is the task's own score."""
    from tunelab.config import TunelabConfig
    from tunelab.evaluate.tasks import lend_reward

    reward = lend_reward(TunelabConfig(stage="grpo", reward="hotel"))
    right = 'search\n{"name": "北京饭店"}'
    assert reward("p", right, right) == pytest.approx(1.0)
    assert reward("p", "assistant\n好的", right) == 0.0  # the wrong role
