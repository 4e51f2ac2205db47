"""Automatic placement and llama.cpp RPC splitting, with real processes on loopback.

`corral up --workers 3 --memory-limit <less than the model needs>`: the gateway splits the
bundled model over two workers (a head and an RPC shard), the answers match a single box's
greedy output, the shard's RPC port exists only while placed and refuses peers other than
the head, and killing the shard mid-stream ends the stream cleanly and rebuilds the split
on the worker that was left idle. With memory for it the model is replicated instead, and
a worker that lacks a model fetches it from the gateway (resumed, checksummed). A split over
workers joined to a plain gateway is in test_split_joined.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from conftest import MODEL, client_for
from procs import Proc, Worker, corral, free_port, start_gateway, start_worker, wait_for

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed")

HEADER = "x-corral-worker"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a horse."}]
STORY = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
LIMIT = str(200 << 20)  # the model needs 317 MiB with one slot's KV cache and buffers
ONE_SLOT = ("--parallel", "1")  # the default 4 slots need 452 MiB: three LIMIT workers


def _cluster(url: str) -> dict:
    return httpx.get(f"{url}/cluster", timeout=5).json()


def _ready_placement(url: str, mode: str, exclude: set[str] = frozenset(),
                     model: str = MODEL) -> dict | None:
    for p in _cluster(url)["placements"]:
        if p["model"] == model and p["mode"] == mode and p.get("state") == "ready" \
                and not set(p["workers"]) & exclude:
            return p
    return None


def _wait_placement(url: str, mode: str, timeout: float = 240,
                    exclude: set[str] = frozenset()) -> dict:
    found: list[dict] = []

    def ready() -> bool:
        p = _ready_placement(url, mode, exclude)
        if p:
            found.append(p)
        return bool(p)

    wait_for(ready, timeout, 0.25, f"a ready {mode} placement of {MODEL}")
    return found[-1]


def _up(*args: str, env: dict[str, str] | None = None) -> tuple[Proc, str]:
    port = free_port()
    proc = corral("up", "--port", str(port), "--threads", "1", "--parallel", "1", *args,
                  name="up", env=env)
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/healthz", timeout=60)
    return proc, url


def _worker_pid(url: str, worker_id: str) -> int:
    port = int(worker_id.rsplit(":", 1)[1])
    for c in psutil.Process(_up_pid[url]).children(recursive=True):
        try:
            if any(x.status == psutil.CONN_LISTEN and x.laddr.port == port
                   for x in c.net_connections("tcp")):
                return c.pid
        except psutil.Error:
            continue
    raise LookupError(worker_id)


def _listening_ports(pid: int) -> set[int]:
    """TCP ports a worker and its children listen on."""
    ports: set[int] = set()
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            ports |= {c.laddr.port for c in p.net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    return ports


_up_pid: dict[str, int] = {}


@pytest.fixture(scope="module")
def single_box() -> Iterator[Worker]:
    """One worker with the whole model: the reference for greedy output."""
    w = start_worker("--model", MODEL, "--parallel", "1", "--threads", "1")
    yield w
    w.proc.stop()


@pytest.fixture(scope="module")
def split_cluster() -> Iterator[str]:
    # A head that produces no token for 5 s while a request is active is killed.
    # Four workers: two for the split, two spares for the rebuilds after the kills below.
    proc, url = _up("--workers", "4", "--memory-limit", LIMIT,
                    env={"CORRAL_RPC_STALL_SECONDS": "5"})
    _up_pid[url] = proc.pid
    try:
        _wait_placement(url, "split")
        yield url
    finally:
        proc.stop()


def _greedy(url: str, messages: list[dict], max_tokens: int = 24) -> tuple[str, str]:
    raw = client_for(url, timeout=120).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
    return raw.parse().choices[0].message.content, raw.headers[HEADER]


def test_a_shard_answers_hello_to_its_head_only_and_closes_when_stopped() -> None:
    from worker.rpc.probe import ProbeError, hello
    from worker.rpc.shard import ShardHost

    shard = ShardHost("127.0.0.1", ["127.0.0.1"], 1)
    try:
        endpoint = shard.start()
        assert hello(endpoint, timeout=5)[0] == 7  # ggml RPC protocol 7.x
        with socket.socket() as s:  # not the head: reset before a byte reaches ggml
            s.bind(("127.0.0.2", 0))
            s.settimeout(5)
            s.connect((shard.host, shard.port))
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(1) == b""
        assert hello(endpoint, timeout=5)[0] == 7  # still serving its head
    finally:
        shard.stop()
    with pytest.raises(ProbeError):
        hello(endpoint, timeout=2)


def test_memory_limit_below_the_need_splits_over_two_workers(split_cluster: str) -> None:
    c = _cluster(split_cluster)
    (p,) = [p for p in c["placements"] if p["model"] == MODEL]
    assert p["mode"] == "split" and len(p["workers"]) == 2
    assert p["head"] in p["workers"]
    assert sum(p["tensor_split"]) == pytest.approx(1.0, abs=1e-4)
    roles = {w["id"]: (w["placement"] or {}).get("role") for w in c["workers"]}
    assert sorted(roles.values()) == ["head", "none", "none", "shard"]
    assert all(w["memory"]["total"] == int(LIMIT) for w in c["workers"])
    # Only the head serves the model; routing finds it by the model it reports.
    assert [w["id"] for w in c["workers"] if MODEL in w["models"]] == [p["head"]]


def test_split_answers_match_a_single_box(split_cluster: str, single_box: Worker) -> None:
    head = _ready_placement(split_cluster, "split")["head"]
    for messages in (QUESTION, [{"role": "user", "content": "Name three colours."}]):
        split_text, served_by = _greedy(split_cluster, messages)
        local_text, _ = _greedy(single_box.url, messages)
        assert split_text == local_text
        assert served_by == head
    stream = client_for(split_cluster, timeout=120).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, stream=True)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert streamed == _greedy(single_box.url, QUESTION)[0]


def test_rpc_port_only_while_placed_and_only_for_the_head(split_cluster: str) -> None:
    c = _cluster(split_cluster)
    by_role = {(w["placement"] or {}).get("role"): w for w in c["workers"]}  # one idle
    shard, idle = by_role["shard"], by_role["none"]
    endpoint = shard["placement"]["rpc_endpoint"]
    host, port = endpoint.rsplit(":", 1)
    assert host == "127.0.0.1"
    # The shard's tree listens on its HTTP port and the RPC port; the idle worker's on HTTP
    # alone (ggml's own server is on an internal loopback port behind the allowlist).
    idle_pid = _worker_pid(split_cluster, idle["id"])
    assert _listening_ports(idle_pid) == {int(idle["id"].rsplit(":", 1)[1])}
    shard_ports = _listening_ports(_worker_pid(split_cluster, shard["id"]))
    assert int(port) in shard_ports
    # A peer that is not the head (127.0.0.2) is cut off before a byte reaches ggml.
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        s.settimeout(5)
        s.connect((host, int(port)))
        s.sendall(bytes([14]) + (24).to_bytes(8, "little") + bytes(24))  # HELLO
        try:
            data = s.recv(64)
        except ConnectionResetError:
            data = b""
        assert data == b""
    # The split still works after the refused attempt.
    assert _greedy(split_cluster, QUESTION, 4)[0]


def _stream_until_it_ends(url: str, on_token: int, act) -> tuple[list[str], str, float]:
    """Streams a long answer; calls `act` after `on_token` tokens. Returns what came."""
    client = client_for(url, timeout=60)
    started = time.monotonic()
    got: list[str] = []
    outcome = "completed"
    try:
        stream = client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=400,
                                                temperature=0, stream=True)
        if on_token == 0:
            act()
        for ch in stream:
            if ch.choices and ch.choices[0].delta.content:
                got.append(ch.choices[0].delta.content)
                if len(got) == on_token:
                    act()
    except openai.APIError as exc:
        outcome = f"error: {exc}"
    return got, outcome, time.monotonic() - started


def test_a_frozen_shard_is_cut_off_by_the_watchdog_and_restarted(split_cluster: str,
                                                                 single_box: Worker) -> None:
    url = split_cluster
    before = _ready_placement(url, "split")
    shard_id = next(w for w in before["workers"] if w != before["head"])
    worker = psutil.Process(_worker_pid(url, shard_id))
    (rpc,) = [c for c in worker.children(recursive=True)
              if "worker.rpc.shard" in " ".join(c.cmdline())]
    got, outcome, elapsed = _stream_until_it_ends(url, 2, lambda: rpc.suspend())  # SIGSTOP
    try:
        # The head hangs on the frozen peer; the watchdog kills it after 5 s without a token.
        assert outcome.startswith("error"), outcome
        assert elapsed < 40, f"the client waited {elapsed:.0f}s"
        # The placement is rebuilt on the same workers with a fresh shard process.
        wait_for(lambda: not rpc.is_running() or rpc.status() == psutil.STATUS_ZOMBIE, 60,
                 0.25, "the frozen shard process to be replaced")
        after = _wait_placement(url, "split")
        assert set(after["workers"]) == set(before["workers"])
        assert _greedy(url, QUESTION)[0] == _greedy(single_box.url, QUESTION)[0]
    finally:
        if rpc.is_running():
            rpc.kill()


def test_killing_the_shard_mid_stream_fails_cleanly_and_rebuilds(split_cluster: str,
                                                                 single_box: Worker) -> None:
    url = split_cluster
    before = _ready_placement(url, "split")
    shard_id = next(w for w in before["workers"] if w != before["head"])
    shard_pid = _worker_pid(url, shard_id)
    # SIGKILL the shard worker's process group; its RPC child dies with it (PDEATHSIG).
    got, outcome, elapsed = _stream_until_it_ends(
        url, 3, lambda: os.killpg(shard_pid, signal.SIGKILL))
    assert len(got) >= 3
    assert elapsed < 45, f"the client waited {elapsed:.0f}s"
    assert outcome.startswith("error") or len(got) > 3, outcome
    # The gateway re-plans without the dead worker and the split serves again.
    after = _wait_placement(url, "split", exclude={shard_id})
    assert after["head"] == before["head"] and shard_id not in after["workers"]
    assert _greedy(url, QUESTION)[0] == _greedy(single_box.url, QUESTION)[0]


def test_with_memory_for_it_one_replica_serves_and_a_busy_model_gets_another(
        single_box: Worker) -> None:
    proc, url = _up("--workers", "2", "--memory-limit", str(2 << 30))
    try:
        p = _wait_placement(url, "replica")
        assert p["head"] is None and len(p["workers"]) == 1  # not on every worker
        workers = {w["id"]: w for w in _cluster(url)["workers"]}
        (home,) = p["workers"]
        assert (workers[home]["placement"] or {}).get("role") == "replica"
        wait_for(lambda: {w["state"] for w in _cluster(url)["workers"]
                          if w["id"] != home} == {"idle"}, 30, 0.1, "the other box idle")
        # Busy: more requests than its one slot takes wait in the gateway queue, so the
        # placer adds a replica where memory is free; every request is answered.
        done: list[str] = []
        errors: list[BaseException] = []

        def ask() -> None:
            try:
                done.append(_greedy(url, STORY, max_tokens=64)[0])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        wait_for(lambda: (_ready_placement(url, "replica") or {}).get("workers", []).__len__()
                 == 2, 240, 0.25, "a second replica of the busy model")
        for t in threads:
            t.join(240)
        assert not errors and len(done) == 6, errors
        assert _greedy(url, QUESTION)[0] == _greedy(single_box.url, QUESTION)[0]
    finally:
        proc.stop()


def test_a_worker_fetches_a_model_it_lacks_from_the_gateway(tmp_path: Path) -> None:
    from worker.models import resolve

    _, bundled = resolve(MODEL)
    name = "corral-test-model"
    model = tmp_path / "gateway" / f"{name}.gguf"
    model.parent.mkdir()
    shutil.copyfile(bundled, model)
    data = model.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"
    cache.mkdir()
    # An earlier, interrupted download: the worker must resume it, not start over.
    part = cache / f"corral-test-model-{sha[:16]}.gguf.part"
    part.write_bytes(data[: len(data) // 3])
    g = start_gateway("--model", str(model))
    w = None
    try:
        base = f"{g.url}/cluster/models/corral-test-model/file"
        assert httpx.get(base).status_code == 401
        auth = {"Authorization": f"Bearer {g.token}"}
        r = httpx.get(base, headers={**auth, "Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == data[10:20]
        w = start_worker("--join", g.url, "--parallel", "1", "--threads", "1", wait=False,
                         env={"CORRAL_CLUSTER_TOKEN": g.token, "CORRAL_CACHE_DIR": str(cache),
                              # as if on another box: do not use the gateway's copy in place
                              "CORRAL_USE_GATEWAY_PATH": "0"})
        wait_for(lambda: _ready_placement(g.url, "replica", model=name) is not None, 240,
                 0.25, "the fetched model to serve")
        st = httpx.get(f"{w.url}/status").json()
        dl = st["placement"]["download"]
        assert dl["state"] == "verified" and dl["bytes"] == dl["total"] == len(data)
        assert dl["resumed_from"] == len(data) // 3
        final = cache / f"corral-test-model-{sha[:16]}.gguf"
        assert final.is_file() and not part.exists()
        assert hashlib.sha256(final.read_bytes()).hexdigest() == sha
        raw = client_for(g.url, timeout=120).chat.completions.with_raw_response.create(
            model=name, messages=QUESTION, max_tokens=4, temperature=0)
        assert raw.parse().choices[0].message.content and raw.headers[HEADER] == w.id
    finally:
        if w is not None:
            w.proc.stop()
        g.proc.stop()


def test_killing_the_head_mid_stream_fails_cleanly_and_rebuilds(split_cluster: str,
                                                                single_box: Worker) -> None:
    url = split_cluster
    before = _ready_placement(url, "split")
    head_pid = _worker_pid(url, before["head"])
    got, outcome, elapsed = _stream_until_it_ends(
        url, 3, lambda: os.killpg(head_pid, signal.SIGKILL))
    assert len(got) >= 3
    assert elapsed < 45, f"the client waited {elapsed:.0f}s"
    assert outcome.startswith("error") or len(got) > 3, outcome
    # A surviving member becomes the head; the last spare becomes its shard.
    after = _wait_placement(url, "split", exclude={before["head"]})
    assert after["head"] != before["head"]
    assert _greedy(url, QUESTION)[0] == _greedy(single_box.url, QUESTION)[0]


def test_a_worker_on_the_gateways_box_uses_its_file_in_place(tmp_path: Path) -> None:
    from worker.models import resolve

    name = "corral-local-model"
    model = tmp_path / f"{name}.gguf"
    shutil.copyfile(resolve(MODEL)[1], model)
    cache = tmp_path / "cache"
    g = start_gateway("--model", str(model))
    w = None
    try:
        w = start_worker("--join", g.url, "--parallel", "1", "--threads", "1", wait=False,
                         env={"CORRAL_CLUSTER_TOKEN": g.token, "CORRAL_CACHE_DIR": str(cache)})
        wait_for(lambda: _ready_placement(g.url, "replica", model=name) is not None, 240,
                 0.25, "the model to serve")
        st = httpx.get(f"{w.url}/status").json()
        assert "download" not in st["placement"]  # checksummed in place, not copied
        assert not cache.exists() or not any(cache.iterdir())
    finally:
        if w is not None:
            w.proc.stop()
        g.proc.stop()
