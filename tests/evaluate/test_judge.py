"""LLM-as-judge against a fake OpenAI-compatible server on 127.0.0.1 (a plain http.server)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tunelab.errors import TunelabError
from tunelab.evaluate.judge import (
    DEFAULT_DIMENSIONS,
    Dimension,
    JudgeEndpointError,
    JudgeItem,
    JudgeSettings,
    judge,
    parse_dimensions,
    parse_judgement,
)


class FakeJudge:
    """Answers chat completions; `script` lists statuses to send before answering normally."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list[int] = []
        self.answer = lambda prompt: '{"correctness": 4, "helpfulness": 5, "fluency": 3, "reason": "ok"}'
        self.down_after: int | None = None  # answer this many requests, then 503 forever
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                served = sum(1 for r in fake.requests[:-1] if r.get("ok"))
                if fake.script:
                    return self.reply(fake.script.pop(0), {"error": "scripted"})
                if fake.down_after is not None and served >= fake.down_after:
                    return self.reply(503, {"error": "down"})
                fake.requests[-1]["ok"] = True
                content = fake.answer(body["messages"][-1]["content"])
                self.reply(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

            def reply(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def fake():
    server = FakeJudge()
    yield server
    server.server.shutdown()
    server.server.server_close()


ITEMS = [JudgeItem("有wifi的酒店？", "北京饭店有wifi。", "北京饭店提供wifi。"),
         JudgeItem("评分4分以上？", "推荐京仪大酒店。", "抱歉我不知道。"),
         JudgeItem("经济型酒店？", "如家不错。", "如家。")]


def settings(url, tmp_path=None, **kw) -> JudgeSettings:
    base = dict(base_url=url, model="judge-1", api_key="sk-test", backoff_s=0.01, max_retries=2,
                requests_per_second=0, timeout_s=5, cache_dir=tmp_path / "cache" if tmp_path else None)
    return JudgeSettings(**{**base, **kw})


def test_scores_items_and_keeps_unreadable_answers(fake, tmp_path):
    answers = {"北京饭店提供wifi":
               'Sure! ```json\n{"Correctness": "5", "helpfulness": 4.0, "fluency": 9, "reason": "same facts"}\n```',
               "抱歉我不知道": "I would give it a two.",
               "如家。": '{"correctness": 3, "helpfulness": 3}'}
    fake.answer = lambda prompt: next(v for k, v in answers.items() if k in prompt)
    out = judge(ITEMS, settings(fake.url, tmp_path), results_path=tmp_path / "judge.jsonl")
    first, second, third = out.judgements
    assert first.scores == {"correctness": 5, "helpfulness": 4, "fluency": 5}  # 9 clamped to 5
    assert first.reason == "same facts"
    assert second.scores is None and "no JSON object" in second.error and second.raw == "I would give it a two."
    assert third.scores is None and "fluency" in third.error
    assert out.summary() == {"scored": 3, "total": 3, "unparseable": 2, "cached": 0,
                             "mean": {"correctness": 5, "helpfulness": 4, "fluency": 5}}
    request = fake.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "judge-1" and "correctness (1-5)" in request["body"]["messages"][-1]["content"]
    rows = [json.loads(line) for line in (tmp_path / "judge.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and rows[1]["raw"] == "I would give it a two."


def test_retries_after_500_and_429(fake):
    fake.script = [500, 429]
    out = judge(ITEMS[:1], settings(fake.url))
    assert len(fake.requests) == 3 and out.judgements[0].scores["correctness"] == 4


def test_cache_makes_a_rerun_free(fake, tmp_path):
    first = judge(ITEMS, settings(fake.url, tmp_path))
    assert len(fake.requests) == 3
    again = judge(ITEMS, settings(fake.url, tmp_path))
    assert len(fake.requests) == 3  # nothing sent
    assert all(j.cached for j in again.judgements) and again.mean_scores() == first.mean_scores()
    judge(ITEMS, settings(fake.url, tmp_path, model="judge-2"))  # another judge model is another key
    assert len(fake.requests) == 6


def test_endpoint_going_down_keeps_partial_results(fake, tmp_path):
    fake.down_after = 1
    results = tmp_path / "judge.jsonl"
    with pytest.raises(JudgeEndpointError) as caught:
        judge(ITEMS, settings(fake.url, tmp_path), results_path=results)
    err = caught.value
    assert isinstance(err, TunelabError) and err.where == fake.url
    assert "scored 1 of 3" in err.what and str(results) in err.what and "HTTP 503" in err.what
    assert len(results.read_text().splitlines()) == 1 and len(err.partial.judgements) == 1
    assert len(fake.requests) == 1 + 3  # the first try and two retries of the second item, then stop
    fake.down_after = None  # back up: the rerun asks only for what is missing
    out = judge(ITEMS, settings(fake.url, tmp_path), results_path=results)
    assert len(fake.requests) == 4 + 2 and out.summary()["cached"] == 1


def test_unreachable_endpoint_is_a_clear_error(fake):
    url = fake.url
    fake.server.shutdown()
    fake.server.server_close()
    with pytest.raises(JudgeEndpointError, match=r"no answer after 2 tries .*scored 0 of 3"):
        judge(ITEMS, settings(url, max_retries=1))


def test_concurrent_workers_keep_item_order(fake):
    fake.answer = lambda prompt: json.dumps({"correctness": 1 + 2 * ("北京饭店提供" in prompt),
                                             "helpfulness": 2, "fluency": 2})
    out = judge(ITEMS, settings(fake.url, concurrency=3))
    assert [j.index for j in out.judgements] == [0, 1, 2]
    assert [j.scores["correctness"] for j in out.judgements] == [3, 1, 1]


def test_bad_key_is_not_retried(fake):
    fake.script = [401]
    with pytest.raises(TunelabError, match="API key"):
        judge(ITEMS, settings(fake.url))
    assert len(fake.requests) == 1


def test_parse_judgement_finds_the_rubric_object():
    dims = (Dimension("accuracy", "right?", 0, 10),)
    text = 'Thinking {"draft": true} ... final: {"accuracy": "7/10", "reason": "close"}'
    assert parse_judgement(text, dims) == ({"accuracy": 7.0}, "close", None)
    assert parse_judgement('{"accuracy": -3}', dims)[0] == {"accuracy": 0}
    assert parse_judgement('{"accuracy": "high"}', dims)[0] is None


def test_parse_dimensions():
    assert parse_dimensions("correctness, fluency") == (DEFAULT_DIMENSIONS[0], DEFAULT_DIMENSIONS[2])
    custom = parse_dimensions("politeness=Is it polite, warm?; brevity=Is it short?")
    assert [d.name for d in custom] == ["politeness", "brevity"] and custom[0].description == "Is it polite, warm?"
    with pytest.raises(TunelabError, match="did you mean 'correctness'"):
        parse_dimensions("correctnes")


def test_rate_limiter_spaces_requests(monkeypatch):
    from tunelab.evaluate import judge as module

    slept: list[float] = []
    monkeypatch.setattr(module.time, "monotonic", lambda: 100.0)  # three calls at the same instant
    monkeypatch.setattr(module.time, "sleep", slept.append)
    limiter = module.RateLimiter(2.0)
    for _ in range(3):
        limiter.wait()
    assert slept == pytest.approx([0.0, 0.5, 1.0])


def test_judge_as_a_reward_scales_the_rubric_and_fills_unreadable_answers(fake, tmp_path, caplog):
    """reward: judge (grpo / ppo): the rubric's mean scaled to [0, 1]; one rollout is one batch of
    requests; an unreadable answer gets its batch's mean, neither reward nor punishment."""
    from tunelab.config import TunelabConfig
    from tunelab.evaluate.judge import JudgeReward
    from tunelab.evaluate.tasks import lend_reward
    from tunelab.train.objectives.rl import PromptRow, Scorer

    answers = {"A1": '{"correctness": 5, "helpfulness": 4, "fluency": 5}', "A2": "no idea",
               "A3": '{"correctness": 1, "helpfulness": 1, "fluency": 1}'}
    fake.answer = lambda prompt: next(v for k, v in answers.items() if k in prompt)
    reward = JudgeReward(settings(fake.url, tmp_path))
    values = reward.batch(["q1", "q2", "q3"], ["A1", "A2", "A3"], ["r1", "r2", "r3"])
    top = (1 + 0.75 + 1) / 3
    assert values == pytest.approx([top, top / 2, 0.0]) and reward.unreadable == 1
    assert "judge: 1 of 3 answers of this rollout unreadable" in caplog.text  # said in the run log, not only counted
    assert len(fake.requests) == 3

    cfg = TunelabConfig(stage="grpo", reward="judge", judge_url=fake.url, judge_model="judge-1")
    lent = lend_reward(cfg)
    assert isinstance(lent, JudgeReward) and lent.settings.model == "judge-1"
    assert lent.settings.cache_dir.name == "judge" and lent.settings.concurrency == 8  # JudgeSettings.for_endpoint
    lent.settings.cache_dir = tmp_path / "cache2"
    rows = [PromptRow([1], "q1", "r1", "a"), PromptRow([2], "q3", "r3", "b")]
    assert Scorer(cfg, lent, "cpu")(rows, [[5], [6]], ["A1", "A3"]) == pytest.approx([top, 0.0])
    assert len(fake.requests) == 5  # the Scorer sent its rollout as one batch through the judge


def test_judge_keys_go_with_reward_judge():
    from tunelab.config import TunelabConfig
    from tunelab.train.objectives.rl import check_judge_keys

    with pytest.raises(TunelabError, match="reward: judge needs judge_url and judge_model"):
        check_judge_keys(TunelabConfig(stage="grpo", reward="judge", judge_model="m"))
    with pytest.raises(TunelabError, match="set but reward is 'hotel'"):
        check_judge_keys(TunelabConfig(stage="grpo", reward="hotel", judge_url="http://x/v1"))
    check_judge_keys(TunelabConfig(stage="grpo", reward="judge", judge_url="http://x/v1", judge_model="m"))
