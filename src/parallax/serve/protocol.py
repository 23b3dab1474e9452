"""OpenAI's wire format: request and response models for /v1/completions,
/v1/chat/completions and /v1/models, and the error body.

Requests are validated here (types and ranges); what the engine checks itself (prompt length
against the context, token ids against the vocabulary) comes back as a ParallaxError and
becomes a 400 in app.py. A field OpenAI defines but parallax does not implement is refused
with a 400 naming it, never silently ignored; an unknown field is refused the same way (as
OpenAI's own API does).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# OpenAI fields accepted only at their "off" value: (field, the values that mean off).
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
}

NOT_SUPPORTED_WHY = {
    "presence_penalty": "use repetition_penalty (HF/CTRL style, 1 = off)",
    "frequency_penalty": "use repetition_penalty (HF/CTRL style, 1 = off)",
    "logprobs": "the engine does not return log-probabilities yet",
    "top_logprobs": "the engine does not return log-probabilities yet",
}


class UnsupportedField(Exception):
    """A field parallax refuses; app.py turns it into a 400 with ``param`` = the field.
    Not a ValueError, so pydantic lets it through instead of folding it into its own errors."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions."""
    model_config = ConfigDict(extra="allow")     # extras are refused by name in _refuse_extras

    model: str | None = None                     # None: the served model
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)       # -1 / 0 / None: off (vLLM's convention)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        if isinstance(v, list) and any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        return [] if v is None or v == "" else ([v] if isinstance(v, str) else v)

    @model_validator(mode="after")
    def _refuse_extras(self):
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED_FIELDS:
                if value not in UNSUPPORTED_FIELDS[name]:
                    why = NOT_SUPPORTED_WHY.get(name, "parallax does not implement it")
                    raise UnsupportedField(name, f"{name}={value!r} is not supported yet ({why})")
            else:
                raise UnsupportedField(name, f"Unrecognized request argument supplied: {name}")
        if self.stream_options is not None and not self.stream:
            raise UnsupportedField("stream_options", "stream_options needs stream=true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``LLM.submit`` (without max_new_tokens and seed)."""
        return dict(temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k if self.top_k and self.top_k > 0 else None,
                    stop=self.stop or None, ignore_eos=self.ignore_eos,
                    repetition_penalty=self.repetition_penalty,
                    stop_token_ids=self.stop_token_ids)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)     # None: up to the model's context
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _no_logprobs(self):
        if self.logprobs is not None:
            raise UnsupportedField("logprobs", "logprobs is not supported yet "
                                   f"({NOT_SUPPORTED_WHY['logprobs']})")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (each a string or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]
        return list(p)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # "developer" is the newer OpenAI name for "system"; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role,
                "content": content or ""}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _no_logprobs(self):
        for field in ("logprobs", "top_logprobs"):
            if getattr(self, field) not in (None, False):
                raise UnsupportedField(field, f"{field} is not supported yet "
                                       f"({NOT_SUPPORTED_WHY[field]})")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "parallax"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(message: str, type_: str, param: str | None = None,
               code: str | int | None = None) -> dict:
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param,
                                         code=code)).model_dump()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
