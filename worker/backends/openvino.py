"""The OpenVINO GenAI backend: continuous batching on CPU, GPU, NPU or AUTO.

One `ContinuousBatchingPipeline` holds the model (read straight from the GGUF; an IR copy is
kept in a cache directory so later loads skip the GGUF conversion). This module loads it and
answers for the model: prompts, capabilities, status. Its parts: `openvino_load.py` (the CPU
properties, the IR cache, the load-time calibration), `openvino_config.py` (the scheduler,
each request's GenerationConfig, the 400s for what OpenVINO cannot honour) and
`openvino_loop.py` (the one decode thread that drives the pipeline).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import openvino as ov
import openvino_genai as ovg

from wire.errors import bad_request
from worker.backends import invariance, openvino_config, openvino_structured
from worker.backends.base import Backend, BackendError, SamplingParams, continued
from worker.backends.knobs import env_flag
from worker.backends.openvino_load import (
    cache_root,
    calibrate_decode,
    calibrate_prefill,
    open_pipeline,
    properties,
)
from worker.backends.openvino_loop import DecodeLoop
from worker.hardware import cpu_flags, cpu_model

log = logging.getLogger("corral.worker.openvino")

#: OpenVINO GenAI keeps only the last 8192 prompt tokens of a request, silently.
MAX_CTX = 8192
_CALIBRATION_PROMPT = "Count from one to forty, in words, separated by commas."
_CALIBRATION_TOKENS = 32
_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class OpenVINOBackend(DecodeLoop, Backend):
    """Loads the pipeline and answers for the model; `DecodeLoop` serves its requests."""

    name = "openvino"
    # Its prefix cache says nothing per request about what it reused, so a cache hit would
    # look like a fast read: the engine keeps the calibrated prefill figure (engine.py).
    reports_cached_tokens = False

    def __init__(
        self, model_path: str, parallel: int = 1, ctx_size: int = 2048, device: str = "CPU",
        cache_dir: str | Path | None = None, batch_invariant: bool | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__()  # the decode loop's hand-over state
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
        self._describe: dict[str, Any] = {"device": self.device, "devices": []}
        self.load_seconds = 0.0
        self.load_source = ""

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        started = time.perf_counter()
        try:
            self._pipe = self._open(openvino_config.scheduler_config(self.slots, self.n_ctx))
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
        self._start_loop()
        kept = False
        if self.device == "CPU" and not self.invariant_props:
            self.batch_invariant = False  # by request: no probe needed to know
        else:
            kept = invariance.probe(self, self.submit, key=self._invariance_key())
        self._describe["batch_invariant_kept"] = kept  # read back, not measured this load
        log.warning(
            "openvino: %s on %s in %.1fs (%s), calibrated %.0f tok/s, batch-invariant: %s",
            Path(self.model_path).name, self.device, self.load_seconds, self.load_source,
            self.calibrated_tokens_per_second, self.batch_invariant,
        )

    def _props(self, compiled_cache: Path | None) -> dict[str, Any]:
        return properties(self.device, compiled_cache, self.invariant_props, self.threads)

    def _open(self, sc: Any) -> Any:
        """The pipeline, from the cached IR when there is one, else from the GGUF."""
        pipe, self.load_source = open_pipeline(Path(self.model_path), sc, self.device,
                                               self._props, self.cache_dir)
        return pipe

    def close(self) -> None:
        if self._stop_loop():
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
        return _kept(continued(history, lambda h: self._tok.apply_chat_template(h, False)))

    @property
    def chat_template(self) -> str | None:
        return self._tok.chat_template if self._tok is not None else None

    def render_tools(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                     continue_final: bool = False) -> str:
        """`render_chat` with tool definitions and tool history (OpenVINO's own template
        engine takes `tools` and nested message fields as Hugging Face passes them)."""
        history = [{**m, "content": m.get("content") or ""} for m in messages]

        def render(h: list[dict[str, Any]], open_turn: bool) -> str:
            try:
                return self._tok.apply_chat_template(h, open_turn, tools=tools)
            except Exception as exc:
                raise bad_request(f"The model's chat template refused the messages: {exc}",
                                  param="messages") from None

        if not continue_final:
            return render(history, True)
        return _kept(continued(history, lambda h: render(h, False)))

    def compile_constraint(self, constraint: Any) -> Any:
        return openvino_structured.compile_config(constraint)

    # ------------------------------------------------------------------ requests
    def validate(self, params: SamplingParams) -> None:
        openvino_config.validate(params)

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

    def _invariance_key(self) -> dict[str, Any] | None:
        """All a batch-invariance verdict depends on (invariance.py keeps it by this): the
        runtime, the CPU's instruction sets (its kernels are picked at run time), the
        model, the batch shape and the properties compiled in. None off the CPU: a GPU's
        or NPU's driver is not keyed, so those measure at every load."""
        if self.device != "CPU":
            return None
        src = Path(self.model_path)
        files = sorted(src.glob("*")) if src.is_dir() else [src]
        props = {k: str(v) for k, v in self._props(None).items()}
        return {"backend": "openvino", "engine": ovg.get_version(),
                "runtime": ov.get_version(), "cpu": cpu_model(), "flags": list(cpu_flags()),
                "model": [invariance.file_identity(str(f)) for f in files if f.is_file()],
                "threads": self.current_threads, "slots": self.slots, "n_ctx": self.n_ctx,
                "props": props, "knobs": invariance.knobs()}

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


def _kept(text: str | None) -> str:
    """`continued`'s prompt; a template that dropped the final message is the model's fault."""
    if text is None:
        raise BackendError("the chat template dropped the final assistant message")
    return text
