"""Tool rendering, parsing and grammars against real chat templates (tests/data/templates/,
plus the bundled SmolLM2's own from its GGUF), in process: no generation needed.

Grammars are checked with llama.cpp's own grammar engine on the bundled model's vocabulary:
a well-formed call in the model's convention is accepted token by token, a call to a tool
that was not offered, or arguments off the schema, are refused.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import MODEL

from worker.tools import format as tf
from worker.tools.constraint import Constraint
from worker.tools.stream import CallParser

DATA = Path(__file__).parent / "data" / "templates"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                           "parameters": WEATHER}}]
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    {"role": "user", "content": "And now?"},
]
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed")
CASES = {
    "Qwen-Qwen2.5-7B-Instruct": tf.HERMES,
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": tf.HERMES,
    "meta-llama-Llama-3.2-3B-Instruct": tf.LLAMA3,
    "mistralai-Mistral-Nemo-Instruct-2407": tf.GENERIC,
}


def _smollm2_template() -> str:
    import gguf

    from worker.models import resolve

    field = gguf.GGUFReader(str(resolve(MODEL)[1])).fields["tokenizer.chat_template"]
    return bytes(field.parts[-1]).decode()


def _template(name: str) -> str:
    return _smollm2_template() if name == "smollm2" else (DATA / f"{name}.jinja").read_text()


def _render(src: str, fmt: tf.ToolFormat, messages: list[dict], continue_final: bool = False
            ) -> str:
    from worker.backends.llama_chat import ChatTemplate

    msgs = tf.render_messages(messages, fmt, TOOLS, "auto", continue_final)
    return ChatTemplate(src, "<s>", "</s>").render(msgs, continue_final,
                                                   tools=TOOLS if fmt.native else None)


@pytest.mark.parametrize("name", [*CASES, "smollm2"])
def test_tools_and_tool_history_reach_the_prompt(name: str) -> None:
    src = _template(name)
    fmt = tf.detect(src)
    assert fmt == CASES.get(name, tf.GENERIC)
    prompt = _render(src, fmt, HISTORY)
    assert "get_weather" in prompt and '"city"' in prompt  # the definition
    assert "sunny, 21C" in prompt  # the tool's result
    assert prompt.count("Paris") >= 2  # the question and the earlier call's arguments
    if not fmt.native:
        assert "<tools>" in prompt and "<tool_response>" in prompt


@pytest.mark.parametrize("name", [*CASES, "smollm2"])
def test_a_call_in_the_models_convention_parses_back(name: str) -> None:
    fmt = tf.detect(_template(name))
    text = fmt.call_text("get_weather", '{"city": "Paris"}')
    p = CallParser(fmt)
    deltas = [d for ch in text for d in p.feed(ch)] + p.finish()
    content, calls = p.message()
    assert content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] \
        == [("get_weather", {"city": "Paris"})]
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert sum("tool_calls" in d for d in deltas) > 5  # arguments came char by char


def test_continuation_renders_the_open_call_last() -> None:
    src = _template("Qwen-Qwen2.5-7B-Instruct")
    partial = [*HISTORY[:2], {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Pa'}}]}]
    prompt = _render(src, tf.HERMES, partial, continue_final=True)
    assert prompt.endswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')


@needs_llama
@pytest.mark.parametrize("fmt", [tf.HERMES, tf.LLAMA3, tf.GENERIC], ids=lambda f: f.name)
def test_grammars_accept_calls_and_refuse_others(fmt: tf.ToolFormat) -> None:
    import llama_cpp

    from worker.backends.llama_grammar import GrammarSampler, compile_gbnf, text_tokens
    from worker.models import resolve

    llm = llama_cpp.Llama(str(resolve(MODEL)[1]), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    def accepts(c: Constraint, text: str) -> bool:
        g = GrammarSampler(vocab, n_vocab, *compile_gbnf(c))
        try:
            g.prime(text_tokens(vocab, text))
        except ValueError:
            return False
        finally:
            g.free()
        return True

    tools = (("get_weather", WEATHER), ("get_time", {"type": "object"}))
    forced = Constraint("tools", tools=tools, fmt=fmt, mode="required")
    good = fmt.call_text("get_weather", '{"city": "Paris"}')
    assert accepts(forced, good)
    assert not accepts(forced, fmt.call_text("rm_rf", "{}"))  # not offered
    assert not accepts(forced, fmt.call_text("get_weather", '{"town": "Paris"}'))  # off schema
    assert not accepts(forced, "Sure! " + good)  # required: a call at once
    lazy = Constraint("tools", tools=tools, fmt=fmt, mode="auto")
    if fmt.begin:  # auto: free text, then the grammar takes hold at the opening tag
        assert accepts(lazy, "Let me check. " + good)
        assert not accepts(lazy, "Let me check. " + fmt.call_text("rm_rf", "{}"))
    assert accepts(lazy, "It is sunny in Paris.")
    schema = Constraint("json_schema", schema=WEATHER)
    assert accepts(schema, '{"city": "Oslo"}') and not accepts(schema, '{"city": 3}')
    assert not accepts(Constraint("json_object"), "[1]")
    # Length bounds as GBNF repetitions: a large bound compiles, a small one holds.
    for bound, text, ok in ((8000, "hello", True), (3, "abc", True), (3, "abcd", False)):
        short = {"type": "object", "properties": {"a": {"type": "string", "maxLength": bound}}}
        assert accepts(Constraint("json_schema", schema=short), f'{{"a": "{text}"}}') is ok


@pytest.mark.skipif(importlib.util.find_spec("openvino_genai") is None,
                    reason="openvino-genai is not installed")
def test_openvino_configs_build() -> None:
    from worker.backends.openvino_structured import compile_config

    tools = (("get_weather", WEATHER),)
    for c in (Constraint("json_object"), Constraint("json_schema", schema=WEATHER),
              Constraint("tools", tools=tools, fmt=tf.GENERIC, mode="auto"),
              Constraint("tools", tools=tools, fmt=tf.HERMES, mode="required"),
              Constraint("tools", tools=tools, fmt=tf.LLAMA3, mode="required",
                         parallel=False)):
        cfg = compile_config(c)
        assert cfg.json_schema or cfg.grammar or cfg.structural_tags_config
