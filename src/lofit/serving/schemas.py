"""The request bodies the server accepts (OpenAI's shapes, the fields lofit serves) and its JSON errors.

Types are strict: ``"max_tokens": "5"`` or ``"stream": 1`` is a 422, not coerced. Fields of
OpenAI's API that are not listed are ignored. Decoding is greedy: ``temperature`` and
``top_p`` are accepted and do not change it (see docs/serving.md); ``n`` must be 1.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None

    def stop_strings(self, limit: int) -> tuple[str, ...]:
        """The stop strings (at most ``limit``, none empty): an ApiError 400 otherwise."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > limit or any(not s or len(s) > 200 for s in stops):
            raise ApiError(400, f"stop takes at most {limit} strings of 1 to 200 characters", param="stop")
        return tuple(stops)


class CompletionRequest(_Request):
    """POST /v1/completions: ``prompt`` is one string or a list of them (one choice each)."""

    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Request):
    """POST /v1/chat/completions: the messages, rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1)


HUB_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"


class AdapterLoadRequest(BaseModel):
    """POST /v1/adapters: load ``folder`` (a subfolder of the server's adapters folder) or ``hub_id``
    (``owner/name`` on the Hugging Face Hub, at ``revision``) under ``name``."""

    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    folder: str | None = Field(default=None, min_length=1, max_length=255)
    hub_id: str | None = Field(default=None, pattern=HUB_ID)
    revision: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._/-]{1,100}$")


def validation_error(error: ValidationError) -> ApiError:
    """A 422 naming each wrong field (at most five) and what is wrong with it."""
    problems = [
        f"{'.'.join(str(part) for part in item['loc']) or 'body'}: {item['msg']}" for item in error.errors()[:5]
    ]
    first = error.errors()[0]["loc"] if error.errors() else ()
    return ApiError(422, "; ".join(problems), param=str(first[0]) if first else None)
