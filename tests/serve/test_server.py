"""`tunelab serve` driven through the real openai client: two adapters, streaming, errors, concurrency."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from conftest import tiny_lora_adapter
from tunelab.data.types import Message
from tunelab.errors import TunelabError
from tunelab.model.generate import GenerationOptions, generate_batch
from tunelab.serve.engine import load_engine
from tunelab.serve.server import StopMatcher, check_port_free, create_app

KEY = "test-key"
CONTEXT = 256
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    adapters = {"alpha": tiny_lora_adapter(tiny_model_dir, folder / "alpha", seed=1),
                "beta": tiny_lora_adapter(tiny_model_dir, folder / "beta", seed=2)}
    return load_engine(str(tiny_model_dir), adapters, device="cpu", context_length=CONTEXT)


@pytest.fixture(scope="module")
def base_url(engine):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key=KEY), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=120)


def alone(engine, model: str, messages: list[dict], max_tokens: int) -> str:
    """The greedy answer computed directly, with nothing else running."""
    prompt = engine.encode([Message(m["role"], m["content"]) for m in messages])
    with engine.using(model):
        [gen] = generate_batch(engine.model, engine.tokenizer, [prompt], GenerationOptions(max_new_tokens=max_tokens),
                               stop_ids=engine.stop_ids, progress=False)
    return gen.text


def ask(client, model: str, messages=HELLO, **kw):
    return client.chat.completions.create(model=model, messages=messages, temperature=0, **kw)


def test_models_lists_base_and_adapters(client, engine):
    assert [m.id for m in client.models.list().data] == [engine.base_name, "alpha", "beta"]


def test_each_model_name_selects_its_adapter(client, engine, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    answers = {name: ask(client, name, max_tokens=6) for name in engine.model_names()}
    texts = {name: a.choices[0].message.content for name, a in answers.items()}
    assert len(set(texts.values())) == 3  # base, alpha and beta answer differently
    # alpha's answer is what a model with only alpha loaded says
    solo = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), engine.adapters["alpha"])
    prompt = engine.encode([Message("user", HELLO[0]["content"])])
    [want] = generate_batch(solo.eval(), engine.tokenizer, [prompt], GenerationOptions(max_new_tokens=6),
                            stop_ids=engine.stop_ids, progress=False)
    assert texts["alpha"] == want.text
    usage = answers["alpha"].usage
    assert usage.prompt_tokens == len(prompt)
    assert usage.completion_tokens == len(want.token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert answers["alpha"].choices[0].finish_reason == ("length" if len(want.token_ids) == 6 else "stop")


def test_streaming_gives_the_same_answer_with_usage(client):
    whole = ask(client, "beta", max_tokens=8).choices[0].message.content
    chunks = list(ask(client, "beta", max_tokens=8, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_n_max_tokens_and_stop(client, engine):
    reply = ask(client, "alpha", max_tokens=5, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content == reply.choices[1].message.content  # greedy twice
    full = ask(client, "alpha", max_tokens=10).choices[0].message.content
    assert len(full) > 4
    stop = full[2:4]
    cut = ask(client, "alpha", max_tokens=10, stop=[stop])
    assert cut.choices[0].message.content == full[:full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, "alpha", max_tokens=10, stop=stop,
                                                                    stream=True))
    assert streamed == full[:full.find(stop)]
    sampled = client.chat.completions.create(model="alpha", messages=HELLO, temperature=0.8, top_p=0.9, seed=3,
                                             max_tokens=4)
    assert sampled.choices[0].message.content is not None


def test_api_key_is_required(base_url):
    bad = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        ask(bad, "alpha", max_tokens=2)


def test_malformed_requests_get_clear_errors(client, engine):
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.chat.completions.create(model="alpha", messages=HELLO, temperature=7)
    with pytest.raises(openai.UnprocessableEntityError, match="messages"):
        client.chat.completions.create(model="alpha", messages=[])
    with pytest.raises(openai.UnprocessableEntityError, match="role"):
        client.chat.completions.create(model="alpha", messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="alpha, beta"):
        ask(client, "gamma", max_tokens=2)


def test_context_overflow_is_a_400_with_the_numbers(client):
    long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {CONTEXT} tokens") as err:
        ask(client, "alpha", messages=long, max_tokens=4)
    assert "in the messages" in str(err.value)
    with pytest.raises(openai.BadRequestError, match="250 in the completion"):
        ask(client, "alpha", max_tokens=250)


def test_concurrent_requests_are_not_mixed(client, engine):
    jobs = [("alpha", "Tell me about hotels."), ("beta", "Hello, who are you?"),
            (engine.base_name, "What is two plus two?"), ("alpha", "Write a poem.")]
    expected = [alone(engine, model, [{"role": "user", "content": q}], 6) for model, q in jobs]

    def run(job, stream):
        model, question = job
        messages = [{"role": "user", "content": question}]
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in ask(client, model, messages, max_tokens=6,
                                                                        stream=True))
        return ask(client, model, messages, max_tokens=6).choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(run, jobs, [i % 2 == 0 for i in range(len(jobs))]))
    assert got == expected


def test_client_dropping_a_stream_does_not_block_others(base_url, client):
    body = {"model": "alpha", "messages": HELLO, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base_url}/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # read one event, then hang up
    reply = ask(client, "beta", max_tokens=3)  # the model is free again, well before 200 tokens
    assert reply.choices[0].message.content is not None


def test_stop_matcher_holds_back_a_partial_stop_string():
    matcher = StopMatcher(["END"])
    assert matcher.feed("abc E") == "abc "
    assert matcher.feed("N") == ""
    assert matcher.feed("D tail") == ""
    assert matcher.stopped
    other = StopMatcher(["END"])
    assert other.feed("xE") == "x" and other.feed("Z") == "EZ" and not other.stopped


def test_port_in_use_is_a_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(TunelabError, match=f"--port {port + 1}"):
            check_port_free("127.0.0.1", port)


def test_missing_adapter_folder_fails_before_loading(tmp_path, capsys):
    from tunelab.cli import main

    assert main(["serve", "--adapter", f"x={tmp_path / 'missing'}", "--port", str(free_port())]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
