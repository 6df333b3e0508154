"""LLM-as-judge: score (question, reference, prediction) with any OpenAI-compatible endpoint.

The judge model reads a rubric (named dimensions on an integer scale) and must answer with
one JSON object. We are strict about what we accept and lenient about how it is wrapped:
the first JSON object that names a rubric dimension is used, scores are clamped to the
scale, and an answer we cannot read is kept (raw text and reason) but never guessed at.

Cost and robustness: answers are cached on disk keyed by a hash of (model, temperature,
the full prompt), so a rerun only pays for what is new; 429 / 5xx / timeouts are retried
with exponential backoff (honouring Retry-After); requests are spaced to a requests/s
limit; when the endpoint stays down, what was scored is written out before the error.
httpx is used directly: the openai client would add a dependency and hide the retries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from tunelab.errors import TunelabError, nearest
from tunelab.io import write_json_atomic, write_jsonl_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dimension:
    name: str
    description: str
    low: int = 1
    high: int = 5


DEFAULT_DIMENSIONS = (
    Dimension("correctness", "Does the answer state the same facts and decisions as the reference? "
                             "Contradictions or invented facts score low."),
    Dimension("helpfulness", "Does it answer what the user asked, completely and to the point?"),
    Dimension("fluency", "Is it natural, grammatical text in the user's language?"),
)

SYSTEM_PROMPT = ("You are a strict, fair grader of assistant answers. Compare the candidate answer "
                 "with the reference answer and score it on each rubric dimension. Reply with one "
                 "JSON object and nothing else.")


@dataclass(frozen=True)
class JudgeItem:
    question: str
    reference: str
    prediction: str


@dataclass
class JudgeSettings:
    base_url: str  # e.g. http://localhost:8000/v1 (the part before /chat/completions)
    model: str
    api_key: str | None = None
    dimensions: tuple[Dimension, ...] = DEFAULT_DIMENSIONS
    temperature: float = 0.0
    max_tokens: int = 256
    timeout_s: float = 60.0
    max_retries: int = 4  # retries after the first try, on 429 / 5xx / timeouts / refused connections
    backoff_s: float = 1.0  # first wait; doubles each retry
    max_backoff_s: float = 30.0
    requests_per_second: float = 2.0  # 0 = no limit
    concurrency: int = 1
    cache_dir: Path | None = None

    @classmethod
    def for_endpoint(cls, base_url: str, model: str, api_key: str | None, dimensions: str | None = None,
                     **settings) -> JudgeSettings:
        """`tunelab eval --judge-url` and `reward: judge` alike: answers cached under $TUNELAB_CACHE/judge,
        the rubric's dimensions from their spec (parse_dimensions) or the built-in ones."""
        from tunelab.model.embedded import cache_root

        made = cls(base_url=base_url, model=model, api_key=api_key, cache_dir=cache_root() / "judge", **settings)
        if dimensions:
            made.dimensions = parse_dimensions(dimensions)
        return made


@dataclass
class Judgement:
    index: int
    scores: dict[str, float] | None  # None: the answer could not be read (see error, raw)
    reason: str = ""
    raw: str = ""
    error: str | None = None
    cached: bool = False


@dataclass
class JudgeResult:
    judgements: list[Judgement]
    total: int  # items asked for (more than len(judgements) only in a partial result)
    dimensions: tuple[Dimension, ...] = field(default=DEFAULT_DIMENSIONS)

    @property
    def unparseable(self) -> int:
        return sum(j.scores is None for j in self.judgements)

    def mean_scores(self) -> dict[str, float]:
        """Mean of each dimension over the readable judgements (unreadable ones are counted, not scored)."""
        read = [j.scores for j in self.judgements if j.scores is not None]
        return {d.name: sum(s[d.name] for s in read) / len(read) for d in self.dimensions} if read else {}

    def summary(self) -> dict:
        return {"scored": len(self.judgements), "total": self.total, "unparseable": self.unparseable,
                "cached": sum(j.cached for j in self.judgements), "mean": self.mean_scores()}


class JudgeReward:
    """`reward: judge` for grpo / ppo: each completion scored by the judge against the reference,
    the rubric's mean scaled to [0, 1] (every dimension from its low to its high end).

    A rollout's completions go out as one batch (concurrent requests, cached answers, retries as
    in evaluation). An answer the judge gave but we cannot read gets the mean reward of the
    readable ones in its batch, so it neither rewards nor punishes its completion; an endpoint
    that stays down ends the run with the judge's error (checkpoints already written stay).
    """

    def __init__(self, settings: JudgeSettings, transport: httpx.BaseTransport | None = None):
        self.settings = settings
        self.transport = transport
        self.unreadable = 0  # answers that could not be read, over the run

    @classmethod
    def from_config(cls, cfg) -> JudgeReward:
        import os

        from tunelab.train.objectives.rl import check_judge_keys

        check_judge_keys(cfg)
        return cls(JudgeSettings.for_endpoint(cfg.judge_url, cfg.judge_model, os.environ.get("TUNELAB_JUDGE_API_KEY"),
                                              cfg.judge_dimensions, concurrency=8, requests_per_second=0.0))

    def batch(self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]) -> list[float]:
        items = [JudgeItem(question=p, reference=r, prediction=c) for p, c, r in zip(prompts, completions, references)]
        result = judge(items, self.settings, transport=self.transport)
        dims = self.settings.dimensions
        values = {j.index: sum((j.scores[d.name] - d.low) / (d.high - d.low) for d in dims) / len(dims)
                  for j in result.judgements if j.scores is not None}
        if not values:
            raise TunelabError(f"the judge's answers to all {len(items)} completions of a rollout were unreadable",
                               where=self.settings.base_url,
                               fix="check judge_model (it must answer with the rubric's JSON object); the answers "
                                   "are kept in the judge cache")
        if len(values) < len(items):  # said each time: a judge that drifts from the rubric's JSON shows in the log
            self.unreadable += len(items) - len(values)
            log.warning("judge: %d of %d answers of this rollout unreadable (given the rollout's mean reward; "
                        "%d over the run)", len(items) - len(values), len(items), self.unreadable)
        fill = sum(values.values()) / len(values)
        return [values.get(i, fill) for i in range(len(items))]

    def __call__(self, prompt: str, completion: str, reference: str) -> float:
        return self.batch([prompt], [completion], [reference])[0]


class JudgeEndpointError(TunelabError):
    """The endpoint failed for good; `partial` holds what was scored before it did."""

    def __init__(self, what: str, where: str, fix: str, partial: JudgeResult):
        super().__init__(what, where, fix)
        self.partial = partial


# --- prompt and parsing (pure) ---------------------------------------------------------

def parse_dimensions(spec: str) -> tuple[Dimension, ...]:
    """`"correctness,fluency"` (built-in names) or `"name=what it measures;..."` for custom ones."""
    known = {d.name: d for d in DEFAULT_DIMENSIONS}
    parts = [p.strip() for p in re.split(r"[;,]" if "=" not in spec else ";", spec) if p.strip()]
    dims = []
    for part in parts:
        name, _, description = part.partition("=")
        name = name.strip()
        if description:
            dims.append(Dimension(name, description.strip()))
        elif name in known:
            dims.append(known[name])
        else:
            hint = nearest(name, known)
            raise TunelabError(f"unknown judge dimension {name!r}", where="judge rubric",
                               fix=(f"did you mean {hint!r}? " if hint else "")
                               + f"use one of {', '.join(known)} or describe it: {name}=what it measures")
    if not dims:
        raise TunelabError("the judge rubric has no dimensions", where="judge rubric",
                           fix="e.g. correctness,helpfulness,fluency")
    return tuple(dims)


def build_messages(item: JudgeItem, dimensions: Sequence[Dimension]) -> list[dict]:
    rubric = "\n".join(f"- {d.name} ({d.low}-{d.high}): {d.description}" for d in dimensions)
    example = json.dumps({**{d.name: d.high for d in dimensions}, "reason": "one short sentence"})
    user = (f"Rubric (integer scores, {dimensions[0].low} worst, {dimensions[0].high} best):\n{rubric}\n\n"
            f"[Question]\n{item.question}\n\n[Reference answer]\n{item.reference}\n\n"
            f"[Candidate answer]\n{item.prediction}\n\n"
            f"Reply with only a JSON object like {example}")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # "4", "4/5", "score: 4"
        found = _NUMBER_RE.search(value)
        return float(found.group()) if found else None
    return None


def _json_objects(text: str):
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield obj


def parse_judgement(text: str, dimensions: Sequence[Dimension]) -> tuple[dict[str, float] | None, str, str | None]:
    """(scores, reason, error) from the judge's answer; scores None when it can't be read.

    Takes the first JSON object naming a rubric dimension (keys case-insensitive), wherever
    it sits (code fences, prose around it); clamps each score to its dimension's scale.
    """
    names = {d.name.lower() for d in dimensions}
    for obj in _json_objects(text):
        lowered = {str(k).lower(): v for k, v in obj.items()}
        if not names & lowered.keys():
            continue
        reason = str(lowered.get("reason", ""))
        scores, bad = {}, []
        for d in dimensions:
            value = _number(lowered.get(d.name.lower()))
            if value is None or value != value:  # missing, not a number, or NaN
                bad.append(d.name)
            else:
                scores[d.name] = min(max(value, d.low), d.high)
        if bad:
            return None, reason, f"no numeric score for {', '.join(bad)}"
        return scores, reason, None
    return None, "", "no JSON object with rubric scores in the answer"


def cache_key(model: str, temperature: float, messages: list[dict]) -> str:
    payload = json.dumps({"model": model, "temperature": temperature, "messages": messages},
                         sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# --- talking to the endpoint -----------------------------------------------------------

class RateLimiter:
    """Spaces request starts at least 1/rate seconds apart, across threads."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_at = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_at)
            self.next_at = start + self.interval
        time.sleep(max(0.0, start - now))


class EndpointFailure(Exception):
    """The endpoint refused for good (down after retries, bad key, unknown model)."""
    # (evaluate/remote.py catches it too: one retry policy for every OpenAI-compatible call)

    def __init__(self, what: str, fix: str):
        super().__init__(what)
        self.what, self.fix = what, fix


RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


def _retry_delay(settings: JudgeSettings, attempt: int, response: httpx.Response | None) -> float:
    retry_after = response.headers.get("retry-after") if response is not None else None
    if retry_after and _NUMBER_RE.fullmatch(retry_after.strip()):
        return min(float(retry_after), settings.max_backoff_s)
    delay = min(settings.backoff_s * 2 ** attempt, settings.max_backoff_s)
    return delay + random.uniform(0, 0.1 * delay)  # jitter: concurrent workers don't retry in lockstep


def _complete(client: httpx.Client, settings: JudgeSettings, messages: list[dict], limiter: RateLimiter) -> str:
    """The judge's answer text, retrying what is worth retrying."""
    body = {"model": settings.model, "messages": messages, "temperature": settings.temperature,
            "max_tokens": settings.max_tokens}
    answer = post_with_retries(client, settings, "/chat/completions", body, limiter)
    try:
        return str(answer["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        raise EndpointFailure(f"the answer is not an OpenAI chat completion: {json.dumps(answer)[:200]}",
                     "point base_url at an OpenAI-compatible /v1 endpoint") from None


def post_with_retries(client: httpx.Client, settings, path: str, body: dict, limiter: RateLimiter) -> dict:
    """POST `body` to `settings.base_url + path` and return the JSON answer, retrying
    429 / 5xx / timeouts with backoff (`settings`: base_url, model, max_retries, backoff_s,
    max_backoff_s); raises `EndpointFailure` for a refusal or when the retries run out."""
    url = settings.base_url.rstrip("/") + path
    last, response = "", None
    for attempt in range(settings.max_retries + 1):
        if attempt:
            time.sleep(_retry_delay(settings, attempt - 1, response))
            response = None
        limiter.wait()
        try:
            response = client.post(url, json=body)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            last = f"{type(exc).__name__}: {exc}"
            continue
        if response.status_code in RETRY_STATUS:
            last = f"HTTP {response.status_code}: {response.text[:200]}"
            continue
        if response.status_code in (401, 403):
            raise EndpointFailure(f"HTTP {response.status_code}: the endpoint refused the API key",
                         "pass the right api_key for this endpoint")
        if response.status_code >= 400:
            raise EndpointFailure(f"HTTP {response.status_code}: {response.text[:200]}",
                         f"check base_url (it should end before {path}) and model={settings.model!r}")
        try:
            return response.json()
        except ValueError:
            raise EndpointFailure(f"the answer is not JSON: {response.text[:200]}",
                         "point base_url at an OpenAI-compatible /v1 endpoint") from None
    raise EndpointFailure(f"no answer after {settings.max_retries + 1} tries (last: {last})",
                 "check that the endpoint is up and reachable, then rerun")


def _read_cache(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))["content"]
    except (ValueError, KeyError):
        return None  # a damaged entry is simply asked again


def _judge_one(index: int, item: JudgeItem, settings: JudgeSettings, client: httpx.Client,
               limiter: RateLimiter) -> Judgement:
    messages = build_messages(item, settings.dimensions)
    key = cache_key(settings.model, settings.temperature, messages)
    cache_path = Path(settings.cache_dir) / f"{key}.json" if settings.cache_dir else None
    raw = _read_cache(cache_path)
    cached = raw is not None
    if raw is None:
        raw = _complete(client, settings, messages, limiter)
        if cache_path is not None:
            write_json_atomic(cache_path, {"model": settings.model, "content": raw})
    scores, reason, error = parse_judgement(raw, settings.dimensions)
    return Judgement(index, scores, reason, raw, error, cached)


def judge(items: Sequence[JudgeItem], settings: JudgeSettings, *, results_path: Path | None = None,
          transport: httpx.BaseTransport | None = None) -> JudgeResult:
    """Score every item; writes `results_path` (JSONL, one judgement per line) if given.

    Raises `JudgeEndpointError` (a TunelabError) when the endpoint fails for good: the
    judgements made so far are written to `results_path` first and kept in the cache, so a
    rerun resumes where this one stopped.
    """
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    limiter = RateLimiter(settings.requests_per_second)
    done: dict[int, Judgement] = {}
    stop = threading.Event()
    failure: list[EndpointFailure] = []

    def work(index: int, item: JudgeItem) -> None:
        if stop.is_set():
            return
        try:
            done[index] = _judge_one(index, item, settings, client, limiter)
        except EndpointFailure as exc:
            failure.append(exc)
            stop.set()

    with httpx.Client(timeout=settings.timeout_s, headers=headers, transport=transport) as client:
        with ThreadPoolExecutor(max_workers=max(1, settings.concurrency)) as pool:
            list(pool.map(work, range(len(items)), items))

    result = JudgeResult([done[i] for i in sorted(done)], total=len(items), dimensions=settings.dimensions)
    if results_path is not None:
        write_jsonl_atomic(results_path, (asdict(j) for j in result.judgements))
    if failure:
        saved = f"partial results in {results_path}" if results_path else "no results file was given"
        cache = f"; answers cached in {settings.cache_dir}" if settings.cache_dir else ""
        raise JudgeEndpointError(
            f"{failure[0].what}; scored {len(done)} of {len(items)} ({saved}{cache})",
            where=settings.base_url, fix=failure[0].fix, partial=result)
    return result
