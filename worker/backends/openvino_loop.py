"""The decode thread of the OpenVINO backend: the one thread that touches the pipeline.

A `ContinuousBatchingPipeline` is not re-entrant, and its `step()` holds the GIL, so once
loading is done exactly one thread — this loop — touches it: it adds requests, calls
`step()` while any are running, reads each request's new tokens, detokenizes them
incrementally and reports through the `Sequence` callbacks. It sleeps on a condition when
there is nothing to do; `submit` and `cancel` only touch the condition-protected hand-over
state. A mixin of `openvino.OpenVINOBackend`, which loads the pipeline and its tokenizer.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ovg

from worker.backends.base import Sequence, TokenLogprob
from worker.backends.openvino_config import generation_config

log = logging.getLogger("corral.worker.openvino")

_FINISH = {ovg.GenerationFinishReason.STOP: "stop", ovg.GenerationFinishReason.LENGTH: "length"}


@dataclass
class _Live:
    """A sequence (one choice) inside the pipeline, with its incremental detokenizer state."""

    seq: Sequence
    handle: Any  # shared by the choices of one request
    tokens: list[int] = field(default_factory=list)
    prefix: int = 0  # detokenizer: the window starts here
    read: int = 0  # ... and the text up to here has been emitted
    counted: int = 0  # tokens already counted into `unsent` or sent
    unsent: int = 0  # tokens whose text is held back (an incomplete UTF-8 character)
    finish: str | None = None
    last: bool = False  # the pipeline is done with it: flush and finish
    ended: bool = False  # on_finish sent (a choice cut by its stop string, before the rest)


@dataclass
class _Request:
    """One pipeline request: its choices (num_return_sequences) by the pipeline's output key."""

    handle: Any
    choices: list[_Live]
    keys: dict[int, int] = field(default_factory=dict)  # output key -> choice index

    def choice(self, key: int) -> _Live | None:
        i = self.keys.get(key)
        if i is None and len(self.keys) < len(self.choices):
            i = self.keys[key] = len(self.keys)
        return None if i is None else self.choices[i]


class DecodeLoop:
    """Hand-over (`submit`, `cancel`) and the decode thread's steps, reads and text out."""

    # The backend's, set by its load before the thread starts (`_pipe` is None until then
    # and after `close`).
    _pipe: Any
    _tok: Any
    _eos: int
    _stop_ids: set[int]
    _metrics: Any  # the pipeline's, refreshed here: only this thread touches the pipeline

    def __init__(self) -> None:
        super().__init__()
        self._pending: list[Sequence] = []
        self._live: dict[int, _Request] = {}
        self._pieces: dict[int, bytes] = {}
        self._next_id = 0
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    def _start_loop(self) -> None:
        self._thread = threading.Thread(target=self._run, name="openvino-decode", daemon=True)
        self._thread.start()

    def _stop_loop(self) -> bool:
        """Asks the decode thread to stop; False when it did not within 30 s (then the
        pipeline is still its own)."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                log.error("openvino: the decode thread did not stop")
                return False
        return True

    def submit(self, seq: Sequence) -> None:
        with self._cv:
            if self._closing or self._pipe is None:
                closed = True
            else:
                closed = False
                self._pending.append(seq)
                self._cv.notify()
        if closed:
            seq.on_finish("error", "the model is not loaded")

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled.set()
        with self._cv:
            self._cv.notify()

    # ------------------------------------------------------------------ decode thread
    def _run(self) -> None:
        metrics_at = 0.0
        try:
            while True:
                with self._cv:
                    while not self._closing and not self._pending and not self._live:
                        self._cv.wait()
                    if self._closing:
                        break
                    fresh, self._pending = self._pending, []
                for seq in fresh:
                    self._start(seq)
                self._reap_cancelled()
                # Cancelled requests leave the pipeline (and free their KV blocks) in a step.
                if not self._live and not self._pipe.has_non_finished_requests():
                    continue
                try:
                    self._pipe.step()
                except Exception as exc:  # a broken step fails everyone in it, loudly
                    log.exception("openvino: step failed")
                    for rid in list(self._live):
                        self._end(rid, "error", f"generation failed: {exc}")
                    continue
                self._collect()
                now = time.monotonic()
                if not self._live or now - metrics_at > 0.25:  # fresh when idle
                    self._metrics, metrics_at = self._pipe.get_metrics(), now
        finally:
            with self._cv:
                leftovers, self._pending = self._pending, []
            for seq in leftovers:
                seq.on_finish("error", "the worker is shutting down")
            for rid in list(self._live):
                self._end(rid, "error", "the worker is shutting down")

    def _start(self, seq: Sequence) -> None:
        group = [seq, *seq.forks]
        if all(s.cancelled.is_set() for s in group):
            for s in group:
                s.on_finish("stop", None)
            return
        try:
            cfg = generation_config(seq, self._eos, self._stop_ids)
            ids = ov.Tensor(np.asarray([seq.prompt], dtype=np.int64))
            rid = self._next_id
            self._next_id += 1
            handle = self._pipe.add_request(rid, ids, cfg)
        except Exception as exc:
            for s in group:
                s.on_finish("error", f"the openvino backend refused the request: {exc}")
            return
        self._live[rid] = _Request(handle, [_Live(s, handle) for s in group])

    def _reap_cancelled(self) -> None:
        for rid, req in list(self._live.items()):
            for live in req.choices:
                if live.seq.cancelled.is_set() and not live.ended:
                    live.ended = True  # one choice cut (its stop string): the rest go on
                    live.seq.on_finish("stop", None)
            if all(live.ended for live in req.choices):
                req.handle.cancel()
                self._live.pop(rid)

    def _collect(self) -> None:
        """Reads every request's new tokens; one batched detokenizer call covers them all."""
        work: list[_Live] = []
        done: list[tuple[int, str, str | None]] = []
        for rid, req in self._live.items():
            h = req.handle
            if h.can_read():
                for key, out in h.read().items():
                    live = req.choice(key)
                    if live is None or live.ended:
                        continue
                    if live.seq.on_logprobs is not None:
                        self._logprobs(live, out)
                    live.tokens.extend(out.generated_ids)
                    reason = _FINISH.get(out.finish_reason)
                    if reason:
                        live.finish = reason
            status = h.get_status()
            running = status == ovg.GenerationStatus.RUNNING or h.can_read()
            for live in req.choices:
                if live.ended:
                    continue
                fresh = len(live.tokens) > live.counted
                if fresh:
                    live.unsent += len(live.tokens) - live.counted
                    live.counted = len(live.tokens)
                live.last = not (running and live.finish is None)
                if fresh or (live.last and live.unsent):
                    work.append(live)
            if status == ovg.GenerationStatus.IGNORED:
                done.append((rid, "error", "the request did not fit in the KV cache"))
            elif any(live.last and not live.ended for live in req.choices):
                done.append((rid, "", None))  # a choice may end before its siblings
        if work:
            self._detokenize(work)
        for rid, reason, error in done:
            self._end(rid, reason, error)

    def _logprobs(self, live: _Live, out: Any) -> None:
        ids, lps = list(out.generated_ids), list(out.generated_log_probs)
        fresh = [i for i in ids if i not in self._pieces]
        if fresh:
            texts = self._tok.decode([[i] for i in fresh])
            self._pieces.update((i, t.encode("utf-8")) for i, t in zip(fresh, texts,
                                                                           strict=True))
        top = live.seq.logprobs or 0
        entries = []
        for tid, lp in zip(ids, lps, strict=False):
            if tid in self._stop_ids:
                continue  # OpenAI leaves the stop token out
            piece = self._pieces[tid]
            entries.append(TokenLogprob(piece, float(lp), ((piece, float(lp)),) if top else ()))
        if entries:
            live.seq.on_logprobs(entries)  # type: ignore[misc]

    def _detokenize(self, work: list[_Live]) -> None:
        """Sends each sequence's new text; holds back an incomplete UTF-8 character.

        Each sequence decodes a short window of its tokens twice — up to what was sent, and
        to the end — and sends the difference, so a token whose text depends on its
        neighbours (a leading space, a multi-byte character) comes out right.
        """
        windows: list[list[int]] = []
        for live in work:
            if live.read > live.prefix:
                windows.append(live.tokens[live.prefix:live.read])
            windows.append(live.tokens[live.prefix:])
        texts = iter(self._tok.decode(windows))
        for live in work:
            before = next(texts) if live.read > live.prefix else ""
            text = next(texts)
            if live.last:  # flush: whatever is left, minus a character that never completed
                rest = text[len(before):] if text.startswith(before) else ""
                live.seq.on_tokens(rest.replace("\ufffd", ""), live.unsent)
                live.unsent = 0
            elif len(text) > len(before) and not text.endswith("\ufffd") and \
                    text.startswith(before):
                live.seq.on_tokens(text[len(before):], live.unsent)
                live.unsent = 0
                live.prefix, live.read = live.read, len(live.tokens)

    def _end(self, rid: int, reason: str, error: str | None) -> None:
        """Finishes the request's choices that are done (all of them on an error, or when
        the pipeline is done with the request); `reason` "" means each its own."""
        req = self._live[rid]
        whole = bool(error) or all(live.ended or live.last for live in req.choices)
        for live in req.choices:
            if live.ended or not (whole or live.last):
                continue
            live.ended = True
            live.seq.on_finish(reason or live.finish or "stop", error)
        if whole:
            self._live.pop(rid)
            if req.handle.get_status() == ovg.GenerationStatus.RUNNING:
                req.handle.cancel()  # e.g. choices cut by their stop strings
