"""The OpenAI API contract as pydantic models (requests validated here, responses built from these)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fleetserve.server.structured import ResponseFormat
from fleetserve.server.tools import AssistantToolCall, ToolChoice, ToolDef

MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_TOP_LOGPROBS = 20  # chat top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # legacy completions logprobs


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI (and vLLM-extension) request fields this worker cannot honour yet, each with the value that means
# "off" (None always does). Any other value is a 400 naming the field: a client asking for
# JSON mode or tools must not silently get a plain answer. Remove a field from here when it is implemented.
UNSUPPORTED_FIELDS: dict[str, Any] = {
    "functions": [],
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
    "guided_grammar": None,
}


def _is_off(value: Any, off: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bool) or isinstance(off, bool):
        return value is off  # logprobs=0 asks for the sampled tokens' logprobs: not the same as false
    return value == off


class SamplingFields(BaseModel):
    """Parameters shared by chat and completions (OpenAI's plus the vLLM/SGLang extensions)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None  # JSON mode / JSON schema, by constrained decoding
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)  # vLLM/SGLang extension; 1 = off
    # token id (as a string, as OpenAI sends it) -> bias added to its logit; ids are checked against the
    # vocabulary by the route. Values are typed Any so that every error names `logit_bias` itself.
    logit_bias: dict[str, Any] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return None
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries are allowed, got {len(v)}")
        for key, bias in v.items():
            if not key.strip().isdigit():
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise ValueError(f"the bias for token {key} must be a number from -100 to 100, got {bias!r}")
        return v

    def logit_bias_ids(self) -> dict[int, float]:
        return {int(k): float(b) for k, b in (self.logit_bias or {}).items()}

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        v = [v] if isinstance(v, str) else v
        if len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(s == "" for s in v):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @model_validator(mode="after")
    def _stream_options(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def unsupported_field(self) -> tuple[str, str] | None:
        """(field, message) for the first field set to something this worker cannot honour yet."""
        for name, off in UNSUPPORTED_FIELDS.items():
            value = getattr(self, name, None)
            if not _is_off(value, off):
                allowed = "leave it out" + ("" if off is None else f" or set it to {json.dumps(off)}")
                return name, f"{name} is not supported by this server yet (got {json.dumps(value)}); {allowed}"
        best_of = getattr(self, "best_of", None)
        if best_of is not None and best_of != self.n:
            return "best_of", (f"best_of is not supported by this server yet (got {json.dumps(best_of)}); "
                               f"leave it out or set it to n ({self.n})")
        return None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # assistant: calls it made
    tool_call_id: str | None = None  # tool: the call this message answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # > 0 needs logprobs true (route checks)

    def logprobs_k(self) -> int | None:
        """Top-k for the sampled tokens' logprobs (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo (scores the prompt, generates nothing)
    echo: bool = False  # the prompt is prepended to each choice's text (and its tokens to logprobs)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: str | None = None

    def logprobs_k(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and isinstance(v[0], list) and any(not p for p in v):
            raise ValueError("token-id prompts must not be empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported by this model")
        return v

    def token_limit(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "fleetserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
