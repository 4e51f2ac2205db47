"""The Responses API's request model (`POST /v1/responses`), validated once at the gateway.

The gateway serves the Responses API on top of chat completions (gateway/responses/), so
this model only has to say what a Responses request may ask for; the chat request it becomes
is validated again by `wire.openai.ChatCompletionRequest`, the same rules as chat. What the
server cannot honour (built-in tools, background mode, images, reasoning settings) is a 400
naming the parameter, never silently ignored. Input items stay plain dicts here and are
checked item by item by the translator, so its errors can name `input[2].content[0].type`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from wire.errors import bad_request

# Tool types of the Responses API that run on OpenAI's side; this server has none of them.
BUILTIN_TOOLS = ("web_search", "web_search_preview", "file_search", "computer_use_preview",
                 "computer", "code_interpreter", "image_generation", "mcp", "local_shell",
                 "shell", "apply_patch", "custom")
INCLUDE_OK = frozenset({"reasoning.encrypted_content"})  # nothing to include: no reasoning


class ResponsesRequest(BaseModel):
    # Unknown fields are ignored (forward compatibility), as on the chat path.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] = ""
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: str | None = None
    # Refused when set (checked below): the server cannot do them.
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    conversation: Any = None
    prompt: Any = None
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponsesRequest:
        if self.background:
            raise bad_request("background responses are not supported by this server.",
                              param="background")
        if self.conversation is not None:
            raise bad_request("The Conversations API is not supported; continue a "
                              "conversation with previous_response_id.", param="conversation")
        if self.prompt is not None:
            raise bad_request("Prompt templates are not supported.", param="prompt")
        if self.reasoning and any(v is not None for v in self.reasoning.values()):
            raise bad_request("This model does not support reasoning settings.",
                              param="reasoning")
        if self.top_logprobs:
            raise bad_request("top_logprobs is not supported on /v1/responses; use chat "
                              "completions with logprobs.", param="top_logprobs")
        for i, inc in enumerate(self.include or []):
            if inc not in INCLUDE_OK:
                raise bad_request(f"include value {inc!r} is not supported.",
                                  param=f"include[{i}]")
        if self.truncation not in (None, "disabled"):
            raise bad_request("Only truncation 'disabled' is supported: input over the "
                              "context window is a 400.", param="truncation")
        if isinstance(self.input, str) and not self.input and not self.previous_response_id:
            raise bad_request("input must not be empty.", param="input")
        for i, tool in enumerate(self.tools or []):
            kind = tool.get("type")
            if kind != "function":
                what = "built-in tool" if isinstance(kind, str) and kind.startswith(
                    BUILTIN_TOOLS) else "tool type"
                raise bad_request(f"The {what} {kind!r} is not supported by this server; "
                                  "only 'function' tools are.", param=f"tools[{i}].type")
        self._check_text()
        return self

    def _check_text(self) -> None:
        text = self.text or {}
        if text.get("verbosity") not in (None, "medium"):
            raise bad_request("text.verbosity is not supported.", param="text.verbosity")
        fmt = text.get("format")
        if fmt is None:
            return
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object",
                                                                  "json_schema"):
            raise bad_request("text.format.type must be 'text', 'json_object' or "
                              "'json_schema'.", param="text.format.type")
        if fmt["type"] == "json_schema" and not isinstance(fmt.get("schema"), dict):
            raise bad_request("text.format json_schema needs a 'schema' object.",
                              param="text.format.schema")

    @property
    def text_format(self) -> dict[str, Any]:
        fmt = (self.text or {}).get("format")
        return fmt if isinstance(fmt, dict) else {"type": "text"}
