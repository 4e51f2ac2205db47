"""Corral on a real LAN: boxes in network namespaces on a bridge (tests/lab.py).

One lab for the module: a gateway box, three worker boxes (1gbe, wifi, 2.5gbe), a client
box and a stranger box (x) that is in no placement. Nobody gets `--join`: workers find the
gateway by mDNS. Everything binds its box's address only, and the test process reaches a
box from a thread inside its namespace (`Box.call`). Skips without CAP_NET_ADMIN, except
in CI (root), where it must run.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import MODEL, in_ci
from lab import Lab, unavailable
from procs import Proc, wait_for

TOKEN = "lab-cluster-token"
ENV = {"CORRAL_CLUSTER_TOKEN": TOKEN}
PORT, SPARE_PORT, WPORT, RPORT = 8000, 8001, 8100, 8101
WORKERS = ("w1", "w2", "w3")
HELLO = bytes([14]) + (24).to_bytes(8, "little") + bytes(24)  # ggml RPC HELLO
STORY = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    why = unavailable()
    if why:
        if in_ci():
            pytest.fail(f"the lab must run in CI: {why}")
        pytest.skip(why)
    with Lab({"gw": "1gbe", "w1": "1gbe", "w2": "wifi", "w3": "2.5gbe", "cli": "1gbe",
              "x": "1gbe"}) as lab:
        yield lab


def url(lab: Lab, box: str = "gw", port: int = PORT) -> str:
    return f"http://{lab.addr(box)}:{port}"


def cluster(lab: Lab, port: int = PORT) -> dict:
    return lab["cli"].call(httpx.get, f"{url(lab, port=port)}/cluster", timeout=5).json()


def wid(lab: Lab, box: str, port: int = WPORT) -> str:
    return f"{lab.addr(box)}:{port}"


@pytest.fixture(scope="module")
def split_lab(lab: Lab) -> Lab:
    """A gateway declaring the model, and three workers too small for it alone (200 MiB
    each; it needs ~317 MiB): it must split over two. One thread per box."""
    gw = lab.start("gw", "gateway", "--host", lab.addr("gw"), "--port", str(PORT),
                   "--model", MODEL, env=ENV)
    for box in WORKERS:
        lab.start(box, "worker", "--host", lab.addr(box), "--port", str(WPORT),
                  "--memory-limit", str(200 << 20), "--threads", "1", "--parallel", "1",
                  env=ENV)

    def joined() -> bool:
        if not gw.alive():
            raise RuntimeError(gw.log()[-3000:])
        return {w["id"] for w in cluster(lab)["workers"]} == {wid(lab, b) for b in WORKERS}

    wait_for(joined, 60, 0.2, "three workers found the gateway by mDNS")
    return lab


def split(lab: Lab) -> dict | None:
    return next((p for p in cluster(lab)["placements"]
                 if p["model"] == MODEL and p.get("mode") == "split"
                 and p.get("state") == "ready"), None)


def test_workers_find_the_gateway_by_mdns_and_links_are_measured(split_lab: Lab) -> None:
    lab = split_lab
    c = cluster(lab)
    assert {w["url"] for w in c["workers"]} == {f"http://{wid(lab, b)}" for b in WORKERS}

    def measured() -> dict[str, float]:
        links = {k["to"]: k["rtt_ms"] for k in cluster(lab)["links"] if k["from"] == "gateway"}
        return links if all(links.get(wid(lab, b)) for b in WORKERS) else {}

    wait_for(lambda: bool(measured()), 30, 0.2, "gateway -> worker RTTs")
    rtt = measured()
    # wifi: 2 ms each way on the worker's cable (4 ms round trip); wired: the bridge's own.
    assert rtt[wid(lab, "w2")] > 3.0, rtt
    assert rtt[wid(lab, "w1")] < 1.5 and rtt[wid(lab, "w3")] < 1.5, rtt


def test_a_worker_without_the_token_is_refused(split_lab: Lab) -> None:
    lab = split_lab
    stray = lab.start("x", "worker", "--host", lab.addr("x"), "--port", str(WPORT),
                      "--backend", "sim", name="x-tokenless")
    wait_for(lambda: "refused the join: 401" in stray.log(), 30, 0.2, "the refusal")
    assert "found gateway" in stray.log()  # it was found by mDNS, then refused by HTTP
    assert wid(lab, "x") not in {w["id"] for w in cluster(lab)["workers"]}
    stray.stop()


def test_the_split_takes_the_two_fastest_linked_boxes(split_lab: Lab) -> None:
    lab = split_lab
    wait_for(lambda: split(lab) is not None, 240, 0.5, "a ready split")
    p = split(lab)
    assert set(p["workers"]) == {wid(lab, "w1"), wid(lab, "w3")}, p  # not the wifi box
    assert p["expected_network_ms_per_token"] < 1.5, p
    pair = [k for k in cluster(lab)["links"] if k["from"] != "gateway"
            and {k["from"], k["to"]} == {wid(lab, "w1"), wid(lab, "w3")}]
    assert pair and pair[0]["mbit_s"] > 100 and pair[0]["rtt_ms"] < 1.5, pair


def test_sdk_streams_from_a_client_box_through_the_split(split_lab: Lab) -> None:
    lab = split_lab
    wait_for(lambda: split(lab) is not None, 240, 0.5, "a ready split")

    def stream() -> tuple[str, str]:
        client = openai.OpenAI(base_url=f"{url(lab)}/v1", api_key="none", max_retries=0,
                               timeout=120)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=STORY, max_tokens=16, temperature=0, stream=True)
        text = "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
        return text, raw.headers["x-corral-worker"]

    text, served = lab["cli"].call(stream)
    assert text.strip()
    assert served == split(lab)["head"]


def test_a_shard_refuses_a_box_that_is_not_its_head(split_lab: Lab) -> None:
    lab = split_lab
    wait_for(lambda: split(lab) is not None, 240, 0.5, "a ready split")
    (shard,) = [w for w in cluster(lab)["workers"]
                if (w["placement"] or {}).get("role") == "shard"]
    host, port = shard["placement"]["rpc_endpoint"].rsplit(":", 1)
    box = next(b for b in WORKERS if wid(lab, b) == shard["id"])
    assert host == lab.addr(box)  # its box's address, not a wildcard

    def hello_from_x() -> bytes:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(HELLO)
            try:
                return s.recv(64)
            except ConnectionResetError:
                return b""

    assert lab["x"].call(hello_from_x) == b""  # cut off before a byte reaches ggml

    def on_loopback() -> None:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
            pass

    with pytest.raises(ConnectionRefusedError):  # not listening beyond its box address
        lab[box].call(on_loopback)


def test_killing_a_box_mid_stream_fails_over(lab: Lab) -> None:
    """A second cluster (`--cluster spare`) of two replicas in w1 and w3: the workers pick
    it by name among the two gateways they find. Last in the module: it kills a box."""
    gw = lab.start("gw", "gateway", "--host", lab.addr("gw"), "--port", str(SPARE_PORT),
                   "--cluster", "spare", name="gw-spare", env=ENV)
    procs: dict[str, Proc] = {}
    for box in ("w1", "w3"):
        procs[box] = lab.start(box, "worker", "--host", lab.addr(box), "--port", str(RPORT),
                               "--model", MODEL, "--cluster", "spare", "--threads", "1",
                               "--parallel", "1", env=ENV, name=f"{box}-spare")

    def ready() -> bool:
        if not gw.alive():
            raise RuntimeError(gw.log()[-3000:])
        ws = cluster(lab, SPARE_PORT)["workers"]
        return sorted(w["id"] for w in ws if w["state"] == "ready") == sorted(
            wid(lab, b, RPORT) for b in ("w1", "w3"))

    wait_for(ready, 120, 0.2, "two replicas in cluster spare")

    def stream() -> tuple[list[str], str]:
        client = openai.OpenAI(base_url=f"{url(lab, port=SPARE_PORT)}/v1", api_key="none",
                               max_retries=0, timeout=120)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=STORY, max_tokens=60, temperature=0, stream=True)
        first = raw.headers["x-corral-worker"]
        victim = next(b for b in ("w1", "w3") if wid(lab, b, RPORT) == first)
        got: list[str] = []
        for ch in raw.parse():
            if ch.choices and ch.choices[0].delta.content:
                got.append(ch.choices[0].delta.content)
                if len(got) == 5:
                    for p in lab.procs:  # every process of that box: the cable is cut
                        if p.args[3] == lab[victim].ns:
                            p.kill()
        return got, victim

    got, victim = lab["cli"].call(stream)
    assert len(got) > 10, got  # continued on the other box, no error event
    assert not procs[victim].alive()
