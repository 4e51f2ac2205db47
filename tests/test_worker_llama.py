"""What only the llama.cpp backend does, end to end: the exact-fit context, UTF-8 hold-back
in its detokenizer, chunked prefill that never stalls a running stream, and its /status.

Everything both backends share is in test_worker_api.py; this file uses the same worker
(`llama_api_worker`, one load for both files), plus a worker with a small context
for the exact fit (filling 2,048 tokens of context costs more than starting a worker).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import (
    COUNTING,
    MODEL,
    caps_for,
    client_for,
    require_backend,
    serve_worker,
    status,
)
from procs import Worker, metric, start_worker, wait_for

SMALL_CTX = 256


@pytest.fixture(scope="module")
def worker(llama_api_worker: Worker) -> Worker:
    return llama_api_worker


@pytest.fixture(scope="module")
def small_worker() -> Iterator[Worker]:
    """Four slots of 256 tokens each (the KV cache is split per slot), for the exact fit."""
    require_backend("llama")
    yield from serve_worker("--parallel", "4", "--threads", "2", "--ctx-size", str(SMALL_CTX))


@pytest.fixture(scope="module")
def tokenize():
    require_backend("llama")
    return caps_for("llama").tokenize


def test_status_reports_the_llama_backend(worker):
    s = status(worker)
    assert s["backend"] == "llama"
    assert s["hardware"]["engine"].startswith("llama.cpp")
    assert {"prompt_cache_hits", "prompt_cache_reused_tokens"} <= set(s["prompt_cache"])
    # llama.cpp's AMX kernels segfault on the first decode (worker/backends/llama_cpu.py):
    # where the build has them, this worker got here only because it loaded without them.
    hw = s["hardware"]
    amx = "AMX_INT8" in hw["cpu_features"]
    assert hw["weight_repack"] is not amx
    assert ("20824" in (hw["weight_repack_off"] or "")) is amx


def test_a_restarted_worker_reads_back_its_batch_invariance_verdict(tmp_path):
    """The probe (~3 s of a ~5 s load) runs once per configuration of a host: the same
    worker started again reads the verdict kept under the cache directory."""
    require_backend("llama")
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    args = ("--parallel", "2", "--threads", "1", "--ctx-size", str(SMALL_CTX))
    verdicts = []
    for run in range(2):
        w = start_worker(*args, env=env, wait=False)
        try:
            w.wait_ready()
            hw = status(w)["hardware"]
        finally:
            w.proc.stop()
        verdicts.append(hw["batch_invariant"])
        assert hw["batch_invariant_kept"] is (run == 1)
        assert len(list((tmp_path / "corral" / "invariance").glob("*.json"))) == 1
    assert verdicts[0] is verdicts[1] and isinstance(verdicts[0], bool)


def test_weight_repacking_is_off_only_where_llama_cpp_has_amx():
    from worker.backends.llama_cpu import repack_choice, system_features

    amx = system_features("CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 | ")
    plain = system_features("CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 0 | REPACK = 1 | ")
    assert "AMX_INT8" in amx and "AMX_INT8" not in plain
    assert not repack_choice(amx, None).on and "20824" in repack_choice(amx, None).why
    assert repack_choice(plain, None).on and repack_choice(plain, "").on
    assert repack_choice(amx, "1").on  # a llama.cpp with the fix
    assert not repack_choice(plain, "off").on
    with pytest.raises(ValueError, match="CORRAL_LLAMA_REPACK"):
        repack_choice(plain, "maybe")


def test_a_step_is_split_into_llama_decode_and_python(worker):
    """The decode loop counts its time in llama_decode and between two of them: the
    engine's own overhead, in /status and /metrics."""
    before = status(worker)["prompt_cache"]
    r = client_for(worker.url, timeout=120).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to twenty."}],
        max_tokens=16, temperature=0.8, seed=1)
    after = status(worker)["prompt_cache"]
    # A step a token, but for draft tokens kept (several tokens in one step).
    n = r.usage.completion_tokens - (after["lookup_accepted_tokens"]
                                     - before["lookup_accepted_tokens"])
    assert after["decode_steps"] - before["decode_steps"] >= n
    decode = after["decode_us"] - before["decode_us"]
    gap = after["step_gap_us"] - before["step_gap_us"]
    assert 0 < gap < decode, (gap, decode)  # some Python between steps; less than the model
    assert metric(worker.url, "corral_worker_decode_seconds_total") >= after["decode_us"] / 1e6
    assert (metric(worker.url, "corral_worker_step_gap_seconds_total")
            >= after["step_gap_us"] / 1e6)


def test_llama_reports_prefill_and_decode_rates(worker):
    """Both speeds measured at load (issue 21); the old field is the decode figure."""
    s = status(worker)
    assert s["prefill_tokens_per_second"] > 0 and s["decode_tokens_per_second"] > 0, s
    assert s["tokens_per_second"] == s["decode_tokens_per_second"]


def test_exact_fit_prompt(small_worker, tokenize):
    worker = small_worker
    client = client_for(worker.url, timeout=120)
    n_ctx = status(worker)["n_ctx"]
    assert n_ctx == SMALL_CTX
    unit = " hello"
    assert len(tokenize(unit * 10)) == 10
    prompt = unit * (n_ctx - 1)  # leaves room for exactly one completion token
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == n_ctx - 1
    assert r.usage.completion_tokens == 1
    assert r.choices[0].finish_reason == "length"
    # Without max_tokens the budget is the rest of the context: still one token.
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=None, temperature=0)
    assert r.usage.completion_tokens == 1
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=unit * n_ctx, max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    assert status(worker)["state"] == "ready"


def test_long_prefill_does_not_stall_decoding(worker):
    """A long prompt is prefilled in chunks, so a running stream keeps getting tokens."""
    url = f"{worker.url}/v1/completions"
    ticks: list[float] = []
    long_sent: list[float] = []
    long_first: list[float] = []
    stop = threading.Event()

    def runner() -> None:
        body = {"model": MODEL, "prompt": COUNTING, "temperature": 0, "max_tokens": 600,
                "stream": True}
        with httpx.Client(timeout=120) as http, http.stream("POST", url, json=body) as r:
            lines = r.iter_lines()
            for _ in range(1300):  # bounded by max_tokens
                line = next(lines, None)
                if line is None or stop.is_set():
                    return
                if line.startswith("data: {"):
                    ticks.append(time.monotonic())

    t = threading.Thread(target=runner)
    t.start()
    try:
        wait_for(lambda: len(ticks) >= 2, timeout=60, what="the running stream")
        prompt = " ".join(f"Line {i}: the herd crossed the river." for i in range(90))
        body = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 1,
                "stream": True}
        long_sent.append(time.monotonic())
        with httpx.Client(timeout=120) as http, http.stream("POST", url, json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                    long_first.append(time.monotonic())
                    break
        assert long_first
        window = long_first[0] - long_sent[0]
        during = [long_sent[0], *(x for x in ticks if long_sent[0] < x < long_first[0])]
        gap = max(b - a for a, b in zip(during, during[1:], strict=False)) if len(during) > 1 \
            else window
        # ~1000 prompt tokens go in several chunks, with a token for the stream in each
        # step: no single pause of the stream comes near the whole prefill.
        assert len(during) >= 4 and gap < 0.4 * window, (len(during), gap, window)
    finally:
        stop.set()
        t.join(120)


def test_detokenizer_holds_back_split_characters():
    require_backend("llama")
    from worker.backends.llama_sampling import Detokenizer

    d = Detokenizer()
    data = "né 🐎!".encode()
    out = [d.push(data[i : i + 1]) for i in range(len(data))]
    assert "".join(out) == "né 🐎!"
    assert all("\ufffd" not in o for o in out)
    assert out[1] == ""  # the first byte of "é" waits for the second
    assert d.take() == len(data)


def test_unset_truncation_samples_like_llama_server(worker):
    """A request naming none of top_p/top_k/min_p samples with llama-server's truncation
    (0.95 / 40 / 0.05), not the whole distribution: what Open WebUI sends (no sampling
    fields) stays coherent on a small model. Same seed: identical to asking for those
    values explicitly, and not what the untruncated distribution gives."""
    c = client_for(worker.url, timeout=120)
    ask = dict(model=MODEL, max_tokens=32, temperature=1.0, seed=11,
               messages=[{"role": "user", "content": "Name one animal that lives on a farm."}])

    def text(**extra) -> str:
        return c.chat.completions.create(**ask, **extra).choices[0].message.content

    plain = text()
    assert plain == text(top_p=0.95, extra_body={"top_k": 40, "min_p": 0.05})
    assert plain != text(top_p=1.0, extra_body={"top_k": 0, "min_p": 0.0})


def test_a_conversation_whose_slot_was_taken_comes_back_from_host_memory(worker):
    """More conversations than slots: every slot is taken by someone else between two turns
    of one conversation, and its next turn still reads only what is new. The evicted KV
    went to the host cache and came back (as llama-server's `--cache-ram`)."""
    client = client_for(worker.url)
    s0 = status(worker)
    slots = s0["slots_total"]
    assert s0["hardware"]["host_cache_bytes_max"] > 0
    notes = " ".join(f"Note {i}: the grey mare jumped the north fence." for i in range(12))
    turn1 = [{"role": "system", "content": "You keep the ranch's records."},
             {"role": "user", "content": f"Remember these notes. {notes}"}]
    r1 = client.chat.completions.create(model=MODEL, messages=turn1, temperature=0,
                                        max_tokens=8)
    # Every slot busy at once with a newcomer: the conversation's slot is certainly
    # overwritten (its KV dropped but for the shared template prefix).
    url = f"{worker.url}/v1/completions"
    stop = threading.Event()

    def newcomer(i: int) -> None:
        body = {"model": MODEL, "prompt": f"{i} bales of hay were counted in barn {i}, then",
                "temperature": 0, "max_tokens": 400, "stream": True}
        with httpx.Client(timeout=120) as http, http.stream("POST", url, json=body) as r:
            for n, _ in enumerate(r.iter_lines()):
                if stop.is_set() or n > 900:
                    return

    threads = [threading.Thread(target=newcomer, args=(i,)) for i in range(slots)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: status(worker)["slots_busy"] == slots, timeout=60,
                 what="every slot taken by a newcomer")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    wait_for(lambda: status(worker)["slots_busy"] == 0, timeout=60, what="the slots freed")
    before = status(worker)["prompt_cache"]
    turn2 = [*turn1, {"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "Which fence did the mare jump?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=turn2, temperature=0,
                                        max_tokens=4)
    after = status(worker)["prompt_cache"]
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens, (cached, r1.usage.prompt_tokens)  # all of turn 1
    assert after["host_cache_restores"] == before["host_cache_restores"] + 1
    assert after["host_cache_restored_tokens"] - before["host_cache_restored_tokens"] == cached
    metrics = httpx.get(f"{worker.url}/metrics", timeout=10).text
    scraped = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
               if line.startswith("corral_worker_host_cache_")}
    assert scraped["corral_worker_host_cache_restores_total"] >= after["host_cache_restores"]
    assert scraped["corral_worker_host_cache_bytes"] > 0
