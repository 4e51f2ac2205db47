"""The llama.cpp backend (llama-cpp-python's low-level API).

One model, one llama.cpp context shared by `parallel` slots, decoded by a continuous
batching loop on its own thread (`llama_batch.BatchLoop`). The context holds
`ctx_size * parallel` KV cells, split so that each sequence gets `ctx_size` of them.
Chat prompts come from the GGUF's own template (`llama_chat.ChatTemplate`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import jinja2
import llama_cpp

from wire.errors import bad_request
from worker.backends import invariance, llama_grammar
from worker.backends.base import Backend, BackendError, SamplingParams, Sequence
from worker.backends.llama_batch import BatchLoop, token_bytes
from worker.backends.llama_chat import ChatTemplate
from worker.backends.llama_cpu import model_params, repack, system_features
from worker.backends.llama_embed import EMBED_WINDOW, Embedder, EmbedJob
from worker.backends.llama_lookup import draft_limit
from worker.hardware import cpu_model

log = logging.getLogger("corral.llama")

_GGML_LOG_LEVEL_ERROR = 3


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, _user: Any) -> None:
    # llama.cpp is chatty at info level; only its errors reach our log.
    if level == _GGML_LOG_LEVEL_ERROR and text and text.strip():
        log.error("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


def _quiet() -> None:
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


_quiet()  # as early as possible: importing may already have set a noisy callback

# Counting never ends early, so the calibration always sees all its tokens.
_CALIBRATION_PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
_CALIBRATION_TOKENS = 32
# Prompt reading: a prompt long enough that the first token's fixed cost does not dominate.
_PREFILL_CALIBRATION_TEXT = " ".join(f"item {i}: a horse in the corral." for i in range(80))
_PREFILL_CALIBRATION_TOKENS = 256


class LlamaBackend(Backend):
    name = "llama"

    def __init__(
        self,
        model_path: str,
        parallel: int = 1,
        ctx_size: int = 2048,
        threads: int | None = None,
        n_batch: int = 512,
        n_gpu_layers: int = 0,
        tensor_split: list[float] | None = None,
        lookup: int | None = None,
    ) -> None:
        self.model_path = model_path
        # Longest prompt-lookup draft per step (llama_lookup.py); None: CORRAL_LLAMA_LOOKUP
        # or the default, 0: off.
        self.lookup = draft_limit(lookup)
        # Layers offloaded to non-CPU devices (a split head's RPC shards), shared between
        # them in `tensor_split` proportions; the rest stay on this CPU.
        self.n_gpu_layers = n_gpu_layers
        self.tensor_split = tensor_split
        self.slots = max(1, int(parallel))
        # As many waiting as could start at once: the decode thread admits them the step
        # their slot frees, as llama-server does, choosing the slot by cached prefix.
        self.backlog = self.slots
        self.ctx_size = max(16, int(ctx_size))
        self.n_ctx = self.ctx_size
        # Decode and prefill on every core unless told (the worker passes its share of the
        # host). (A thread fewer for one-token steps looked better once, but only because
        # of the calibration-thread bug fixed in load().)
        self.threads = threads or os.cpu_count() or 1
        self.n_batch = max(n_batch, self.slots)
        self.calibrated_tokens_per_second = 0.0
        self.calibrated_prefill_tokens_per_second = 0.0
        self._model: Any = None
        self._ctx: Any = None
        self._vocab: Any = None
        self._loop: BatchLoop | None = None
        self._embedder: Embedder | None = None
        self._template = ChatTemplate(None)
        self._add_bos = False
        self._bos = llama_cpp.LLAMA_TOKEN_NULL
        self._eos = llama_cpp.LLAMA_TOKEN_NULL
        self._describe: dict[str, Any] = {"device": "CPU", "devices": ["CPU"]}

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        _quiet()
        llama_cpp.llama_backend_init()
        mp = model_params(n_gpu_layers=self.n_gpu_layers)
        split = None
        if self.tensor_split:
            split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*self.tensor_split)
            mp.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
        model = llama_cpp.llama_model_load_from_file(self.model_path.encode(), mp)
        del split  # llama.cpp reads it while loading only
        if not model:
            raise BackendError(f"llama.cpp could not load {self.model_path}")
        self._model = model
        self._vocab = vocab = llama_cpp.llama_model_get_vocab(model)
        n_train = llama_cpp.llama_model_n_ctx_train(model)
        per_seq = min(self.ctx_size, n_train) if n_train > 0 else self.ctx_size

        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = per_seq * self.slots
        cp.n_batch = cp.n_ubatch = self.n_batch
        cp.n_seq_max = self.slots
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.kv_unified = False  # each sequence its own ctx_size cells: no starving neighbours
        cp.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cp)
        if not ctx:
            raise BackendError("llama.cpp could not create a context")
        self._ctx = ctx
        self.n_ctx = min(per_seq, llama_cpp.llama_n_ctx_seq(ctx))

        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self._bos = llama_cpp.llama_vocab_bos(vocab)
        self._eos = llama_cpp.llama_vocab_eos(vocab)
        source = llama_cpp.llama_model_chat_template(model, None)
        self._template = ChatTemplate(
            source.decode("utf-8", "replace") if source else None,
            bos_token=self._special_text(self._bos),
            eos_token=self._special_text(self._eos),
        )
        self._describe = self._facts()

        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        loop = BatchLoop(ctx, vocab, n_vocab, self.slots, self.n_batch, self.n_ctx,
                         offloaded=bool(self.n_gpu_layers or self.tensor_split))
        if llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model):
            self.lookup = 0  # drafts need the KV of rejected tokens removable
            loop.host = None  # a restored state could not be cut back to a shared prefix
        self._describe["lookup_draft_tokens"] = self.lookup
        self._describe["host_cache_bytes_max"] = loop.host.budget if loop.host else 0
        # Start the decode thread first: every llama_decode must run on that one thread.
        # Decoding a few steps on this (loading) thread first, then on the loop's thread,
        # made every later token 2-3x slower on 2 cores (bench/llama_threads.py).
        loop.start()
        self.calibrated_tokens_per_second = self._calibrate(loop)
        self.calibrated_prefill_tokens_per_second = self._calibrate_prefill(loop)
        # The calibrations measure plain one-token steps (what the gateway routes by);
        # the invariance probe then checks what is served, drafts included.
        loop.lookup = self.lookup
        # The probe ends by emptying the KV cache, so it leaves no prefix behind.
        kept = invariance.probe(self, loop.submit, on_last_finish=loop.forget,
                                key=self._invariance_key())
        self._describe["batch_invariant_kept"] = kept  # read back, not measured this load
        self._loop = loop
        self.vocab_size = n_vocab
        self._embedder = Embedder(model, loop, self.threads, min(EMBED_WINDOW, self.n_ctx))
        self.embed_window = self._embedder.window

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.stop()
        if loop.alive:
            log.error("the decode loop did not stop; leaving the model in memory")
            return
        loop.free()
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def _calibrate(self, loop: BatchLoop) -> float:
        """Greedy-decodes a few tokens alone, on the loop's thread: the single-sequence
        speed of this box.

        The median time between tokens, so that a stall (another process taking the CPU
        for a moment) does not skew the figure the gateway routes by."""
        _, marks = self._timed(loop, self.tokenize(_CALIBRATION_PROMPT), _CALIBRATION_TOKENS)
        pairs = zip(marks, marks[1:], strict=False)
        per_token = [(t1 - t0) / n for (t0, _), (t1, n) in pairs if n > 0 and t1 > t0]
        if not per_token:
            return 0.0
        return round(1.0 / statistics.median(per_token), 2)

    def _calibrate_prefill(self, loop: BatchLoop) -> float:
        """Reads one long prompt alone (after `_calibrate` warmed the kernels): prompt
        tokens per second to its first token, the figure long prompts are routed by."""
        limit = min(_PREFILL_CALIBRATION_TOKENS, self.n_ctx - 8)
        prompt = self.tokenize(_PREFILL_CALIBRATION_TEXT)[:limit]
        sent, marks = self._timed(loop, prompt, 1)
        if not marks or marks[0][0] <= sent:
            return 0.0
        return round(len(prompt) / (marks[0][0] - sent), 2)

    @staticmethod
    def _timed(loop: BatchLoop, prompt: list[int], max_tokens: int
               ) -> tuple[float, list[tuple[float, int]]]:
        """Runs one greedy sequence alone; (when it was submitted, (time, tokens) marks).
        It leaves no prefix behind (the KV cache is emptied at its end)."""
        marks: list[tuple[float, int]] = []
        done = threading.Event()

        def finished(_reason: str, _error: str | None) -> None:
            loop.forget()  # on the loop's thread, as its last act for this sequence
            done.set()

        seq = Sequence(
            "calibration", prompt, max_tokens, SamplingParams(temperature=0.0),
            on_tokens=lambda _t, n: marks.append((time.perf_counter(), n)),
            on_finish=finished,
        )
        sent = time.perf_counter()
        loop.submit(seq)
        if not done.wait(120):  # a box this slow has bigger problems; serve uncalibrated
            seq.cancelled.set()
            loop.wake()
            done.wait(30)
        return sent, marks

    # ------------------------------------------------------------------ text
    def tokenize(self, text: str) -> list[int]:
        if self._vocab is None:
            raise BackendError("the model is not loaded")
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap, True, True)
            if n >= 0:
                break
            cap = -n
        tokens = buf[:n]
        # The template may already start with BOS, and the vocab adds one: keep one.
        if self._add_bos and len(tokens) >= 2 and tokens[0] == tokens[1] == self._bos:
            tokens = tokens[1:]
        if not tokens:  # an empty prompt still needs one token to start from
            start = self._bos if self._bos != llama_cpp.LLAMA_TOKEN_NULL else self._eos
            tokens = [start]
        return tokens

    def render_chat(self, messages: list[dict[str, str]], continue_final: bool = False) -> str:
        try:
            return self._template.render(messages, continue_final)
        except jinja2.TemplateError as exc:  # e.g. "roles must alternate": the client's call
            raise bad_request(f"The model's chat template refused the messages: {exc}",
                              param="messages") from None

    def _special_text(self, token: int) -> str:
        if token == llama_cpp.LLAMA_TOKEN_NULL:
            return ""
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", "replace")

    def render_tools(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                     continue_final: bool = False) -> str:
        """Like `render_chat`, with tool definitions for a template that knows tools."""
        try:
            return self._template.render(messages, continue_final, tools=tools)
        except jinja2.TemplateError as exc:
            raise bad_request(f"The model's chat template refused the messages: {exc}",
                              param="messages") from None

    @property
    def chat_template(self) -> str | None:
        return self._template.source

    def compile_constraint(self, constraint: Any) -> Any:
        return llama_grammar.sampler_for(self, constraint)

    # ------------------------------------------------------------------ sequences
    def submit(self, seq: Sequence) -> None:
        loop = self._loop
        if loop is None:
            seq.on_finish("error", "the model is not loaded")
            return
        loop.submit(seq)

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled.set()
        if self._loop is not None:
            self._loop.wake()

    def capabilities(self) -> dict[str, int]:
        return {**super().capabilities(), "embeddings": self.embeddings() is not None}

    def embeddings(self) -> dict[str, Any] | None:
        e = self._embedder
        return e.info() if e is not None and e.available else None

    def embed(self, inputs: list[list[int]], cancelled: threading.Event) -> Any:
        e = self._embedder
        if e is None or not e.available:
            return super().embed(inputs, cancelled)
        job = EmbedJob(inputs, cancelled=cancelled)
        e.submit(job)
        return job.future

    def stats(self) -> dict[str, int]:
        loop = self._loop
        if loop is None:
            return {}
        return {**loop.stats, **(loop.host.stats() if loop.host is not None else {}),
                **(loop.history.stats() if loop.history is not None else {})}

    @property
    def current_threads(self) -> int:
        """The threads llama.cpp decodes on now (while loading: the ones it loads with)."""
        loop = self._loop
        return loop.threads if loop is not None else self.threads

    def set_threads(self, n: int) -> None:
        """Re-sizes decoding between steps (prefill and decode alike)."""
        loop = self._loop
        if loop is not None and n >= 1:
            loop.set_threads(n)

    def describe(self) -> dict[str, Any]:
        return self._describe

    def _invariance_key(self) -> dict[str, Any] | None:
        """All a batch-invariance verdict depends on (invariance.py keeps it by this); None
        for a split head, whose kernels run on other boxes too."""
        if self.n_gpu_layers or self.tensor_split:
            return None
        lib = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in
                     Path(llama_cpp.__file__).parent.glob("lib/*"))
        return {"backend": "llama", "engine": llama_cpp.__version__, "lib": lib,
                "system": llama_cpp.llama_print_system_info().decode("utf-8", "replace"),
                "cpu": cpu_model(), "model": invariance.file_identity(self.model_path),
                "threads": self.threads, "slots": self.slots, "n_ctx": self.n_ctx,
                "n_batch": self.n_batch, "lookup": self.lookup, "knobs": invariance.knobs()}

    def _facts(self) -> dict[str, Any]:
        features = sorted(system_features())
        choice = repack()
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self._model, desc, len(desc))
        return {
            "device": "CPU",
            "devices": ["CPU"],
            "engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
            "cpu_features": [f for f in features if " " not in f and ":" not in f],
            "model_desc": desc.value.decode("utf-8", "replace"),
            "rpc": bool(llama_cpp.llama_supports_rpc()),
            # Weights in llama.cpp's repacked/AMX buffers, or why not (llama_cpu.py).
            "weight_repack": choice.on,
            "weight_repack_off": choice.why,
        }


__all__ = ["LlamaBackend", "token_bytes"]
