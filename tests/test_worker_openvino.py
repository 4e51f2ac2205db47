"""What only the OpenVINO backend does, end to end: its /status (KV cache occupancy instead of
hit counters, the batch-invariance flag), the sampling values it refuses, and a replica the
gateway places on a `--backend openvino` worker.

Everything both backends share is in test_worker_api.py, including the OpenVINO side of
the capability-dependent tests (penalties refused with a 400, prompt-cache reuse shown by
time to first token); this file uses the same worker (`openvino_api_worker`, one load).
"""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import API_SLOTS, MODEL, caps_for, chat, client_for, require_backend, status
from procs import Worker, free_port, start_worker, wait_for


@pytest.fixture(scope="module")
def worker(openvino_api_worker: Worker) -> Worker:
    return openvino_api_worker


def test_status_reports_the_openvino_backend(worker):
    s = status(worker)
    assert s["backend"] == "openvino"
    assert s["hardware"]["engine"].startswith("openvino-genai")
    assert s["prompt_cache"]["kv_cache_bytes"] > 0
    assert "prompt_cache_hits" not in s["prompt_cache"]  # no counters: see test_worker_api
    # Measured at load; the batch-invariant CPU properties are on unless
    # CORRAL_OPENVINO_BATCH_INVARIANT=0 turns them off (then it reads false without a probe).
    assert s["hardware"]["batch_invariant"] is caps_for("openvino").batch_invariant


def test_min_p_of_one_is_refused_while_sampling(worker):
    client = client_for(worker.url, timeout=120)
    kw = dict(temperature=0.7, extra_body={"min_p": 1.0})
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=2, **kw)
    assert e.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as e:  # refused before a stream starts, too
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, stream=True, **kw)
    assert e.value.code == "unsupported_parameter"
    # Greedy ignores min_p, so there it is fine.
    ok = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0,
                                   extra_body={"min_p": 1.0})
    assert ok.usage.completion_tokens >= 1
    assert status(worker)["slots_busy"] == 0


def test_placed_replica_uses_the_workers_backend():
    """A worker started without --model (it joins a gateway) and placed as a replica loads
    the model with its own --backend; it used to build a llama.cpp backend whatever it was."""
    require_backend("openvino")
    token = "test-cluster-token"
    nobody = f"http://127.0.0.1:{free_port()}"  # a gateway that is not up (yet): joins retry
    w = start_worker("--parallel", "1", "--join", nobody, backend="openvino",
                     env={"CORRAL_CLUSTER_TOKEN": token}, wait=False)
    try:
        w.proc.wait_http(f"{w.url}/healthz", timeout=60)
        assert status(w)["models"] == []  # waiting to be placed
        r = httpx.post(f"{w.url}/control/placement", json={"role": "replica", "model": MODEL},
                       headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 200, r.text
        wait_for(lambda: status(w)["placement"]["state"] in ("ready", "broken"), timeout=120,
                 interval=0.2, what="the placed replica to load")
        s = status(w)
        assert s["placement"]["state"] == "ready", s["placement"]
        assert s["backend"] == "openvino"
        assert s["hardware"]["engine"].startswith("openvino-genai")
        assert s["models"] == [MODEL]
        out = client_for(w.url, timeout=120).completions.create(
            model=MODEL, prompt="1, 2, 3,", temperature=0, max_tokens=3)
        assert out.usage.completion_tokens == 3
    finally:
        w.proc.stop()


def test_a_restarted_worker_reads_back_its_batch_invariance_verdict(worker):
    """The probe (~5 s of an OpenVINO load on a 2-core EPYC) runs once per configuration
    of a host, as the llama backend's: a worker started like the shared one (which has
    measured, or read what an earlier one measured) reads the kept verdict back."""
    from worker.backends.invariance import cache_dir

    first = status(worker)["hardware"]
    again = start_worker("--parallel", str(API_SLOTS), "--max-queue", "8", "--device", "CPU",
                         backend="openvino")
    try:
        hw = status(again)["hardware"]
    finally:
        again.proc.stop()
    assert hw["batch_invariant_kept"] is True
    assert hw["batch_invariant"] is first["batch_invariant"]
    assert isinstance(hw["batch_invariant"], bool)
    assert any(cache_dir().glob("*.json"))
