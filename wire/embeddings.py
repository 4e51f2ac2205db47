"""`POST /v1/embeddings`: the request model and the response builder, as OpenAI shapes them.

Shared by the worker (which computes) and the gateway (which validates once at the edge and
estimates tokens for the key's tpm). Import-light: numpy and pydantic only.
"""

from __future__ import annotations

import base64
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

#: OpenAI's own bound on the number of inputs in one request.
MAX_INPUTS = 2048


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request. `input`: a string, strings, a token array or token arrays."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    # Token arrays first: a list of ints must not be read as strings, nor [] as anything.
    input: str | list[int] | list[str] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _shape(cls, v: Any) -> Any:
        # One clear message (param "input") instead of one per member of the union.
        ok = isinstance(v, str) or (isinstance(v, list) and (
            all(isinstance(x, str) for x in v)
            or all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            or all(isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                               for t in x) for x in v)))
        if not ok:
            raise ValueError("input must be a string, a list of strings, a token array "
                             "(integers) or a list of token arrays")
        return v

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("input must not be empty")
        if isinstance(items[0], int):  # one token array
            items = [items]
        if len(items) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs are allowed in one request")
        for i, item in enumerate(items):
            if not item:
                raise ValueError(f"input[{i}] is empty; every input needs some text or tokens")
        return v

    # What the gateway's shared request path (gateway/api/openai._proxy) reads of a
    # request: an embeddings request never streams, has one "choice" and no completion.
    stream: ClassVar[bool] = False
    include_usage: ClassVar[bool] = False
    n: ClassVar[int] = 1
    top_n: ClassVar[None] = None
    limit: ClassVar[None] = None

    @property
    def items(self) -> list[str | list[int]]:
        """The inputs as a list: each a string or a token array."""
        v = self.input
        if isinstance(v, str):
            return [v]
        if v and isinstance(v[0], int):
            return [v]  # type: ignore[list-item]
        return list(v)  # type: ignore[arg-type]

    def text_chars(self) -> int:
        """Characters (strings) or tokens (arrays) in, for a tpm estimate before tokenizing."""
        return sum(len(x) for x in self.items)


def encode(vector: np.ndarray, fmt: str) -> Any:
    """One embedding as OpenAI sends it: a float32 array, or its little-endian bytes in base64."""
    v = np.ascontiguousarray(vector, dtype="<f4")
    if fmt == "base64":
        return base64.b64encode(v.tobytes()).decode("ascii")
    return v  # written by orjson with OPT_SERIALIZE_NUMPY: float32's shortest form, no copy


def response(model: str, vectors: list[np.ndarray], fmt: str, prompt_tokens: int
             ) -> dict[str, Any]:
    """The response body; `usage` comes last, where the gateway's accounting looks for it."""
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v, fmt)}
                 for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
