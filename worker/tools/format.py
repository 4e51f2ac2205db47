"""How a model writes tool calls, and rendering tool definitions and history into prompts.

Templates that know tools (they read the `tools` variable) get them as Hugging Face passes
them, and the call convention is read off the template text:

- hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Qwen 2.5/3,
  Hermes 2/3, SmolLM3 and most ChatML tool models),
- llama3: the whole answer is `{"name": ..., "parameters": {...}}` (Llama 3.1-3.3 JSON
  tool calling).

Templates that do not (the bundled SmolLM2) get Corral's generic format: the tool list and
the hermes call convention are described in the system message, tool calls in the history
are written out in that convention, and tool results become user turns wrapped in
`<tool_response>`. Documented in README ("Tools and structured outputs").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolFormat:
    name: str
    begin: str  # text that opens a call ("" when the whole answer is the call)
    end: str  # text that closes it
    args_key: str  # "arguments" | "parameters"
    native: bool  # the model's template renders `tools` itself

    def call_text(self, name: str, arguments: str, closed: bool = True) -> str:
        """One call as the model writes it; `closed=False` leaves the arguments open."""
        head = f'{self.begin}\n{{"name": {json.dumps(name)}, "{self.args_key}": ' \
            if self.begin else f'{{"name": {json.dumps(name)}, "{self.args_key}": '
        if not closed:
            return head + arguments
        return head + arguments + ("}\n" + self.end if self.end else "}")


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments", native=True)
LLAMA3 = ToolFormat("llama3", "", "", "parameters", native=True)
GENERIC = ToolFormat("generic", "<tool_call>", "</tool_call>", "arguments", native=False)


def detect(template: str | None) -> ToolFormat:
    """The call convention a chat template teaches its model (GENERIC if it knows none)."""
    src = template or ""
    if "tools" not in src:
        return GENERIC
    if "<tool_call>" in src:
        return HERMES
    if "<|start_header_id|>" in src and ('"parameters"' in src or "parameters" in src):
        return LLAMA3
    return GENERIC


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments) if arguments else {}
    except ValueError:
        return arguments


def generic_system(tools: list[dict[str, Any]], required: str | None) -> str:
    """Corral's generic tool instructions, for templates that know no tools."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    must = ""
    if required == "required":
        must = "\nYou must call at least one function now."
    elif required:
        must = f"\nYou must call the function {required!r} now."
    return (
        "You can call functions. The available functions, with their parameters as JSON "
        f"Schema:\n<tools>\n{listing}\n</tools>\nTo call a function, answer with one "
        "<tool_call></tool_call> block per call holding a JSON object with the function's "
        'name and arguments:\n<tool_call>\n{"name": "<function-name>", "arguments": '
        "{<arguments>}}\n</tool_call>" + must
    )


def prior_text(fmt: ToolFormat, content: str, calls: list[dict[str, Any]]) -> str:
    """An assistant turn with its calls, as raw model text (the last call may be open)."""
    parts = [content] if content else []
    for i, call in enumerate(calls):
        fn = call["function"]
        args = fn.get("arguments") or ""
        last = i == len(calls) - 1
        closed = not last or _complete_json(args)
        parts.append(fmt.call_text(fn["name"], args, closed))
    sep = "\n" if fmt.begin else ""
    return sep.join(parts)


def _complete_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def render_messages(
    messages: list[dict[str, Any]], fmt: ToolFormat, tools: list[dict[str, Any]] | None,
    choice: str | None, continue_final: bool,
) -> list[dict[str, Any]]:
    """Messages for the chat template: tool history in the form the template expects.

    `messages` are OpenAI-shaped dicts (role, content text, tool_calls, tool_call_id). The
    final assistant message of a continuation becomes raw text (content plus its calls,
    the last one possibly open), so generation continues it exactly."""
    out: list[dict[str, Any]] = []
    last = len(messages) - 1
    for i, m in enumerate(messages):
        role, calls = m["role"], m.get("tool_calls") or []
        if role == "assistant" and calls and (continue_final and i == last or not fmt.native):
            out.append({"role": "assistant", "content": prior_text(fmt, m["content"], calls)})
        elif role == "assistant" and calls:
            out.append({
                "role": "assistant", "content": m["content"] or None,
                "tool_calls": [{"id": c.get("id"), "type": "function", "function": {
                    "name": c["function"]["name"],
                    "arguments": _arguments_object(c["function"].get("arguments") or ""),
                }} for c in calls],
            })
        elif role == "tool" and not fmt.native:
            out.append({"role": "user",
                        "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif role == "tool":
            out.append({"role": "tool", "content": m["content"],
                        "tool_call_id": m.get("tool_call_id")})
        else:
            out.append({"role": role, "content": m["content"]})
    if not fmt.native:
        out = _merge_turns(out)
    if tools and not fmt.native:
        text = generic_system(tools, None if choice in ("auto", None) else choice)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "role": "system",
                      "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _merge_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent turns of one role as one (a tool result written as a user turn followed by
    the user's next message): templates that insist on alternating roles accept it."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if out and m["role"] == out[-1]["role"] and m["role"] in ("user", "assistant"):
            out[-1] = {**out[-1], "content": f"{out[-1]['content'] or ''}\n\n"
                                              f"{m['content'] or ''}"}
        else:
            out.append(m)
    return out
