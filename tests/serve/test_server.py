"""`tunelab serve` driven through the real openai client: adapters, streaming, errors, OpenAI conformance."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serving import CONTEXT, HELLO, KEY, alone, engine, free_port, running  # noqa: F401 (engine is a fixture)

from tunelab.data.types import Message
from tunelab.errors import TunelabError
from tunelab.model.generate import GenerationOptions, generate_batch
from tunelab.serve.server import StopMatcher, check_port_free, create_app


@pytest.fixture(scope="module")
def base_url(engine):
    with running(create_app(engine, api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=120)


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
    with pytest.raises(openai.BadRequestError, match="temperature") as err:
        client.chat.completions.create(model="alpha", messages=HELLO, temperature=7)
    assert err.value.status_code == 400 and err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="alpha", messages=[])
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="alpha", messages=[{"role": "", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="alpha, beta"):
        ask(client, "gamma", max_tokens=2)


def post(base_url: str, path: str, **kw) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", headers={"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})},
                      timeout=60, **kw)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "detail" not in response.json()
    if param is not None:
        assert error["param"] == param
    return error["message"]


@pytest.mark.parametrize("body, param", [
    ('{"model": "alpha", "messages": [', None),  # malformed JSON
    ('[1, 2]', None),
    ('{"model": "alpha"}', "messages"),
    ('{"model": "alpha", "messages": [{"role": "user", "content": 5}]}', "messages.0.content.str"),
    ('{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', "max_tokens"),
    ('{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}', "frobnicate"),
    ('{"model": "alpha", "messages": [{"role": "user", "content": "hi", "colour": "red"}]}', "messages.0.colour"),
])
def test_invalid_requests_are_400_in_openai_shape_never_422(base_url, body, param):
    response = post(base_url, "/chat/completions", content=body, headers={"Content-Type": "application/json"})
    message = assert_openai_error(response, 400, param)
    if param in ("frobnicate", "messages.0.colour"):
        assert "unknown field" in message


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("response_format", {"type": "json_object"}), ("logprobs", True), ("top_logprobs", 2),
    ("frequency_penalty", 0.5), ("presence_penalty", -1.0), ("logit_bias", {"42": 5}), ("tool_choice", "required"),
])
def test_unsupported_features_are_refused_naming_the_field(client, field, value):
    with pytest.raises(openai.BadRequestError, match=field) as err:
        ask(client, "alpha", max_tokens=2, **{field: value})
    assert err.value.body["param"] == field and err.value.body["code"] == "unsupported_parameter"


def test_neutral_values_of_unsupported_features_are_accepted(client, engine):
    want = ask(client, "alpha", max_tokens=4).choices[0].message.content
    got = ask(client, "alpha", max_tokens=4, frequency_penalty=0, presence_penalty=0.0, logprobs=False,
              response_format={"type": "text"}, user="someone")
    assert got.choices[0].message.content == want


def test_developer_role_is_the_system_prompt(client):
    as_system = ask(client, "alpha", [{"role": "system", "content": "Be brief."}, *HELLO], max_tokens=6)
    as_developer = ask(client, "alpha", [{"role": "developer", "content": "Be brief."}, *HELLO], max_tokens=6)
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens


def test_models_can_be_retrieved_one_by_one(client, engine):
    assert client.models.retrieve("alpha").id == "alpha"
    assert client.models.retrieve(engine.base_name).id == engine.base_name
    with pytest.raises(openai.NotFoundError, match="alpha, beta"):
        client.models.retrieve("gamma")


def test_unknown_route_is_an_openai_error(base_url):
    message = assert_openai_error(post(base_url, "/embeddings", json={"model": "alpha", "input": "x"}), 404)
    assert "POST /v1/embeddings is not a route" in message and "/v1/completions" in message


def test_text_completions_match_the_model_alone(client, engine):
    prompt = "The hotel is"
    want = alone(engine, "beta", prompt=engine.encode_text(prompt), max_tokens=7)
    reply = client.completions.create(model="beta", prompt=prompt, max_tokens=7, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text == want
    assert reply.usage.prompt_tokens == len(engine.encode_text(prompt))
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="beta", prompt=prompt, max_tokens=7, temperature=0, stream=True) if c.choices)
    assert streamed == want
    # several prompts, token-id prompts: one choice each, in order
    ids = engine.encode_text("Hello")
    many = client.completions.create(model="beta", prompt=[prompt, "Hello"], max_tokens=3, temperature=0)
    by_ids = client.completions.create(model="beta", prompt=ids, max_tokens=3, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[1].text == by_ids.choices[0].text == alone(engine, "beta", prompt=ids, max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="beta", prompt=prompt, max_tokens=2, echo=True)


def test_roles_of_the_trained_template_can_be_sent(tiny_model_dir, tmp_path):
    """The hotel template renders its task's roles (`search`, `return`): a client may send them."""
    from tunelab.serve.engine import load_engine

    engine = load_engine(str(tiny_model_dir), device="cpu", context_length=CONTEXT, template="hotel")
    messages = [{"role": "user", "content": "A room for two?"}, {"role": "search", "content": "rooms(2)"},
                {"role": "return", "content": "[room 12]"}]
    with running(create_app(engine)) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        reply = client.chat.completions.create(model=engine.base_name, messages=messages, max_tokens=3,
                                               temperature=0)
    prompt = engine.encode([Message(m["role"], m["content"]) for m in messages])
    assert reply.usage.prompt_tokens == len(prompt)
    assert "rooms(2)" in engine.tokenizer.decode(prompt)


def test_a_role_the_template_drops_is_refused(tiny_model_dir):
    from tunelab.serve.engine import load_engine

    only_chat = ("{% for m in messages %}{% if m.role in ['system', 'user', 'assistant'] %}<|im_start|>{{ m.role }}\n"
                 "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    engine = load_engine(str(tiny_model_dir), device="cpu", context_length=CONTEXT, template=only_chat)
    with running(create_app(engine)) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="'robot'.*roles") as err:
            client.chat.completions.create(model=engine.base_name, max_tokens=2,
                                           messages=[*HELLO, {"role": "robot", "content": "beep"}])
    assert err.value.body["param"] == "messages"


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


@pytest.mark.parametrize("flag, value", [("--max-queue", "0"), ("--max-batch-size", "-1"),
                                         ("--request-timeout", "nan"), ("--max-body-mb", "0")])
def test_serve_limits_are_checked_before_loading(flag, value, capsys):
    from tunelab.cli import main

    assert main(["serve", flag, value, "--port", str(free_port())]) == 2
    assert f"{flag} must be > 0" in capsys.readouterr().err


def test_the_slot_batcher_is_the_gpu_default_and_never_on_the_cpu(engine, caplog):
    """`--kv-slots` / `--no-kv-slots` reach the server's limits (unset: where it applies); on the CPU
    requests go through the dynamic `Batcher`, with a warning only when slots were asked for."""
    from tunelab.cli import build_parser
    from tunelab.serve.batching import Batcher, SlotBatcher, make_batcher
    from tunelab.serve.cli import serve_limits

    parse = build_parser().parse_args
    assert [serve_limits(parse(["serve", *flag])).kv_slots for flag in ([], ["--kv-slots"], ["--no-kv-slots"])] \
        == [None, True, False]
    for slots in (None, False, True):
        caplog.clear()
        batcher = make_batcher(engine, max_batch=2, slots=slots)
        try:
            assert type(batcher) is Batcher and not isinstance(batcher, SlotBatcher)
        finally:
            batcher.close()
        # asked for on the CPU: said, not silently dropped; on auto the dynamic batcher is simply the one that applies
        assert ("--kv-slots needs a GPU" in caplog.text) == (slots is True)
