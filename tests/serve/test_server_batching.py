"""The continuous-batching engine: requests join a running batch, answers equal the request
alone, mixed adapters, a bounded queue, timeouts and cancellation when the client leaves."""

from __future__ import annotations

import queue
import socket
import time

import httpx
import openai
import pytest
import torch
from serving import CONTEXT, KEY, alone, running, tiny_engine

from conftest import shared_tokenizer, tiny_llama
from tunelab.data.types import Message
from tunelab.model.generate import GenerationOptions
from tunelab.serve.batching import Batcher, Job, QueueFull, SlotBatcher
from tunelab.serve.engine import load_engine
from tunelab.serve.server import Limits, create_app

QUESTIONS = ["Tell me about hotels.", "Hello, who are you?", "What is two plus two?", "Write a poem.",
             "A room for two, please.", "Is breakfast included?"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_engine(tiny_model_dir, tmp_path_factory.mktemp("adapters"))


def job(engine, question: str, adapter: str | None, max_tokens: int, **options) -> tuple[Job, queue.Queue]:
    events: queue.Queue = queue.Queue()
    prompt = engine.encode([Message("user", question)])
    return Job(prompt=prompt, options=GenerationOptions(max_new_tokens=max_tokens, **options), emit=events.put,
               adapter=adapter, stop_ids=frozenset(engine.stop_ids)), events


def finish(events: queue.Queue) -> str:
    while True:
        kind, value = events.get(timeout=60)
        if kind != "token":
            return value


def wait_for(condition, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_requests_joining_a_running_batch_answer_as_alone(engine):
    """Jobs of three models arrive while others decode: every answer equals its request alone."""
    batcher = Batcher(engine, max_batch=8)
    models = ["alpha", None, "beta", "alpha", None, "beta"]
    lengths = [40, 12, 25, 7, 30, 18]
    try:
        first = [job(engine, QUESTIONS[0], models[0], lengths[0])]
        batcher.submit([first[0][0]])
        wait_for(lambda: len(first[0][0].tokens) >= 3, "the first job to decode")
        rest = [job(engine, q, m, n) for q, m, n in zip(QUESTIONS[1:], models[1:], lengths[1:])]
        batcher.submit([j for j, _ in rest[:2]])
        wait_for(lambda: len(rest[0][0].tokens) >= 2, "the second wave")
        batcher.submit([j for j, _ in rest[2:]])  # joins a batch whose cache is longer than its prompt
        jobs = first + rest
        reasons = [finish(events) for _, events in jobs]
    finally:
        batcher.close()
    assert set(reasons) <= {"stop", "length"}
    for (j, _), model, question, n in zip(jobs, models, QUESTIONS, lengths):
        want = alone(engine, model, [{"role": "user", "content": question}], n)
        assert engine.tokenizer.decode(j.tokens, skip_special_tokens=True) == want, (model, question)


@pytest.fixture(scope="module")
def base_engine(tmp_path_factory):
    """The base model alone, with weights 5x the default scale: the default tiny model's greedy
    answer is one token repeated whatever the context, so a wrong cache row would go unseen."""
    tokenizer = shared_tokenizer("qwen2")
    folder = tmp_path_factory.mktemp("context-sensitive")
    tiny_llama(tokenizer, initializer_range=0.1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_engine(str(folder), device="cpu", dtype="float32", context_length=CONTEXT)


@pytest.mark.parametrize("kind", ["dynamic cache", "static slots", "static slots, padded buckets"])
def test_staggered_requests_of_different_lengths_equal_each_alone_in_fp32(base_engine, kind):
    """fp32 on the CPU: no batch-shape rounding can flip a token, so any difference from the
    request alone is a real bug (positions, padding, a cache row or slot of another request).
    Prompts of 20 to 83 tokens join in three waves while others decode; two jobs are equal
    (the n choices of one request) and one stops early to free its row for a later one."""
    engine = base_engine
    if kind == "dynamic cache":
        batcher = Batcher(engine, max_batch=4)
    else:
        batcher = SlotBatcher(engine, max_batch=4, use_graph=False)
        # What a GPU replays: rows and columns rounded up to a graph's bucket (free rows, unused columns).
        batcher.decoder.bucketed = kind.endswith("buckets")
    questions = ["Hi.", "Tell me about hotels " + "and rooms " * 30, "What is two plus two?",
                 "Write " + "a long poem " * 12, "Hi.", "Is breakfast included in the price of a room?"]
    lengths = [30, 12, 3, 25, 30, 18]
    jobs = [job(engine, q, None, n) for q, n in zip(questions, lengths)]
    try:
        batcher.submit([jobs[0][0]])
        wait_for(lambda: len(jobs[0][0].tokens) >= 4, "the first job to decode")
        batcher.submit([j for j, _ in jobs[1:3]])
        wait_for(lambda: len(jobs[1][0].tokens) >= 2, "the second wave")
        batcher.submit([j for j, _ in jobs[3:]])  # more jobs than free rows: one waits for a row to free
        reasons = [finish(events) for _, events in jobs]
    finally:
        batcher.close()
    assert set(reasons) <= {"stop", "length"}
    for (j, _), question, n in zip(jobs, questions, lengths):
        want = alone(engine, None, [{"role": "user", "content": question}], n)
        assert engine.tokenizer.decode(j.tokens, skip_special_tokens=True) == want, (kind, question)


def test_seeded_sampling_is_reproducible_inside_a_batch(engine):
    batcher = Batcher(engine)
    try:
        runs = []
        for _ in range(2):
            pair = [job(engine, QUESTIONS[0], "alpha", 8, temperature=0.9, top_p=0.95, seed=7),
                    job(engine, QUESTIONS[1], None, 8)]
            batcher.submit([j for j, _ in pair])
            for _, events in pair:
                finish(events)
            runs.append([j.tokens for j, _ in pair])
    finally:
        batcher.close()
    assert runs[0] == runs[1]


def test_the_queue_is_bounded(engine):
    batcher = Batcher(engine, max_batch=1, max_waiting=2)
    try:
        long = [job(engine, QUESTIONS[0], None, 200) for _ in range(2)]
        batcher.submit([j for j, _ in long])
        with pytest.raises(QueueFull):
            batcher.submit([job(engine, QUESTIONS[1], None, 2)[0] for _ in range(2)])
    finally:
        for j, _ in long:
            j.cancel()
        batcher.close()


@pytest.fixture(scope="module")
def busy_url(engine):
    with running(create_app(engine, api_key=KEY, limits=Limits(max_waiting=2))) as url:
        yield url


def test_a_full_queue_is_429_and_a_timeout_408(engine, busy_url):
    client = openai.OpenAI(base_url=busy_url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:  # three choices never fit a queue of two
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], n=3,
                                       max_tokens=2)
    assert err.value.body["code"] == "rate_limit_exceeded"
    with running(create_app(engine, limits=Limits(request_timeout=1e-6))) as url:
        hurried = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        with pytest.raises(openai.APIStatusError, match="request-timeout") as err:
            hurried.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=50)
        assert err.value.status_code == 408


def captured_jobs(monkeypatch, app) -> list[Job]:
    jobs: list[Job] = []
    batcher = app.state.server.batcher
    real = batcher.submit
    monkeypatch.setattr(batcher, "submit", lambda js: (jobs.extend(js), real(js))[1])
    return jobs


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_stops_its_generation(engine, monkeypatch, stream):
    """Issue 21: an abandoned request kept generating all its tokens and delayed everyone after it."""
    from tunelab.model.generate import generate_batch

    with engine.using("alpha"):  # alone, this request runs its full 200 tokens
        [full] = generate_batch(engine.model, engine.tokenizer, [engine.encode([Message("user", "Hi")])],
                                GenerationOptions(max_new_tokens=200), stop_ids=engine.stop_ids, progress=False)
    assert full.finish_reason == "length"
    app = create_app(engine, api_key=KEY)
    jobs = captured_jobs(monkeypatch, app)
    with running(app) as url:
        host, port = url.split("//")[1].split("/")[0].split(":")
        body = ('{"model": "alpha", "max_tokens": 200, "temperature": 0, "stream": %s, '
                '"messages": [{"role": "user", "content": "Hi"}]}' % ("true" if stream else "false")).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head + body)
            wait_for(lambda: jobs and len(jobs[0].tokens) >= 2, "generation to start")
        # the client is gone: the job is cancelled and leaves the batch well before 200 tokens
        wait_for(lambda: app.state.server.batcher.load()["running"] == 0, "the batch to empty")
        assert jobs[0].cancelled and len(jobs[0].tokens) < 200
        status = httpx.get(url.replace("/v1", "/health")).json()
        assert status["running"] == 0 and status["waiting"] == 0


def test_dora_adapters_are_batched_one_adapter_at_a_time(tiny_model_dir, tmp_path):
    """PEFT cannot mix DoRA adapters in one forward: each batch holds one adapter, answers unchanged."""
    from conftest import tiny_lora_adapter
    from tunelab.serve.engine import load_engine

    adapters = {name: tiny_lora_adapter(tiny_model_dir, tmp_path / name, seed=seed, use_dora=True)
                for name, seed in (("alpha", 1), ("beta", 2))}
    engine = load_engine(str(tiny_model_dir), adapters, device="cpu", context_length=256)
    batcher = Batcher(engine)
    assert not batcher.mixed_adapters
    models = ["alpha", "beta", None, "alpha"]
    try:
        jobs = [job(engine, q, m, 8) for q, m in zip(QUESTIONS, models)]
        batcher.submit([j for j, _ in jobs])
        for _, events in jobs:
            finish(events)
    finally:
        batcher.close()
    for (j, _), model, question in zip(jobs, models, QUESTIONS):
        assert engine.tokenizer.decode(j.tokens, skip_special_tokens=True) == alone(
            engine, model, [{"role": "user", "content": question}], 8)


@pytest.mark.slow
def test_load_benchmark_runs_on_the_embedded_model():
    """bench/serve_load.py end to end (small): concurrent answers equal the one-at-a-time ones."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo / "src")}
    run = subprocess.run([sys.executable, str(repo / "bench" / "serve_load.py"), "--clients", "4", "--requests", "4",
                          "--max-tokens", "4", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert '"lost": 0, "mismatched": 0' in run.stdout


def test_the_load_benchmark_tells_a_late_divergence_from_a_crossed_answer(monkeypatch):
    """bench/serve_load.py: an answer that leaves its reference after a shared prefix is rounding
    (reported, not failed in bf16); one that reads like another prompt's reference is a bug."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "serve_load", bench)  # its dataclass looks its module up
    spec.loader.exec_module(bench)
    questions = ["hotels?", "trains?", "owls?", "tea?"]
    alone = ["The hotel is nice and big.", "Trains are fast machines that run.", "Owls hunt at night.", "Tea."]
    together = ["The hotel is nice but small.", "Trains are fast machines that run.",
                "The hotel is nice and big.", "Tea."]
    check = bench.compare(questions, alone, together, [False] * 4)
    assert check == {"mismatched": 2, "diverged": 1, "like_another": 1, "diverged_after_chars_p50": 18}
