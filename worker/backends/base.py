"""The small interface every backend implements.

A backend owns the model and its decode loop (usually a thread of its own). The engine
hands it `Sequence`s up to `slots` at a time; the backend feeds each one through the
sequence's thread-safe `emit`/`finish` and stops work on it when `cancelled` is set.
Stop strings, queueing and accounting live in the engine, once for every backend.
"""

from __future__ import annotations

import concurrent.futures
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wire.errors import bad_request


def continued(messages: list[dict[str, Any]], render: Callable[[list[dict[str, Any]]], str]
              ) -> str | None:
    """The conversation rendered up to the final (assistant) message's text, left open for
    the model to go on writing it (`continue_final_message`): `render` (a template without
    the generation prompt) is given a marker in that text's place and cut there. None when
    the template dropped the message."""
    final = messages[-1]
    marker = f"CORRALCONTINUE{uuid.uuid4().hex}"
    text = render([*messages[:-1], {**final, "content": marker}])
    cut = text.rfind(marker)
    return None if cut < 0 else text[:cut] + (final.get("content") or "")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and its most likely alternatives.

    `logprob`s are of the model's own distribution (log-softmax of the raw logits, before
    penalties, temperature and truncation), as OpenAI reports them."""

    piece: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass
class Sequence:
    """One generation in flight, shared by the engine (reader) and the backend (writer)."""

    id: str
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    # Called from the backend's thread: a text delta and how many tokens it covers.
    on_tokens: Callable[[str, int], None]
    # Called once from the backend's thread: "stop", "length", or "error".
    on_finish: Callable[[str, str | None], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Filled by the backend: how many prompt tokens came from its prompt cache.
    cached_tokens: int = 0
    # What `Backend.compile_constraint` made of the request's constraint (None: free text).
    constraint: Any = None
    # Log-probabilities: None = off, k = the chosen token's plus the top k alternatives'.
    # The backend calls `on_logprobs` (its thread) just before the `on_tokens` that
    # covers the same tokens; it may report a token's logprob before its text.
    logprobs: int | None = None
    on_logprobs: Callable[[list[TokenLogprob]], None] | None = None
    # n > 1: the other choices of the same request. They share this sequence's prompt
    # evaluation (a backend that can fork evaluates the prompt once) and are submitted
    # with it, never on their own; `index` is the choice's position in the response.
    forks: list[Sequence] = field(default_factory=list)
    index: int = 0


class BackendError(Exception):
    """The backend cannot serve a request (bad input it detected, or a broken model)."""


class Backend(ABC):
    name: str = "base"
    #: Tokens one sequence may hold (prompt + completion).
    n_ctx: int = 2048
    #: Sequences decoded at once.
    slots: int = 1
    #: Sequences it takes beyond `slots` and starts itself the step a slot frees (a round
    #: trip through the engine's queue would leave that slot idle for a step).
    backlog: int = 0
    #: Where the loaded model came from (a path), for placement and status.
    model_path: str | None = None
    #: Completion budget when a request names none (None: the rest of the context).
    default_max_tokens: int | None = None
    #: Greedy output the same alone and batched, as measured at load (None: not measured).
    batch_invariant: bool | None = None

    @abstractmethod
    def load(self) -> None:
        """Load the model and start the decode loop. Blocking; call off the event loop."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Tokens of a fully rendered prompt (special tokens parsed, BOS as the model wants)."""

    @abstractmethod
    def render_chat(self, messages: list[dict[str, str]], continue_final: bool = False) -> str:
        """The prompt text for a conversation, from the model's own chat template."""

    def capabilities(self) -> dict[str, int]:
        """What `/status` advertises for routing: the most `top_logprobs` and `n` honoured."""
        return {"top_logprobs": 20, "n": self.slots}

    def validate_choices(self, n: int, top_logprobs: int | None, greedy: bool) -> None:
        """Refuse (400) `n` or `top_logprobs` this backend cannot honour."""
        if n > self.slots:
            raise bad_request(
                f"n={n} is more than this worker's {self.slots} slots; ask for at most "
                f"{self.slots} choices", param="n", code="unsupported_parameter")
        cap = self.capabilities()["top_logprobs"]
        if top_logprobs is not None and top_logprobs > cap:
            raise bad_request(
                f"top_logprobs={top_logprobs} is more than the {self.name} backend's limit "
                f"of {cap}", param="top_logprobs", code="unsupported_parameter")

    def embeddings(self) -> dict[str, Any] | None:
        """What this backend's embeddings are (pooling, dimensions, window) for /status;
        None when it cannot compute any (then `embed` is a 400)."""
        return None

    #: Why `embed` refuses, when the backend knows better than "cannot".
    embeddings_unavailable: str = ""
    #: Tokens the longest embedding input may have.
    embed_window: int = 0
    #: Token ids run from 0 to this (token-array inputs are checked against it).
    vocab_size: int = 0

    def embed(self, inputs: list[list[int]], cancelled: threading.Event
              ) -> concurrent.futures.Future[list[Any]]:
        """Starts computing one normalised vector per input (token lists within
        `embed_window`); the future is set from the backend's thread."""
        why = f" {self.embeddings_unavailable}" if self.embeddings_unavailable else ""
        raise bad_request(f"The {self.name} backend on this worker cannot compute embeddings "
                          f"for this model.{why}", param="model", code="embeddings_unsupported")

    def validate(self, params: SamplingParams) -> None:  # noqa: B027 - optional hook
        """Refuse (raise `wire.errors.bad_request`) what this backend cannot honour.

        Called by the API before a response starts, so the client gets a 400, not a cut.
        """

    def compile_constraint(self, constraint: Any) -> Any:
        """Backend form of a `worker.tools.constraint.Constraint` (called before a
        response starts); a 400 naming the parameter when this backend cannot enforce it."""
        from wire.errors import bad_request

        param = "tools" if constraint.kind == "tools" else "response_format"
        raise bad_request(f"The {self.name} backend does not do constrained decoding.",
                          param=param)

    @abstractmethod
    def submit(self, seq: Sequence) -> None:
        """Start generating `seq`. Must not block; the engine never exceeds `slots` +
        `backlog`."""

    def cancel(self, seq: Sequence) -> None:
        """Stop work on `seq` soon; it still gets its `on_finish`."""
        seq.cancelled.set()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop the decode loop and free the model."""

    def stats(self) -> dict[str, int]:
        """Backend counters for `/status` (prompt cache hits, reused tokens, …)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Backend-specific hardware facts (device, devices present)."""
        return {"device": "CPU", "devices": ["CPU"]}
