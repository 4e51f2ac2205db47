"""LangChain's ChatOpenAI against a real gateway in front of each real backend's worker:
`bind_tools` with a forced tool, `with_structured_output` by json_schema and by
function_calling. Shape and validity are checked, not the 135M model's judgement."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import jsonschema
import pytest
from conftest import MODEL, ApiTarget
from procs import Gateway, start_gateway, wait_for

langchain_openai = pytest.importorskip("langchain_openai")
from langchain_core.tools import tool  # noqa: E402
from langchain_core.utils.function_calling import convert_to_openai_tool  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402


class Person(BaseModel):
    """A fictional person."""

    name: str = Field(max_length=30)
    age: int


@tool
def get_weather(city: str, unit: str = "celsius") -> str:
    """The current weather in a city."""
    return f"sunny in {city}"


@pytest.fixture(scope="module")
def gateway(api: ApiTarget) -> Iterator[Gateway]:
    g = start_gateway("--worker", api.url)
    try:
        wait_for(lambda: any(w["state"] in ("ready", "busy") for w in
                             httpx.get(f"{g.url}/cluster", timeout=5).json()["workers"]),
                 30, 0.05, "the worker ready at the gateway")
        yield g
    finally:
        g.proc.stop()


def _llm(g: Gateway):
    return langchain_openai.ChatOpenAI(base_url=f"{g.url}/v1", api_key="none", model=MODEL,
                                       temperature=0, max_tokens=100, max_retries=0,
                                       timeout=120)


def test_bind_tools_with_a_forced_tool(gateway: Gateway) -> None:
    msg = _llm(gateway).bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather like in Paris?")
    assert [c["name"] for c in msg.tool_calls] == ["get_weather"]
    assert not msg.invalid_tool_calls
    schema = convert_to_openai_tool(get_weather)["function"]["parameters"]
    for call in msg.tool_calls:
        assert call["id"].startswith("call_")
        jsonschema.validate(call["args"], schema)
    assert msg.response_metadata["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(gateway: Gateway, method: str) -> None:
    person = _llm(gateway).with_structured_output(Person, method=method).invoke(
        "Invent a person with a name and an age.")
    assert isinstance(person, Person)
    jsonschema.validate(person.model_dump(), Person.model_json_schema())
