"""Sleep and Wake-on-LAN on a real LAN (tests/lab.py): the worker box finds its own MAC,
interface and broadcast address (worker/wol.py), the gateway box's magic packet crosses the
bridge as a broadcast to port 9 and is caught by a listener inside the worker's namespace,
and a request held meanwhile completes once the box "boots" (its worker restarts) and
rejoins. Skips without CAP_NET_ADMIN, except in CI (root), where it must run.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, in_ci
from lab import SUBNET, Lab, unavailable
from procs import Proc, wait_for

TOKEN = "lab-wake-token"
ENV = {"CORRAL_CLUSTER_TOKEN": TOKEN}
PORT, WPORT = 8000, 8100


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    why = unavailable()
    if why:
        if in_ci():
            pytest.fail(f"the lab must run in CI: {why}")
        pytest.skip(why)
    with Lab({"gw": "1gbe", "w1": "1gbe", "cli": "1gbe"}) as lab:
        yield lab


def _listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", 9))  # created in the box: it stays the box's socket
    return s


@pytest.mark.timeout(180)
def test_magic_packet_crosses_the_lan_and_the_held_request_completes(lab: Lab,
                                                                    tmp_path: Path) -> None:
    gw_url = f"http://{lab.addr('gw')}:{PORT}"
    conf = tmp_path / "corral.toml"
    conf.write_text("[gateway]\nidle_sleep_after = 1.5\nwake_after = 0.3\n"
                    "wake_deadline = 60\n")
    gw = lab.start("gw", "gateway", "--host", lab.addr("gw"), "--port", str(PORT),
                   "--config", str(conf), env=ENV)
    slept = tmp_path / "slept"
    args = ("worker", "--backend", "sim", "--host", lab.addr("w1"), "--port", str(WPORT),
            "--join", gw_url, "--id", "w1", "--sleep-command", f"touch {slept}")
    box: Proc = lab.start("w1", *args, env=ENV)
    mac = lab.run("w1", "cat", "/sys/class/net/eth0/address").stdout.strip()

    def w1() -> dict | None:
        ws = lab["cli"].call(httpx.get, f"{gw_url}/cluster", timeout=5).json()["workers"]
        return next((w for w in ws if w["id"] == "w1"), None)

    def asleep() -> bool:
        if not gw.alive() or not box.alive():
            raise RuntimeError(gw.log()[-2000:] + box.log()[-2000:])
        w = w1()
        return w is not None and w["state"] == "asleep"

    wait_for(asleep, 60, 0.1, "w1 asleep")
    assert slept.exists()
    wake = w1()["wake"]
    assert wake == {"mac": mac, "interface": "eth0", "broadcast": f"{SUBNET}.255", "port": 9}
    box.kill()  # suspended: off the network
    listener = lab["w1"].call(_listener)
    listener.settimeout(30)
    pool = ThreadPoolExecutor(1)
    held = pool.submit(lab["cli"].call, httpx.post, f"{gw_url}/v1/chat/completions",
                       json={"model": MODEL, "max_tokens": 8,
                             "messages": [{"role": "user", "content": "hi"}]}, timeout=90)
    try:
        data, (src, _) = listener.recvfrom(1024)
    finally:
        listener.close()
    assert data == b"\xff" * 6 + bytes.fromhex(mac.replace(":", "")) * 16
    assert src == lab.addr("gw")
    assert not held.done()
    lab.start("w1", *args, env=ENV)  # the box boots; its worker rejoins
    r = held.result(timeout=90)
    assert r.status_code == 200, r.text
    assert r.headers["x-corral-worker"] == "w1"
