"""OpenAI's wire format as `tunelab serve` speaks it: request schemas and the error shape.

Every field a request may carry is named here. A field we honour is validated; a field
for a feature we lack (`tools`, `response_format`, `logprobs`, penalties...) is accepted
only at its neutral value and otherwise refused with a 400 that names it; any other field
is refused too. Nothing a client asks for is silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote a client's text, lone surrogates
    included, which UTF-8 cannot encode."""

    def render(self, content: Any) -> bytes:
        import json

        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return AsciiJSONResponse(body, status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """Pydantic's errors as one readable sentence naming each bad field."""
    parts, first = [], None
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        first = first or loc or None
        msg = "unknown field (this server does not support it)" if err.get("type") == "extra_forbidden" \
            else err.get("msg", "invalid")
        parts.append(f"{loc or 'body'}: {msg}")
    return "invalid request: " + "; ".join(parts), first


def check_text(text: str, param: str) -> None:
    """A lone surrogate (JSON "\\ud800") is not text: refuse it before it reaches the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param} holds an invalid Unicode character (a lone surrogate at position "
                            f"{exc.start}); send valid UTF-8 text", param=param) from None


# --- requests -------------------------------------------------------------------------------

# Fields of features we do not have: accepted at these neutral values, refused otherwise.
NEUTRAL = {
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "parallel_tool_calls": (None, True, False),
    "functions": (None, []), "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1), "store": (None, False),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
    "service_tier": (None, "auto", "default"), "web_search_options": (None,),
}
WHY = {
    "tools": "tool calling", "tool_choice": "tool calling", "parallel_tool_calls": "tool calling",
    "functions": "function calling", "function_call": "function calling",
    "response_format": "structured output (JSON mode)", "logprobs": "log probabilities",
    "top_logprobs": "log probabilities", "frequency_penalty": "penalties", "presence_penalty": "penalties",
    "logit_bias": "logit bias", "echo": "echoing the prompt", "suffix": "suffixes", "best_of": "best_of",
    "store": "stored completions", "modalities": "audio output", "audio": "audio output",
    "prediction": "predicted outputs", "reasoning_effort": "reasoning effort", "service_tier": "service tiers",
    "web_search_options": "web search",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Sampling(BaseModel):
    """What chat and text completions share."""
    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-2**63, lt=2**63)  # what torch.Generator.manual_seed takes
    user: str | None = None  # OpenAI: an end-user id for abuse monitoring; only checked here
    metadata: dict[str, str] | None = None  # OpenAI: tags for stored completions; only checked here
    # features we lack, refused unless neutral (see NEUTRAL)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    store: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    service_tier: Any = None
    web_search_options: Any = None

    def refuse_unsupported(self) -> None:
        for name, neutral in NEUTRAL.items():
            value = getattr(self, name, None)
            if not any(value == ok and type(value) is type(ok) or value is ok for ok in neutral):
                raise APIError(400, f"`{name}` is not supported by this server ({WHY[name]}); "
                                    f"remove the field or send {neutral[1] if len(neutral) > 1 else 'null'!r}",
                               param=name, code="unsupported_parameter")
        check_text(self.model, "model")
        for i, s in enumerate(self.stop_strings()):
            check_text(s, f"stop[{i}]")

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Any role the model's chat template renders (hotel: `search`, `return`); the template decides.
    # A plain name: the template writes the role outside the content, where special tokens are parsed.
    role: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    content: str | list[TextPart] | None = None
    name: str | None = None  # refused when set: templates have no place for it
    tool_calls: Any = None  # refused when set: no tool calling

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for i, m in enumerate(self.messages):
            if m.name:
                raise APIError(400, f"messages[{i}].name is not supported (the chat template has no participant "
                                    f"names); put the name into the content", param=f"messages[{i}].name",
                               code="unsupported_parameter")
            if m.tool_calls:
                raise APIError(400, f"messages[{i}].tool_calls is not supported (tool calling)",
                               param=f"messages[{i}].tool_calls", code="unsupported_parameter")
            check_text(m.role, f"messages[{i}].role")
            check_text(m.text(), f"messages[{i}].content")


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        prompts = self.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                check_text(p, f"prompt[{i}]")
