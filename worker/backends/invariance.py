"""Is greedy output the same alone and in a batch? Measured once at load, shown in `/status`.

Mid-stream failover continues a stream on another worker from the text already sent; with
greedy decoding the whole answer then equals an uninterrupted one only if a sequence's
tokens do not depend on which other sequences share its decode steps. Whether they do is a
property of the kernels a backend picks on this CPU (bf16 on AVX512_BF16 parts, dynamic
activation quantization, a KV cache quantized per block), so it is measured here, on this
box, rather than assumed: a few prompts decoded greedily one at a time, then together with
staggered starts (so that a newcomer's prefill shares steps with the others' decoding), and
the texts compared. A probe can only ever prove a difference; equal texts are evidence, and
the prompts are chosen to diverge early where kernels differ (measured: the unfixed
OpenVINO setup on an AMD EPYC with AVX-512 diverged within 6-15 tokens on 3 of 4 prompts).

The probe takes ~3 s of a llama worker's ~5 s load, so a backend may pass a `key` (all that
the verdict depends on: engine build and CPU features, model file, threads, slots, batch
size, the backend's CORRAL_* knobs): a verdict measured once for that key is kept under
~/.cache/corral/invariance and read back at the next load, as OpenVINO keeps its compiled
models. A restarted worker, or a model loaded again on demand, is serving seconds sooner.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.backends.base import Backend, SamplingParams, Sequence
from worker.backends.knobs import cache_home

log = logging.getLogger("corral.worker")

#: Chat prompts (the text real requests decode); the llama backend empties its KV cache
#: afterwards, so no probe prefix lingers for a real chat to reuse.
PROMPTS = (
    "What is 2+2?",
    "Tell me about cats.",
    "Write a haiku about rain.",
    "Name three colors and a number.",
)
TOKENS = 48
#: The second and third prompts start once the first has produced this many tokens each.
STAGGER = 3


@dataclass
class Verdict:
    invariant: bool | None  # None: could not be measured (timed out, or an error)
    detail: str


@dataclass
class _Probe:
    seq: Sequence
    parts: list[str] = field(default_factory=list)
    produced: int = 0
    finish: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def probe(backend: Backend, submit: Callable[[Sequence], None],
          on_last_finish: Callable[[], None] | None = None,
          key: dict[str, Any] | None = None) -> bool:
    """Sets `backend.batch_invariant` from `measure` (or from the verdict kept for `key`),
    and logs why when it is not. Call at the end of `load`, once the decode loop runs.
    Returns whether the verdict was a kept one."""

    def render(user: str) -> str:
        return backend.render_chat([{"role": "user", "content": user}])

    path = _verdict_path(key) if key is not None else None
    verdict = _read(path) if path is not None else None
    kept = verdict is not None
    if kept:
        log.info("%s: batch invariance as measured before on this host (%s)", backend.name,
                 path)
        if on_last_finish is not None:  # what the probe's last sequence would have run
            _run_one(submit, backend.tokenize(render(PROMPTS[0])), 120.0, on_last_finish,
                     tokens=1)
    else:
        verdict = measure(submit, backend.tokenize, render, backend.slots,
                          on_last_finish=on_last_finish)
        if path is not None and verdict.invariant is not None:
            _write(path, verdict, key)
    backend.batch_invariant = verdict.invariant
    if verdict.invariant is not True:
        log.warning("%s: greedy output is not batch-invariant on this host (%s); mid-stream "
                    "failover still continues from the exact text sent, but the rest may "
                    "differ from an uninterrupted answer", backend.name, verdict.detail)
    return kept


def measure(
    submit: Callable[[Sequence], None],
    tokenize: Callable[[str], list[int]],
    render: Callable[[str], str],
    slots: int,
    *,
    on_last_finish: Callable[[], None] | None = None,
    timeout: float = 120.0,
) -> Verdict:
    """Runs the probe through `submit` (the backend's own path); blocking, off the event loop.

    `on_last_finish` runs on the backend's thread inside the last sequence's `on_finish`,
    when no probe sequence is running (the llama backend empties its KV cache there).
    """
    if slots < 2:
        if on_last_finish is not None:
            _run_one(submit, tokenize(render(PROMPTS[0])), timeout, on_last_finish)
        return Verdict(True, "one slot: sequences are never batched")
    prompts = [tokenize(render(p)) for p in PROMPTS[: min(len(PROMPTS), slots)]]
    try:
        alone = [_run(submit, [p], timeout)[0] for p in prompts]
        together = _run(submit, prompts, timeout, on_last_finish)
    except TimeoutError as exc:
        return Verdict(None, f"not measured: {exc}")
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        if a.finish == "error" or b.finish == "error":
            return Verdict(None, "not measured: a probe sequence failed")
        if (a.text, a.finish) != (b.text, b.finish):
            at = next((k for k, (x, y) in enumerate(zip(a.text, b.text, strict=False))
                       if x != y),
                      min(len(a.text), len(b.text)))
            lo = max(0, at - 20)
            return Verdict(False, f"prompt {i} differs at character {at}: "
                                  f"{a.text[lo:at + 30]!r} alone, {b.text[lo:at + 30]!r} batched")
    return Verdict(True, f"{len(prompts)} prompts x {TOKENS} greedy tokens equal alone and "
                         "batched")


def cache_dir() -> Path:
    return cache_home() / "invariance"


def knobs() -> dict[str, str]:
    """The backends' tuning knobs set in this process (worker/backends/knobs.py): any may
    change the kernels or the batches a probe sees."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(("CORRAL_LLAMA_", "CORRAL_OPENVINO_"))}


def file_identity(path: str) -> list[Any]:
    """A model file by its size and the hashes of its first and last MiB: the same GGUF
    fetched to another directory is the same model (its path and mtime differ)."""
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - (1 << 20)))
        tail = hashlib.sha256(f.read()).hexdigest()
    return [size, head, tail]


def _verdict_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return cache_dir() / f"{digest[:32]}.json"


def _read(path: Path) -> Verdict | None:
    try:
        raw = json.loads(path.read_text())
        if isinstance(raw.get("invariant"), bool) and isinstance(raw.get("detail"), str):
            return Verdict(raw["invariant"], raw["detail"])
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _write(path: Path, verdict: Verdict, key: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"invariant": verdict.invariant, "detail": verdict.detail,
                                   "measured_at": time.time(), "key": key}, default=str))
        tmp.replace(path)  # whole or not at all: workers starting together may race
    except OSError as exc:
        log.warning("could not keep the batch-invariance verdict at %s: %s", path, exc)


def _run_one(submit: Callable[[Sequence], None], prompt: list[int], timeout: float,
             on_last_finish: Callable[[], None], tokens: int = TOKENS) -> None:
    try:
        _run(submit, [prompt], timeout, on_last_finish, tokens)
    except TimeoutError:
        log.warning("batch-invariance probe: timed out")


def _run(
    submit: Callable[[Sequence], None],
    prompts: list[list[int]],
    timeout: float,
    on_last_finish: Callable[[], None] | None = None,
    tokens: int = TOKENS,
) -> list[_Probe]:
    """Greedy-decodes `prompts`, the later ones starting as the first one produces."""
    lock = threading.Lock()
    left = [len(prompts)]
    started = threading.Event()
    probes: list[_Probe] = []

    def make(i: int, prompt: list[int]) -> _Probe:
        def on_tokens(text: str, n: int) -> None:
            probe.parts.append(text)
            probe.produced += n
            if i == 0:
                started.set()

        def on_finish(reason: str, _error: str | None) -> None:
            probe.finish = reason
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last and on_last_finish is not None:
                on_last_finish()
            started.set()
            probe.done.set()

        seq = Sequence(f"invariance-{i}", prompt, tokens, SamplingParams(temperature=0.0),
                       on_tokens, on_finish)
        probe = _Probe(seq)
        return probe

    probes.extend(make(i, p) for i, p in enumerate(prompts))
    submit(probes[0].seq)
    for k, probe in enumerate(probes[1:], start=1):
        # Wait until the first sequence is decoding (STAGGER x k tokens in), then join it.
        while not probes[0].done.is_set() and probes[0].produced < STAGGER * k:
            if not started.wait(timeout):
                raise TimeoutError(f"no token within {timeout:.0f} s")
            started.clear()
        submit(probe.seq)
    for probe in probes:
        if not probe.done.wait(timeout):
            for p in probes:
                p.seq.cancelled.set()
            raise TimeoutError(f"a probe sequence did not finish within {timeout:.0f} s")
    return probes
