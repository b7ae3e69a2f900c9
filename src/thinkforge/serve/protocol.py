"""Request bodies of the OpenAI-compatible API (pydantic), in the order of the OpenAI reference.

Only what thinkforge uses is declared; other fields the SDK may send (``store``, ``metadata``, ``user``,
``tools`` …) are accepted and ignored, as the OpenAI API ignores what does not apply. Wrong types and
out-of-range values are rejected (400 with the field named). Responses are built as plain dicts in
``service.py``: the SDK does not validate them, so their shape is pinned by tests with the real client.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class InputText(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["input_text", "output_text", "text"] = "input_text"
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="ignore")
    effort: Effort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(_Request):
    """POST /v1/responses"""

    model: str
    input: str | list[Message]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, gt=0)
    reasoning: Reasoning | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v):
        if (isinstance(v, str) and not v.strip()) or (isinstance(v, list) and not v):
            raise ValueError("input must not be empty")
        return v


class ChatRequest(_Request):
    """POST /v1/chat/completions"""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)  # deprecated by OpenAI, still sent by many clients
    n: int = Field(default=1, ge=1, le=16)
    reasoning_effort: Effort | None = None
    stream: bool = False
    stream_options: dict | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """An OpenAI-shaped error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
