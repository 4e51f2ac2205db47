"""The backend a worker has before a model is placed on it (started without `--model`).

It reports the slots and context a placed model will get (the planner sizes its KV cache
from them) and answers every request with a 503 `no_model`. Its own module because the
worker state starts with it and the control API returns to it on teardown.
"""

from __future__ import annotations

from typing import Any

from wire.errors import APIError
from worker.backends.base import Backend


class IdleBackend(Backend):
    """Stands in for a backend until the gateway places a model here.

    A `Backend` like any other, so every hook the worker's status and routes call (they
    grow with the protocol: capabilities, embeddings, ...) has its default here too.
    """

    model_path = None
    default_max_tokens = None
    batch_invariant = None  # nothing loaded, nothing measured (/status reads it)

    def __init__(self, slots: int = 1, n_ctx: int = 2048, name: str = "llama") -> None:
        # What a placed model will get: the planner sizes its KV cache from these. The name
        # is the backend the worker will load, so placement sees what it is placing on.
        self.slots = max(1, slots)
        self.n_ctx = n_ctx
        self.name = name

    def load(self) -> None:
        pass

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {}

    def capabilities(self) -> dict[str, int]:
        return {"top_logprobs": 0, "n": self.slots}  # nothing to serve yet

    def describe(self) -> dict[str, Any]:
        return {"device": "CPU", "devices": ["CPU"]}

    @staticmethod
    def _none() -> APIError:
        return APIError(503, "No model is placed on this worker yet.", "service_unavailable",
                        None, "no_model")

    def tokenize(self, text: str) -> list[int]:
        raise self._none()

    def render_chat(self, messages: list[dict[str, str]], continue_final: bool = False) -> str:
        raise self._none()

    def submit(self, seq: Any) -> None:
        seq.on_finish("error", "no model is placed on this worker")

    def cancel(self, seq: Any) -> None:
        seq.cancelled.set()
