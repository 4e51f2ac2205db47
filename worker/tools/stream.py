"""Generated text -> OpenAI content and `tool_calls`, incrementally.

`CallParser.feed(text)` returns the deltas to stream: content text, a call's header
(index, id, type, name: as soon as the name is complete) and then its `arguments` in the
increments they are generated in. A JSON scanner finds where the arguments object ends,
so the wrapper's closing brace and end tag never leak into the arguments. Constrained
decoding guarantees the `{"name": ..., "arguments": ...}` order; unconstrained text that
does not follow it is given back as content, never dropped.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from worker.tools.format import ToolFormat

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"'
                   r"\s*:\s*")
_HEAD_LIMIT = 256  # a header longer than this is not one: give the text back as content


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class _JsonEnd:
    """Tracks one JSON value char by char; `done` once it is complete."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.started = False
        self.done = False

    def feed(self, ch: str) -> None:
        if self.in_str:
            if self.esc:
                self.esc = False
            elif ch == "\\":
                self.esc = True
            elif ch == '"':
                self.in_str = False
        elif ch == '"':
            self.in_str = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
        self.started = self.started or not ch.isspace()
        if self.started and self.depth == 0 and not self.in_str and ch in '}]"':
            self.done = True


@dataclass
class Call:
    id: str
    name: str
    arguments: str = ""

    def wire(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class CallParser:
    fmt: ToolFormat
    calls: list[Call] = field(default_factory=list)
    content: str = ""
    _state: str = "text"  # text | head | args | tail
    _buf: str = ""
    _json: _JsonEnd | None = None
    _at_start: bool = True

    # ------------------------------------------------------------------ feeding
    def feed(self, text: str) -> list[dict[str, Any]]:
        """Deltas for `text`: {"content": ...} or {"tool_calls": [...]} dicts."""
        out: list[dict[str, Any]] = []
        self._buf += text
        while self._buf:
            before = (self._state, len(self._buf))
            getattr(self, f"_{self._state}")(out)
            if (self._state, len(self._buf)) == before:
                break  # needs more text
        return _merge(out)

    def finish(self) -> list[dict[str, Any]]:
        """Whatever is held back, at the end of generation."""
        out: list[dict[str, Any]] = []
        if self._state in ("text", "head") and self._buf:
            self._text_out(out, self._buf)
        self._buf = ""
        return _merge(out)

    # ------------------------------------------------------------------ states
    def _text(self, out: list[dict[str, Any]]) -> None:
        begin = self.fmt.begin
        if not begin:  # the whole answer is the call, or it is text
            if self._at_start and not self.calls:
                stripped = self._buf.lstrip()
                if not stripped:
                    return
                if stripped[0] == "{":
                    self._state = "head"
                    return
            self._text_out(out, self._buf)
            self._buf = ""
            return
        at = self._buf.find(begin)
        if at >= 0:
            self._text_out(out, self._buf[:at])
            self._buf = self._buf[at + len(begin):]
            self._state = "head"
            return
        keep = _partial_suffix(self._buf, begin)
        self._text_out(out, self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]

    def _head(self, out: list[dict[str, Any]]) -> None:
        m = _HEAD.match(self._buf)
        if m is None:
            if len(self._buf) > _HEAD_LIMIT or _not_a_head(self._buf):
                self._text_out(out, (self.fmt.begin or "") + self._buf)
                self._buf = ""
                self._state = "text"
            return
        call = Call(call_id(), _unescape(m.group(1)))
        self.calls.append(call)
        out.append({"tool_calls": [{"index": len(self.calls) - 1, "id": call.id,
                                    "type": "function",
                                    "function": {"name": call.name, "arguments": ""}}]})
        self._buf = self._buf[m.end():]
        self._json = _JsonEnd()
        self._state = "args"

    def _args(self, out: list[dict[str, Any]]) -> None:
        assert self._json is not None
        taken = 0
        for ch in self._buf:
            self._json.feed(ch)
            taken += 1
            if self._json.done:
                break
        piece, self._buf = self._buf[:taken], self._buf[taken:]
        if self._json.started:
            piece = piece if self.calls[-1].arguments else piece.lstrip()
            if piece:
                self.calls[-1].arguments += piece
                out.append({"tool_calls": [{"index": len(self.calls) - 1,
                                            "function": {"arguments": piece}}]})
        if self._json.done:
            self._state = "tail"

    def _tail(self, out: list[dict[str, Any]]) -> None:
        end = self.fmt.end
        if not end:
            at = self._buf.find("}")
            if at < 0:
                self._buf = ""
                return
            self._buf = self._buf[at + 1:]
        else:
            at = self._buf.find(end)
            if at < 0:
                keep = _partial_suffix(self._buf, end)
                self._buf = self._buf[len(self._buf) - keep:]
                return
            self._buf = self._buf[at + len(end):]
        self._state = "text"
        self._at_start = False

    def _text_out(self, out: list[dict[str, Any]], text: str) -> None:
        if not text:
            return
        if self.calls and not text.strip():  # whitespace between and after calls
            return
        if not self.content and self.fmt.begin:
            text = text.lstrip()
        if text:
            self._at_start = False
            self.content += text
            out.append({"content": text})

    # ------------------------------------------------------------------ results
    def message(self) -> tuple[str | None, list[dict[str, Any]] | None]:
        """(content, tool_calls) of a whole answer, as a non-streamed response has them."""
        content = self.content.strip() or None if self.calls else self.content
        return content, [c.wire() for c in self.calls] or None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


def _not_a_head(buf: str) -> bool:
    """Whether `buf` can no longer grow into a call header."""
    stripped = buf.lstrip()
    if not stripped:
        return False
    probe = '{"name"'
    compact = re.sub(r"\s+", "", stripped)[: len(probe)]
    return not probe.startswith(compact)


def _unescape(s: str) -> str:
    try:
        return json.loads(f'"{s}"')
    except ValueError:
        return s


def _merge(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent content deltas as one (one chunk per feed where possible)."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        if out and "content" in d and "content" in out[-1]:
            out[-1] = {"content": out[-1]["content"] + d["content"]}
        else:
            out.append(d)
    return out
