"""Metrics against their reference implementations (nltk, rouge-score, sacrebleu) and by hand."""

from __future__ import annotations

import json
import random

import pytest

from tunelab.evaluate.metrics import (
    corpus_bleu,
    exact_match,
    rouge_f1,
    rouge_scores,
    sentence_bleu4_char,
    sentence_bleu4_chars,
    slot_counts,
    slot_scores,
)


def hotel_turns(hotel_dir, role: str, limit: int) -> list[dict]:
    turns = []
    with open(hotel_dir / "test.jsonl", encoding="utf-8") as f:
        for line in f:
            response = json.loads(json.loads(line)["response"])
            if response["role"] == role:
                turns.append(response)
            if len(turns) == limit:
                break
    return turns


@pytest.fixture(scope="module")
def zh_pairs(hotel_dir) -> list[tuple[str, str]]:
    """Real assistant replies and plausible wrong predictions (cut, reordered, altered)."""
    refs = [t["content"] for t in hotel_turns(hotel_dir, "assistant", 12)]
    corruptions = [lambda r: r[: len(r) // 2], lambda r: r[::-1], lambda r: r.replace("酒店", "宾馆"),
                   lambda r: r + "祝您入住愉快！", lambda r: r[:3], lambda r: r]
    return [(corruptions[i % len(corruptions)](r), r) for i, r in enumerate(refs)]


# --- BLEU ----------------------------------------------------------------------------

def nltk_recipe_bleu(pred: str, ref: str) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    pred, ref = pred.strip(), ref.strip()
    if not pred or not ref:
        return 0.0
    return sentence_bleu([list(ref)], list(pred), smoothing_function=SmoothingFunction().method3)


def test_char_bleu4_equals_the_recipes_nltk_call_on_real_replies(zh_pairs):
    preds, refs = zip(*zh_pairs)
    expected = 100 * sum(nltk_recipe_bleu(p, r) for p, r in zh_pairs) / len(zh_pairs)
    assert sentence_bleu4_chars(preds, refs) == pytest.approx(expected, abs=1e-6)
    assert 0 < expected < 100  # the cases mix partial and full matches


def test_char_bleu4_equals_nltk_on_short_and_repetitive_strings():
    # short sides (no 3-/4-grams: smoothing), repeats (clipping), no overlap (0), longer hypothesis (bp=1)
    rng = random.Random(0)
    def text() -> str:
        return "".join(rng.choices("好的酒店ab", k=rng.randint(1, 9)))

    pairs = [(text(), text()) for _ in range(200)]
    pairs += [("好好好好好", "好的"), ("xyz", "好的"), ("好的酒店很好很好", "好的酒店")]
    for pred, ref in pairs:
        assert sentence_bleu4_char(pred, ref) == pytest.approx(nltk_recipe_bleu(pred, ref), abs=1e-9), (pred, ref)


def test_char_bleu4_edges():
    assert sentence_bleu4_char("你好世界", "你好世界") == pytest.approx(1.0)
    assert sentence_bleu4_char("", "你好") == 0.0
    assert sentence_bleu4_char("你好", "  ") == 0.0
    assert sentence_bleu4_char("好", "你好吗") > 0  # shorter than a 4-gram: smoothed, not an error
    assert sentence_bleu4_char("你好世界\n", " 你好世界") == pytest.approx(1.0)  # stripped like the recipe
    # an empty prediction scores 0 and stays in the mean
    assert sentence_bleu4_chars(["你好世界", ""], ["你好世界", "再见"]) == pytest.approx(50.0)


def test_corpus_bleu_picks_sacrebleus_tokenizer_by_script(zh_pairs):
    import sacrebleu

    preds, refs = map(list, zip(*zh_pairs))
    zh = sacrebleu.corpus_bleu(preds, [refs], tokenize="zh").score
    assert corpus_bleu(preds, refs) == pytest.approx(zh, abs=1e-6)
    assert corpus_bleu(preds, refs, tokenize="13a") != pytest.approx(zh)
    en_p, en_r = ["the cat sat on the mat", "a dog ran"], ["the cat is on the mat", "a dog ran away"]
    assert corpus_bleu(en_p, en_r) == pytest.approx(sacrebleu.corpus_bleu(en_p, [en_r]).score, abs=1e-6)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        sentence_bleu4_chars(["a", "b"], ["a"])


# --- ROUGE ---------------------------------------------------------------------------

ENGLISH = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("Running dogs are running fast!", "a dog runs fast"),
    ("completely different words", "nothing shared here"),
    ("", "an empty prediction"),
]


@pytest.mark.parametrize("stem", [False, True])
def test_rouge_matches_rouge_score_on_english(stem):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stem)
    for pred, ref in ENGLISH:
        ours = rouge_f1(pred, ref, use_stemmer=stem)
        theirs = scorer.score(ref, pred)
        for name in ours:
            assert ours[name] == pytest.approx(theirs[name].fmeasure, abs=1e-6), (pred, name)


def test_rouge_on_chinese_counts_characters():
    scores = rouge_f1("我喜欢猫", "我喜欢狗")
    assert scores["rouge1"] == pytest.approx(3 / 4)  # 我 喜 欢 of four characters each
    assert scores["rouge2"] == pytest.approx(2 / 3)  # 我喜 喜欢 of three bigrams each
    assert scores["rougeL"] == pytest.approx(3 / 4)
    # Latin inside Chinese stays one lower-cased word; punctuation is dropped.
    assert rouge_f1("有WiFi吗？", "有wifi")["rouge1"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    # rouge-score's own tokenizer would see no tokens at all in Chinese
    assert rouge_f1("我喜欢猫", "我喜欢狗", tokenizer="default")["rouge1"] == 0.0


def test_rouge_jieba_counts_words():
    scores = rouge_f1("我喜欢猫", "我喜欢狗", tokenizer="jieba")  # 我 / 喜欢 / 猫
    assert scores["rouge1"] == pytest.approx(2 / 3)


def test_rouge_scores_averages_x100_with_empty_as_zero():
    out = rouge_scores(["我喜欢猫", ""], ["我喜欢猫", "你好"])
    assert out == pytest.approx({"rouge1": 50.0, "rouge2": 50.0, "rougeL": 50.0})
    with pytest.raises(ValueError):
        rouge_f1("a", "b", tokenizer="spacy")


# --- slots ---------------------------------------------------------------------------

def test_slots_follow_the_recipes_counting():
    ref = {"type": "经济型", "rating_range_lower": 4.0, "facilities": ["wifi", "叫醒服务"], "name": None}
    # 4 == 4.0; one of two facilities; a wrong extra slot
    pred = '{"type": "经济型", "rating_range_lower": 4, "facilities": ["wifi"], "price_range_upper": 500}'
    assert slot_counts(pred, ref).__dict__ == {"correct": 3, "predicted": 4, "expected": 4}
    assert slot_counts("not json {", ref).__dict__ == {"correct": 0, "predicted": 0, "expected": 4}
    assert slot_counts('["a list"]', ref).predicted == 0  # JSON but not an object
    # a None prediction is a slot that matches nothing; booleans are not numbers
    assert slot_counts({"name": None, "x": True}, {"x": 1}).__dict__ == {"correct": 0, "predicted": 2, "expected": 1}
    # repeating a right element earns one match only
    assert slot_counts({"facilities": ["wifi", "wifi"]}, {"facilities": ["wifi"]}).correct == 1


def test_slot_scores_pool_counts_over_turns():
    refs = [{"type": "a"}, {"type": "b", "facilities": ["x", "y", "z"]}]
    preds = ['{"type": "a"}', '{"type": "c", "facilities": ["x"]}']
    out = slot_scores(preds, refs)
    precision, recall = 2 / 3, 2 / 5  # pooled: 2 right of 3 predicted, of 5 expected
    assert out["slot_precision"] == pytest.approx(100 * precision)
    assert out["slot_recall"] == pytest.approx(100 * recall)
    assert out["slot_f1"] == pytest.approx(100 * 2 * precision * recall / (precision + recall))
    assert slot_scores(["{}"], [{}])["slot_f1"] == 0.0


def test_slots_on_real_search_turns_rendered_as_the_recipe_renders(hotel_dir):
    turns = hotel_turns(hotel_dir, "search", 30)
    refs = [t["arguments"] for t in turns]
    rendered = [json.dumps({k: v for k, v in a.items() if v is not None}, indent=4, ensure_ascii=False) for a in refs]
    assert slot_scores(rendered, refs)["slot_f1"] == pytest.approx(100.0)
    half = rendered[:15] + ["I cannot help"] * 15
    out = slot_scores(half, refs)
    assert out["slot_precision"] == pytest.approx(100.0) and out["slot_recall"] < 100.0


# --- exact match, token accuracy, perplexity ------------------------------------------

def test_exact_match_normalisation():
    preds, refs = ["Hello  World\n", "hello world"], ["Hello World", "Hello World"]
    assert exact_match(preds, refs) == 0.0
    assert exact_match(preds, refs, ignore_space=True) == 50.0
    assert exact_match(preds, refs, ignore_space=True, ignore_case=True) == 100.0
