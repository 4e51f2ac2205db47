"""The OpenVINO GenAI backend: continuous batching on CPU, GPU, NPU or AUTO.

One `ContinuousBatchingPipeline` holds the model (read straight from the GGUF; an IR copy is
kept in a cache directory so later loads skip the GGUF conversion). A pipeline is not
re-entrant, and its `step()` holds the GIL, so exactly one thread — the decode thread here —
touches it: it adds requests, calls `step()` while any are running, reads each request's new
tokens, detokenizes them incrementally and reports through the `Sequence` callbacks. It
sleeps on a condition when there is nothing to do.

What OpenVINO cannot do the way the OpenAI API means it is refused with a 400 in
`validate()` before a request starts, never silently ignored:

* `presence_penalty` / `frequency_penalty`: OpenVINO moves a logit *towards zero* (it adds
  the penalty to negative logits, making those tokens more likely), not down as OpenAI does.
* `min_p` of 1.0 or more while sampling (OpenVINO accepts [0, 1)).

`repeat_penalty` is honoured with the usual divide/multiply rule; OpenVINO applies it to
every prompt and generated token (llama.cpp: the last 64 tokens).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ovg

from wire.errors import bad_request
from worker.backends import invariance, openvino_structured
from worker.backends.base import Backend, BackendError, SamplingParams, Sequence, TokenLogprob
from worker.backends.knobs import env_flag
from worker.backends.openvino_load import (
    cache_root,
    calibrate_decode,
    calibrate_prefill,
    open_pipeline,
    properties,
)

log = logging.getLogger("corral.worker.openvino")

#: OpenVINO GenAI keeps only the last 8192 prompt tokens of a request, silently.
MAX_CTX = 8192
#: Prompt tokens one `step()` may prefill (split-fuse chunk); bounds one step's latency.
MAX_BATCHED_TOKENS = 256
_CALIBRATION_PROMPT = "Count from one to forty, in words, separated by commas."
_CALIBRATION_TOKENS = 32
_MARKER = "\x00corral-continue\x00"
_SEED_MASK = (1 << 64) - 1
_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
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


class OpenVINOBackend(Backend):
    name = "openvino"
    # Its prefix cache says nothing per request about what it reused, so a cache hit would
    # look like a fast read: the engine keeps the calibrated prefill figure (engine.py).
    reports_cached_tokens = False

    def __init__(
        self, model_path: str, parallel: int = 1, ctx_size: int = 2048, device: str = "CPU",
        cache_dir: str | Path | None = None, batch_invariant: bool | None = None,
        threads: int | None = None,
    ) -> None:
        self.model_path = model_path
        self.threads = threads  # None: OpenVINO's own choice (every core)
        self.slots = max(1, int(parallel))
        self.n_ctx = max(16, min(int(ctx_size), MAX_CTX))
        if self.n_ctx < int(ctx_size):
            log.warning("openvino: ctx_size %s capped at %d (OpenVINO keeps only the last %d "
                        "prompt tokens)", ctx_size, MAX_CTX, MAX_CTX)
        self.device = (device or "CPU").upper()
        self.default_max_tokens = None
        self.calibrated_tokens_per_second = 0.0
        self.calibrated_prefill_tokens_per_second = 0.0
        self.cache_dir = Path(cache_dir) if cache_dir else cache_root()
        # Whether the batch-invariant CPU properties are asked for; `batch_invariant` (the
        # Backend attribute) is what the load-time probe then measures.
        self.invariant_props = (
            env_flag("CORRAL_OPENVINO_BATCH_INVARIANT", True)
            if batch_invariant is None else batch_invariant
        )
        self._pipe: Any = None
        self._metrics: Any = None
        self._tok: Any = None
        self._stop_ids: set[int] = set()
        self._eos: int = -1
        self._bos_text = ""
        self._bos_id = -1
        self._pending: list[Sequence] = []
        self._live: dict[int, _Request] = {}
        self._pieces: dict[int, bytes] = {}
        self._next_id = 0
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._describe: dict[str, Any] = {"device": self.device, "devices": []}
        self.load_seconds = 0.0
        self.load_source = ""

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        started = time.perf_counter()
        sc = ovg.SchedulerConfig()
        sc.enable_prefix_caching = True
        sc.max_num_seqs = self.slots
        sc.max_num_batched_tokens = MAX_BATCHED_TOKENS
        sc.dynamic_split_fuse = True
        sc.cache_size = self._kv_cache_gb()
        try:
            self._pipe = self._open(sc)
        except RuntimeError as exc:
            raise BackendError(
                f"OpenVINO could not load {self.model_path} on {self.device}: {exc}"
            ) from exc
        self.load_seconds = time.perf_counter() - started
        self._tok = self._pipe.get_tokenizer()
        base = self._pipe.get_config()
        self._eos = int(base.eos_token_id)
        self._stop_ids = {int(t) for t in base.stop_token_ids} or (
            {self._eos} if self._eos >= 0 else set()
        )
        self._bos_text = self._tok.get_bos_token() or ""
        self._bos_id = int(self._tok.get_bos_token_id())
        if not self._tok.chat_template:  # a GGUF without a template: ChatML, as llama.cpp does
            log.warning("openvino: %s has no chat template; using ChatML", self.model_path)
            self._tok.set_chat_template(_CHATML)
        self._describe = self._facts()
        self.calibrated_tokens_per_second = self._calibrate()
        self.calibrated_prefill_tokens_per_second = self._calibrate_prefill()
        self._thread = threading.Thread(target=self._run, name="openvino-decode", daemon=True)
        self._thread.start()
        if self.device == "CPU" and not self.invariant_props:
            self.batch_invariant = False  # by request: no probe needed to know
        else:
            invariance.probe(self, self.submit)
        log.warning(
            "openvino: %s on %s in %.1fs (%s), calibrated %.0f tok/s, batch-invariant: %s",
            Path(self.model_path).name, self.device, self.load_seconds, self.load_source,
            self.calibrated_tokens_per_second, self.batch_invariant,
        )

    def _kv_cache_gb(self) -> int:
        # KV blocks for every slot's full context, with room left for cached prefixes. The
        # pipeline preempts (never fails) when it runs short, so this is a performance knob.
        need = self.slots * self.n_ctx
        return max(1, min(8, (need + 32767) // 32768))

    def _props(self, compiled_cache: Path | None) -> dict[str, Any]:
        return properties(self.device, compiled_cache, self.invariant_props, self.threads)

    def _open(self, sc: Any) -> Any:
        """The pipeline, from the cached IR when there is one, else from the GGUF."""
        pipe, self.load_source = open_pipeline(Path(self.model_path), sc, self.device,
                                               self._props, self.cache_dir)
        return pipe

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                log.error("openvino: the decode thread did not stop")
                return
        self._pipe = None

    # ------------------------------------------------------------------ prompts
    def tokenize(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=True).input_ids.data[0].tolist()
        # A template that writes the BOS itself plus a tokenizer that adds one: keep one.
        if len(ids) >= 2 and ids[0] == ids[1] == self._bos_id and \
                text.startswith(self._bos_text):
            ids = ids[1:]
        return ids

    def render_chat(self, messages: list[dict[str, str]], continue_final: bool = False) -> str:
        # OpenVINO renders a None content as the word "None".
        history = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
        if not continue_final:
            return self._tok.apply_chat_template(history, add_generation_prompt=True)
        if not history or history[-1]["role"] != "assistant":
            raise bad_request("continue_final_message needs a final assistant message",
                              param="messages")
        final = history[-1]["content"]
        history[-1] = {"role": "assistant", "content": _MARKER}
        text = self._tok.apply_chat_template(history, add_generation_prompt=False)
        cut = text.rfind(_MARKER)
        if cut < 0:
            raise BackendError("the chat template dropped the final assistant message")
        return text[:cut] + final

    @property
    def chat_template(self) -> str | None:
        return self._tok.chat_template if self._tok is not None else None

    def render_tools(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                     continue_final: bool = False) -> str:
        """`render_chat` with tool definitions and tool history (OpenVINO's own template
        engine takes `tools` and nested message fields as Hugging Face passes them)."""
        history = [{**m, "content": m.get("content") or ""} for m in messages]
        try:
            if not continue_final:
                return self._tok.apply_chat_template(history, True, tools=tools)
            final = history[-1]["content"]
            history[-1] = {"role": "assistant", "content": _MARKER}
            text = self._tok.apply_chat_template(history, False, tools=tools)
        except Exception as exc:
            raise bad_request(f"The model's chat template refused the messages: {exc}",
                              param="messages") from None
        cut = text.rfind(_MARKER)
        if cut < 0:
            raise BackendError("the chat template dropped the final assistant message")
        return text[:cut] + final

    def compile_constraint(self, constraint: Any) -> Any:
        return openvino_structured.compile_config(constraint)

    # ------------------------------------------------------------------ requests
    def validate(self, params: SamplingParams) -> None:
        if params.presence_penalty or params.frequency_penalty:
            raise bad_request(
                "presence_penalty and frequency_penalty are not supported by the openvino "
                "backend (its penalties differ from OpenAI's); use repeat_penalty or the "
                "llama backend",
                param="presence_penalty" if params.presence_penalty else "frequency_penalty",
                code="unsupported_parameter",
            )
        if not params.greedy and params.min_p >= 1.0:
            raise bad_request(
                "min_p must be below 1.0 on the openvino backend", param="min_p",
                code="unsupported_parameter",
            )

    # Measured with OpenVINO GenAI 2026.4: TextEmbeddingPipeline loads no GGUF (it looks for
    # openvino_model.xml) and the IR this backend saves from a GGUF has no tokenizer IR and
    # a logits output, not hidden states; so this backend serves no embeddings.
    embeddings_unavailable = ("OpenVINO GenAI's text-embedding pipeline needs an OpenVINO IR "
                              "of an embedding model; this worker serves a generation model. "
                              "The gateway sends embeddings to llama workers.")

    def capabilities(self) -> dict[str, int]:
        # OpenVINO GenAI reports only the chosen token's logprob: no alternatives (a greedy
        # request may still ask for top_logprobs=1, which is the chosen token).
        return {"top_logprobs": 0, "n": self.slots}

    def validate_choices(self, n: int, top_logprobs: int | None, greedy: bool) -> None:
        if top_logprobs is not None and top_logprobs > (1 if greedy else 0):
            raise bad_request(
                f"top_logprobs={top_logprobs}: the openvino backend reports only the chosen "
                "token's logprob, so top_logprobs is limited to 0 (1 with temperature 0); "
                "use the llama backend for more", param="top_logprobs",
                code="unsupported_parameter")
        super().validate_choices(n, None, greedy)

    def _config(self, seq: Sequence) -> Any:
        p = seq.params
        self.validate(p)
        cfg = ovg.GenerationConfig()
        cfg.max_new_tokens = max(1, int(seq.max_tokens))
        if self._eos >= 0:
            cfg.eos_token_id = self._eos
        cfg.stop_token_ids = set(self._stop_ids)
        cfg.repetition_penalty = float(p.repeat_penalty)
        n = 1 + len(seq.forks)
        if seq.logprobs is not None:
            cfg.logprobs = 1  # the chosen token's, of the model's own distribution
        if p.greedy and n > 1:
            # n greedy choices: OpenVINO forks only when sampling; top-1 sampling is greedy.
            cfg.do_sample = True
            cfg.top_k = 1
            cfg.num_return_sequences = n
            cfg.rng_seed = 0
        elif p.greedy:
            cfg.do_sample = False
        else:
            cfg.num_return_sequences = n
            cfg.do_sample = True
            cfg.temperature = float(p.temperature)
            cfg.top_p = float(p.top_p)
            if p.top_k > 0:
                cfg.top_k = int(p.top_k)
            cfg.min_p = float(p.min_p)
            seed = random.getrandbits(63) if p.seed is None else p.seed & _SEED_MASK
            cfg.rng_seed = seed
        if seq.constraint is not None:
            cfg.structured_output_config = seq.constraint
        cfg.validate()
        return cfg

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
            cfg = self._config(seq)
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

    # ------------------------------------------------------------------ facts
    def _calibrate(self) -> float:
        """Single-stream greedy decode speed, measured once before serving."""
        text = self.render_chat([{"role": "user", "content": _CALIBRATION_PROMPT}])
        rate = calibrate_decode(self._pipe, self.tokenize(text), _CALIBRATION_TOKENS)
        self._metrics = self._pipe.get_metrics()
        return rate

    def _calibrate_prefill(self) -> float:
        """Prompt tokens per second on this device (after `_calibrate` warmed the kernels)."""
        text = " ".join(f"item {i}: a horse in the corral." for i in range(80))
        rate = calibrate_prefill(self._pipe, self.tokenize(text)[: min(256, self.n_ctx - 8)])
        self._metrics = self._pipe.get_metrics()
        return rate

    def _facts(self) -> dict[str, Any]:
        try:
            devices = list(ov.Core().available_devices)
        except RuntimeError:
            devices = []
        return {
            "device": self.device,
            "devices": devices,
            "engine": f"openvino-genai {ovg.get_version()}",
            "load_seconds": round(self.load_seconds, 2),
            "batch_invariant_properties": self.invariant_props,
        }

    def stats(self) -> dict[str, int]:
        """What OpenVINO really reports: KV cache occupancy (it exposes no hit counters)."""
        m = self._metrics  # refreshed by the decode thread: only it touches the pipeline
        if m is None:
            return {}
        return {
            "kv_cache_usage_percent": round(m.cache_usage),
            "kv_cache_max_usage_percent": round(m.max_cache_usage),
            "kv_cache_bytes": int(m.kv_cache_size_in_bytes),
        }

    def describe(self) -> dict[str, Any]:
        return self._describe

    @property
    def current_threads(self) -> int:
        """The CPU threads it was compiled for (set at load only)."""
        return self.threads or os.cpu_count() or 1
