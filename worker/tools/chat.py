"""The chat API's tools/structured-output path: prompt, constraint and output shaping.

`plan(req, backend)` is used only when a request carries tools, tool history or a JSON
response_format; every other chat keeps the plain path. The plan renders the prompt (the
model's template with `tools` when it knows them, the generic format otherwise), builds the
constraint, and shapes the output: `Output.feed` turns text deltas into OpenAI deltas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wire import openai as oa
from worker.tools import format as tf
from worker.tools.constraint import Constraint, build
from worker.tools.stream import CallParser


def needed(req: oa.ChatCompletionRequest) -> bool:
    rf = req.response_format
    return bool(req.tools or (rf is not None and rf.type != "text")
                or any(m.tool_calls or m.role == "tool" for m in req.messages))


@dataclass
class Plan:
    prompt: str
    constraint: Constraint | None
    fmt: tf.ToolFormat
    calls: bool  # the output may hold tool calls: parse it
    prefix: str  # raw text a continuation starts from (already sent to the client)

    def output(self) -> Output:
        return Output(self)


def _messages(req: oa.ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    for m in req.messages:
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def plan(req: oa.ChatCompletionRequest, backend: Any) -> Plan:
    fmt = tf.detect(getattr(backend, "chat_template", None))
    choice = req.choice
    tools = [t.model_dump(by_alias=True, exclude_none=True) for t in req.tools or []] \
        if choice not in (None, "none") else []
    msgs = tf.render_messages(_messages(req), fmt, tools, choice, req.continue_final_message)
    native_tools = tools if fmt.native else None
    prompt = backend.render_tools(msgs, native_tools, req.continue_final_message)
    constraint = build(req, fmt)
    prefix = msgs[-1]["content"] or "" if req.continue_final_message else ""
    if constraint is not None and prefix:
        constraint = constraint.with_prefix(prefix)
    return Plan(prompt, constraint, fmt, constraint is not None and constraint.kind == "tools",
                prefix)


class Output:
    """Text deltas in, OpenAI chat deltas out (tool calls parsed when the plan has them)."""

    def __init__(self, p: Plan) -> None:
        self.parser = CallParser(p.fmt) if p.calls else None
        self.text: list[str] = []
        if self.parser is not None and p.prefix:
            self.parser.feed(p.prefix)  # silently: the client has these already
            self.parser.content = ""
            self._sent_calls = len(self.parser.calls)
        else:
            self._sent_calls = 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self.parser is None:
            self.text.append(text)
            return [{"content": text}] if text else []
        return self.parser.feed(text)

    def finish(self) -> list[dict[str, Any]]:
        return self.parser.finish() if self.parser is not None else []

    def finish_reason(self, reason: str) -> str:
        if reason == "stop" and self.parser is not None and self.parser.calls:
            return "tool_calls"
        return reason

    def message(self) -> tuple[str | None, list[dict[str, Any]] | None]:
        """(content, tool_calls) of the whole answer (after feed + finish)."""
        if self.parser is None:
            return "".join(self.text), None
        content, calls = self.parser.message()
        return content, (calls[self._sent_calls:] or None) if calls else None
