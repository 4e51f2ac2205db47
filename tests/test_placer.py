"""The gateway's placer with real processes: no silent dead ends.

A declared model that fits no worker and no split of them is reported once in the log, in
`/cluster` (with the numbers), by `corral status`, and to clients as a 503 saying why; a
worker waiting to be placed shows `idle`, not `loading`. When workers that hold it join, it
is placed, and the plan is logged when it changes, not every round.
"""

from __future__ import annotations

import importlib.util

import httpx
import openai
import pytest
from conftest import MODEL, SMALL, SmallCluster, client_for
from procs import corral, free_port, metric, wait_for

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed")

MIB = 1 << 20
CHAT = [{"role": "user", "content": "Say hi."}]


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def _rounds_pass(url: str, n: int) -> None:
    """Waits for `n` more planning rounds (each one could have logged)."""
    start = metric(url, "corral_placement_rounds_total")
    wait_for(lambda: metric(url, "corral_placement_rounds_total") >= start + n, 60, 0.1,
             f"{n} more placement rounds")


def test_a_model_that_fits_nowhere_is_reported_with_its_numbers(
        unplaceable_cluster: SmallCluster) -> None:
    from gateway.memory_need import estimate
    from worker.models import resolve

    c, g = unplaceable_cluster, unplaceable_cluster.gateway
    from corral.cli import DEFAULT_PARALLEL

    # The workers' defaults: 2048 tokens for each of DEFAULT_PARALLEL slots.
    need = estimate(resolve(MODEL)[1], n_ctx=2048, slots=DEFAULT_PARALLEL)
    u = c.unplaceable()
    assert u is not None
    assert u["mode"] is None and u["workers"] == [] and u["head"] is None
    assert u["need"] == need.to_json()
    ids = {w["id"] for w in c.cluster()["workers"]}
    assert u["offer"] == {"largest": SMALL, "largest_worker": u["offer"]["largest_worker"],
                          "split": 2 * SMALL, "workers": 2}
    assert u["offer"]["largest_worker"] in ids
    # Waiting to be placed is `idle`, not `loading` (nothing is loading).
    assert {w["state"] for w in c.cluster()["workers"]} == {"idle"}

    client = client_for(g.url)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4,
                                           stream=stream)
        assert e.value.status_code == 503
        err = e.value.body
        assert err["code"] == "model_unplaceable" and err["type"] == "service_unavailable"
        msg = err["message"]
        assert "cannot be placed" in msg
        for text in (_mib(need.total), _mib(need.kv_cache), _mib(SMALL), _mib(2 * SMALL)):
            assert text in msg, (text, msg)
    assert metric(g.url, "corral_rejected_total", reason="model_unplaceable") == 2
    assert metric(g.url, "corral_model_unplaceable", model=MODEL) == 1

    # One log line when it became unplaceable, however many rounds plan it again.
    _rounds_pass(g.url, 5)
    log = g.proc.log()
    assert log.count("cannot be placed") == 1, log[-3000:]
    assert f"model {MODEL} cannot be placed: it needs {_mib(need.total)}" in log


def test_corral_status_shows_unplaceable_and_idle(unplaceable_cluster: SmallCluster) -> None:
    g = unplaceable_cluster.gateway
    p = corral("status", "--gateway", g.url, name="status")
    try:
        assert p.popen.wait(30) == 0
        out = p.log()
    finally:
        p.stop()
    lines = out.splitlines()
    for w in unplaceable_cluster.cluster()["workers"]:
        row = next(line for line in lines if w["id"] in line and "│" in line)
        assert "idle" in row and "loading" not in row, row
    assert f"placement {MODEL}: unplaceable: it needs" in out, out
    assert _mib(2 * SMALL) in out.replace("\n", " "), out


def test_when_workers_that_hold_it_join_it_is_placed_and_the_plan_logged_once(
        worker_factory, gateway_factory) -> None:
    g = gateway_factory("--model", MODEL)
    env = {"CORRAL_CLUSTER_TOKEN": g.token}
    small = worker_factory("--join", g.url, "--memory-limit", str(SMALL), wait=False, env=env)

    def cluster() -> dict:
        return httpx.get(f"{g.url}/cluster", timeout=5).json()

    def state_of(p: dict) -> str | None:
        return p.get("state")

    wait_for(lambda: any(state_of(p) == "unplaceable" for p in cluster()["placements"]), 60,
             0.1, "the model reported unplaceable")
    # No --memory-limit: they offer the box's free memory, which moves between probes, so
    # which worker the planner picks first changes from round to round.
    big = [worker_factory("--join", g.url, "--threads", "1", wait=False, env=env)
           for _ in range(2)]
    big_ids = {w.id for w in big}

    def one_serves() -> bool:
        ps = cluster()["placements"]
        return any(p["mode"] == "replica" and len(p["workers"]) == 1
                   and set(p["workers"]) <= big_ids and state_of(p) == "ready" for p in ps)

    # One replica (the model is not busy): on one big worker; the rest stay free.
    wait_for(one_serves, 240, 0.25, "a ready replica on a big worker")
    ps = cluster()["placements"]
    assert not [p for p in ps if state_of(p) == "unplaceable"], ps
    states = {w["id"]: w["state"] for w in cluster()["workers"]}
    assert states[small.id] == "idle", states
    raw = client_for(g.url).chat.completions.with_raw_response.create(
        model=MODEL, messages=CHAT, max_tokens=4)
    assert raw.headers["x-corral-worker"] in big_ids
    assert metric(g.url, "corral_model_unplaceable", model=MODEL) == 0

    changes = metric(g.url, "corral_placement_changes_total")
    _rounds_pass(g.url, 10)
    assert metric(g.url, "corral_placement_changes_total") == changes
    log = g.proc.log()
    assert log.count("cannot be placed") == 1 and log.count("no longer unplaceable") == 1
    plans = [line for line in log.splitlines() if "corral.gateway placement: " in line]
    assert len(plans) == changes, plans  # one line per change, none per round
    assert len(plans) <= 2, plans  # the replica (and maybe a re-home)


def test_corral_up_stops_with_the_reason_when_the_model_fits_nowhere() -> None:
    p = corral("up", "--workers", "2", "--memory-limit", str(SMALL), "--port", str(free_port()),
               name="up-small")
    try:
        rc = p.popen.wait(120)
        out = " ".join(p.log().split())  # rich wraps long lines
    finally:
        p.stop()
    assert rc == 1, out
    assert f"model {MODEL} cannot be placed: it needs" in out, out
    assert f"all 2 worker(s) together {_mib(2 * SMALL)}" in out, out
    assert "Corral is up" not in out and "Traceback" not in out, out
