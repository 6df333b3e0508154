"""`tunelab eval --backend openai`: predictions from any OpenAI-compatible server (vLLM,
SGLang, `tunelab serve`), scored with the same tasks and metrics as local generation.

Two ways to ask:

- `completions` (default where a tokenizer is given): the prompt is rendered here with the
  trained template, exactly as local `tunelab eval` renders it, and sent as text to
  `/v1/completions`; the server only continues it. Scores are then comparable with a local
  run token for token (the hotel template's prompt even leaves the role to the model).
- `chat`: the messages go to `/v1/chat/completions` and the server applies its template.

Requests run concurrently (`concurrency`), with the judge's retry policy (429 / 5xx /
timeouts backed off and retried). Sampling options OpenAI's API has no field for
(top-k, repetition penalty) are refused rather than dropped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from tunelab.errors import TunelabError
from tunelab.evaluate.judge import EndpointFailure, RateLimiter, post_with_retries
from tunelab.evaluate.runner import Generated, make_row
from tunelab.evaluate.tasks import EvalSample
from tunelab.model.generate import GenerationOptions

APIS = ("completions", "chat")


@dataclass
class Endpoint:
    base_url: str  # up to /v1
    model: str  # the name the server serves the model under
    api_key: str | None = None
    api: str = "completions"
    concurrency: int = 8
    timeout_s: float = 600.0
    max_retries: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0


def check_options(options: GenerationOptions) -> None:
    if options.top_k or options.repetition_penalty != 1.0:
        raise TunelabError("--top-k and --repetition-penalty have no field in the OpenAI API", where="--backend openai",
                           fix="drop them (the server's own defaults apply), or evaluate locally")


def request_body(endpoint: Endpoint, options: GenerationOptions, prompt, stop: Sequence[str]) -> dict:
    body = {"model": endpoint.model, "max_tokens": options.max_new_tokens, "temperature": options.temperature,
            "top_p": options.top_p}
    if options.seed is not None and not options.greedy:
        body["seed"] = options.seed
    if stop:
        body["stop"] = list(stop)[:4]  # the API takes at most four
    body["prompt" if endpoint.api == "completions" else "messages"] = prompt
    return body


def answer_of(endpoint: Endpoint, answer: dict) -> tuple[str, str, int | None]:
    """(text, finish_reason, completion tokens if the server says) of a completion."""
    try:
        choice = answer["choices"][0]
        text = choice["text"] if endpoint.api == "completions" else choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise EndpointFailure(f"the answer is not an OpenAI {endpoint.api} completion: {str(answer)[:200]}",
                              "point --base-url at an OpenAI-compatible /v1 endpoint, or try --api chat") from None
    usage = answer.get("usage") or {}
    return str(text or ""), str(choice.get("finish_reason") or "stop"), usage.get("completion_tokens")


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Servers that print special tokens leave the stop string in; local eval never shows it."""
    cuts = [i for s in stop if s and (i := text.find(s)) >= 0]
    return text[:min(cuts)] if cuts else text


def predict_remote(endpoint: Endpoint, samples: Sequence[EvalSample], options: GenerationOptions, *, task: str,
                   prompts: Sequence[str] | None = None, stop: Sequence[str] = (), progress: bool = True,
                   desc: str = "asking", client: httpx.Client | None = None) -> Generated:
    """Prediction rows for `samples` from the endpoint. `prompts`: the rendered prompt texts
    (completions API); without them the messages are sent (chat API)."""
    from tqdm.auto import tqdm

    check_options(options)
    if endpoint.api == "completions" and prompts is None:
        raise TunelabError("the completions API needs prompts rendered with the model's template", where="--api",
                           fix="give --tokenizer (the trained run or model folder), or use --api chat")
    from tunelab.data.templates import as_dicts

    bodies = [request_body(endpoint, options, prompts[i] if endpoint.api == "completions" else
                           as_dicts(s.prompt), stop) for i, s in enumerate(samples)]
    answers: list[tuple[str, str, int | None] | None] = [None] * len(samples)
    headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    own = client is None
    client = client or httpx.Client(timeout=endpoint.timeout_s, headers=headers)
    limiter = RateLimiter(0)
    path = "/completions" if endpoint.api == "completions" else "/chat/completions"
    bar = tqdm(total=len(samples), unit="sample", desc=desc, disable=not progress, dynamic_ncols=True)

    def ask(i: int) -> None:
        answers[i] = answer_of(endpoint, post_with_retries(client, endpoint, path, bodies[i], limiter))
        bar.update(1)

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=max(1, endpoint.concurrency)) as pool:
            list(pool.map(ask, range(len(samples))))
    except EndpointFailure as exc:
        raise TunelabError(f"the server failed: {exc.what}", where=endpoint.base_url, fix=exc.fix) from None
    finally:
        bar.close()
        if own:
            client.close()
    seconds = time.perf_counter() - started
    rows, completion = [], 0
    for i, (sample, (text, finish, tokens)) in enumerate(zip(samples, answers)):
        text = cut_at_stop(text, stop)
        completion += tokens or 0
        prompt = prompts[i] if prompts is not None else "\n".join(f"{m.role}: {m.content}" for m in sample.prompt)
        rows.append(make_row(i, task, sample, prompt, text, "length" if finish == "length" else "stop",
                             None, tokens))
    return Generated(rows, seconds, completion, {"backend": "openai", "api": endpoint.api,
                                                 "concurrency": endpoint.concurrency, "samples": len(rows)})
