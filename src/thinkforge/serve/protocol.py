"""Request bodies of the OpenAI-compatible API (pydantic), in the order of the OpenAI reference.

Wrong types and out-of-range values are rejected (400 with the field named). A parameter this server
cannot honour is refused with a 400 that names it (``unsupported``), never silently ignored; fields that
change nothing here (``metadata``, ``user``, ``parallel_tool_calls`` …) are accepted. ``service_tier``
"priority" asks for the express batch (see ``generation.scheduler``); the other tiers are the default one.
Responses are built as plain dicts in ``service.py``: the SDK does not validate them, so their shape is
pinned by tests with the real clients.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
ServiceTier = Literal["auto", "default", "flex", "scale", "priority"]


class _Body(BaseModel):
    # extras are checked by unsupported(), not dropped unseen; strict: JSON types as the schema says
    # (no false for a temperature, no "3" for n)
    model_config = ConfigDict(extra="allow", strict=True)


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class InputText(_Part):
    type: Literal["input_text", "output_text", "text"] = "input_text"
    text: str


class Message(_Part):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class SummaryText(_Part):
    type: Literal["summary_text"] = "summary_text"
    text: str


class ReasoningText(_Part):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(_Part):
    """A reasoning item of an earlier response, passed back as input (what the SDK and LangChain do)."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None


def _item_type(v: Any) -> str:
    return v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", "message")


InputItem = Annotated[Union[Annotated[Message, Tag("message")], Annotated[ReasoningItem, Tag("reasoning")]],
                      Discriminator(_item_type)]


class Reasoning(_Part):
    effort: Effort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # deprecated alias of summary
    context: Literal["auto", "current_turn", "all_turns"] | None = None
    mode: Literal["standard"] | None = None  # "pro" (deeper reasoning) is not offered here: refused by name


class TextFormat(_Part):
    type: Literal["text"]


class TextConfig(_Part):
    format: TextFormat | None = None


class ResponsesRequest(_Body):
    """POST /v1/responses"""

    model: str
    input: Annotated[str, Field(pattern=r"\S")] | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, gt=0)
    previous_response_id: str | None = None
    reasoning: Reasoning | None = None
    service_tier: ServiceTier | None = None
    store: bool = True
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    # Declared so the schema says what is refused: no include values, no tools, text format "text" only.
    include: list[str] | None = Field(default=None, json_schema_extra={"maxItems": 0})
    text: TextConfig | None = None
    tools: list | None = Field(default=None, json_schema_extra={"maxItems": 0})

    def unsupported(self) -> str | None:
        if self.include:
            return "include"  # reasoning.encrypted_content / logprobs: use store + previous_response_id
        if self.tools:
            return "tools"
        return _unsupported_extras(self)


class ChatRequest(_Body):
    """POST /v1/chat/completions"""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)  # deprecated by OpenAI, still sent by many clients
    n: int = Field(default=1, ge=1, le=16)
    reasoning_effort: Effort | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    service_tier: ServiceTier | None = None
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream: bool = False
    stream_options: dict | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    response_format: TextFormat | None = None  # json_object / json_schema need constrained decoding: refused
    tools: list | None = Field(default=None, json_schema_extra={"maxItems": 0})

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def unsupported(self) -> str | None:
        if self.top_logprobs:
            return "top_logprobs"  # the engine keeps the sampled token's logprob only
        if self.tools:
            return "tools"
        return _unsupported_extras(self)


# Known OpenAI parameters that would change the output and that this server does not implement.
_CHANGES_OUTPUT = {"logit_bias", "presence_penalty", "frequency_penalty", "functions", "function_call", "audio",
                   "modalities", "prediction", "web_search_options", "top_logprobs", "background", "conversation",
                   "prompt", "max_tool_calls", "truncation"}
_NEUTRAL_DEFAULTS = {"presence_penalty": 0, "frequency_penalty": 0, "truncation": "disabled", "background": False,
                     "top_logprobs": 0, "modalities": ["text"]}


def _unsupported_extras(body: BaseModel) -> str | None:
    for key, value in (body.model_extra or {}).items():
        if key in _CHANGES_OUTPUT and value is not None and value != _NEUTRAL_DEFAULTS.get(key, object()) \
                and value not in ({}, []):
            return key
    return None


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error this server answers with (4xx and 5xx alike)."""

    error: ErrorObject


ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in {
    400: "invalid request (the field is named in `param`), context_length_exceeded, unsupported parameter",
    401: "missing or wrong API key", 404: "unknown model or response id", 413: "request body over the limit",
    429: "too many requests waiting (see Retry-After)", 500: "server error (the message has the request id)",
    504: "the request ran past the server's deadline"}.items()}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """An OpenAI-shaped error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
