"""OpenAI API request models (validation) and response builders (the shapes the official client parses).

Requests are pydantic models: a wrong type or out-of-range value becomes an HTTP 400 whose
message names the field (see ``app.py``). Fields the OpenAI API defines but this server does
not implement (``logprobs``, ``echo``, ``best_of`` > 1, tools) are refused with a 400 saying
so, rather than silently ignored; unknown extra fields are ignored, as vLLM does, because
SDKs add vendor fields freely.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    # allow_inf_nan=False: Python's JSON parser accepts NaN and Infinity, and a NaN compared
    # with a bound would otherwise be reported as out of range, or reach the sampler.
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)  # vLLM extension; -1 or 0: off
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)  # a 64-bit signed integer, as OpenAI's
    user: str | None = None
    ignore_eos: bool = False  # vLLM extension: generate max_tokens even past end-of-sequence

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.logprobs is not None:
            raise ValueError("logprobs is not supported by this server")
        if self.best_of not in (None, 1):
            raise ValueError("best_of other than 1 is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise ValueError("prompt must not be an empty list")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: text or token ids each."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> "ChatCompletionRequest":
        if self.logprobs:
            raise ValueError("logprobs is not supported by this server")
        if self.tools:
            raise ValueError("tools are not supported by this server")
        for m in self.messages:
            m.text()  # raises on non-text parts
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- errors ------------------------------------------------------------------------------
# pydantic names the union member it tried in the error location ("str", "list[int]", ...)
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|(list|dict|tuple|set)\[.*\]|function-\w+\[.*\]|tagged-union\[.*\])$")


def describe_errors(errors: list[Any]) -> tuple[str, str | None]:
    """One message naming each bad field (at most four), and the first field's path.

    Used for HTTP bodies (FastAPI's RequestValidationError) and for gRPC requests, which are
    validated with the same models.
    """
    parts, first = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # pydantic tries each member of a union; keep the member name out of the field path
        loc = [x for x in loc if not _UNION_MEMBER.match(x)]
        where = ".".join(loc) or "body"
        first = first or where
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    # a union failure repeats for every member; keep each message once, in order
    unique = list(dict.fromkeys(parts))
    return "invalid request: " + "; ".join(unique[:4]), first


# --- responses ---------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error envelope; the client raises it as BadRequestError, RateLimitError, ..."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def completion_body(rid: str, model: str, created: int, choices: list[dict[str, Any]], use: dict[str, int] | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices, "usage": use}


def chat_body(rid: str, model: str, created: int, choices: list[dict[str, Any]], use: dict[str, int] | None, chunk: bool = False) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chunk else "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": use,
    }


def now() -> int:
    return int(time.time())
