"""Chat prompts from the model's own Jinja template (GGUF `tokenizer.chat_template`).

`continue_final=True` renders the conversation up to and including the final assistant
message but leaves that message open (no end-of-turn after it), so that generation
continues it: the gateway uses this to resume a stream on another worker. The template is
rendered with a unique marker in place of the final message's content and cut at the
marker, which works for any template without knowing its end-of-turn tokens.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from worker.backends.base import continued

# Used when a GGUF carries no template: ChatML, what most small instruct models speak.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson  # as Hugging Face renders it (no HTML escaping)
        self.source = source or CHATML
        self._template = env.from_string(self.source)
        self.bos_token = bos_token
        self.eos_token = eos_token

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None) -> str:
        extra = {"tools": tools} if tools else {}
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **extra,
        )

    def render(self, messages: list[dict[str, Any]], continue_final: bool = False,
               tools: list[dict[str, Any]] | None = None) -> str:
        if not continue_final:
            return self._render(messages, True, tools)
        text = continued(messages, lambda m: self._render(m, False, tools))
        if text is None:  # the template dropped the message: an open assistant turn instead
            return self._render(messages[:-1], True, tools) + (messages[-1].get("content") or "")
        return text


def _tojson(value: Any, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii)
