"""The OpenAI API's request models and response builders, shared by worker and gateway.

Requests are validated with pydantic once, at the edge. Responses and stream chunks are
built as plain dicts by the hot paths (the `chunk_*` builders) so that no per-token
validation happens. Import-light: no llama_cpp, no openvino, no web framework.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from wire import tools as wt


class _Lenient(BaseModel):
    # Clients (the OpenAI SDK, chat front ends) send fields we do not know yet; ignore them
    # rather than reject the request, as the OpenAI API does for forward compatibility.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class StreamOptions(_Lenient):
    include_usage: bool = False


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[wt.ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: which call this answers

    def text(self) -> str:
        """The message's text; image or audio parts are rejected earlier."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)


class SamplingFields(_Lenient):
    """Sampling settings common to chat and legacy completions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="Extension: 0 disables top-k.")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, description="Extension.")
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0, description="Extension.")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    # How many choices; the worker refuses more than its slots (a 400 naming `n`).
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[wt.Tool] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    response_format: wt.ResponseFormat | None = None
    # Extension (vLLM's name): render the template up to the final assistant message and
    # leave it open, so generation continues it. The gateway uses this for failover.
    continue_final_message: bool = False
    _choice: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        # Raises wire.errors.APIError (a 400 naming the parameter), which pydantic passes on.
        self._choice = wt.validate(self.tools, self.tool_choice, self.response_format)
        for m in self.messages:
            if isinstance(m.content, list):
                for p in m.content:
                    if p.type != "text":
                        raise ValueError(f"content part type {p.type!r} is not supported")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs a final assistant message")
        return self

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return v

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def choice(self) -> str | None:
        """tool_choice normalised: "none" | "auto" | "required" | the forced tool's name."""
        return self._choice

    @property
    def top_n(self) -> int | None:
        """Alternatives per token when logprobs are asked for (0: the chosen one only)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(...)
    max_tokens: int | None = Field(default=16, ge=1)
    # Legacy completions: the number of alternatives per token (OpenAI allows 5; we 20).
    logprobs: int | None = Field(default=None, ge=0, le=20)
    # Extension: where this answer's text starts in the whole answer, for `text_offset`
    # (the gateway continues a broken stream as a new request with a longer prompt).
    logprobs_offset: int = Field(default=0, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt is supported per request")
        return v

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported")
        return self

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def limit(self) -> int | None:
        return self.max_tokens

    @property
    def top_n(self) -> int | None:
        return self.logprobs


# --------------------------------------------------------------------------- responses


FinishReason = Literal["stop", "length"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _completion(
    object: str, id: str, model: str, created: int | None, choice: dict[str, Any],
    use: dict[str, Any],
) -> dict[str, Any]:
    """A whole (non-streamed) completion with its one choice."""
    return {
        "id": id,
        "object": object,
        "created": created or int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": use,
    }


def chat_completion(
    id: str, model: str, text: str | None, finish: str, use: dict[str, Any],
    created: int | None = None, tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": finish,
    }
    return _completion("chat.completion", id, model, created, choice, use)


#: The first delta of a chat stream, as OpenAI sends it.
ROLE_DELTA: dict[str, Any] = {"role": "assistant", "content": "", "refusal": None}


# chat_chunk and text_chunk repeat the same shape on purpose: they run once per streamed
# token, and folding them into one builder costs a call (~40 ns, ~5% of build + `sse`).
def chat_chunk(
    id: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    finish: str | None = None,
    use: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choices = [] if delta is None else [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    ]
    out: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if use is not None:
        out["usage"] = use
    return out


def text_completion(
    id: str, model: str, text: str, finish: str, use: dict[str, Any], created: int | None = None
) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return _completion("text_completion", id, model, created, choice, use)


def text_chunk(
    id: str,
    model: str,
    created: int,
    text: str | None,
    finish: str | None = None,
    use: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choices = [] if text is None else [
        {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    ]
    out: dict[str, Any] = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if use is not None:
        out["usage"] = use
    return out


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "corral"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
