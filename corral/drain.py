"""`corral drain WORKER`: the gateway stops sending the worker new work, lets its requests
finish (or continue elsewhere past `--deadline`), then the worker leaves (or, `--sleep`,
runs its sleep command). `--wait` returns once it has left or is asleep."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse
from typing import Any

import httpx


def add_parser(sub: Any) -> None:
    d = sub.add_parser("drain", help="drain a worker: nothing new, finish, then leave")
    d.add_argument("worker", help="the worker's id (as `corral status` shows it)")
    d.add_argument("--gateway", default="http://127.0.0.1:8000")
    d.add_argument("--token", default=None,
                   help="the cluster token (default: $CORRAL_CLUSTER_TOKEN)")
    d.add_argument("--deadline", type=float, default=None,
                   help="seconds its requests may take; then they continue on other workers")
    d.add_argument("--sleep", action="store_true",
                   help="sleep (its --sleep-command) instead of leaving")
    d.add_argument("--wait", action="store_true", help="return once it has left or sleeps")
    d.add_argument("--timeout", type=float, default=600.0, help="with --wait: give up after")
    d.add_argument("--json", action="store_true", help="print the answer as JSON")
    d.set_defaults(func=run)


def _gone(base: str, wid: str, headers: dict[str, str]) -> str | None:
    """'left' or 'asleep' once the drain is over, else None."""
    r = httpx.get(f"{base}/cluster", headers=headers, timeout=5.0)
    r.raise_for_status()
    w = next((x for x in r.json().get("workers", []) if x.get("id") == wid), None)
    if w is None:
        return "left"
    return "asleep" if w.get("state") == "asleep" else None


def run(a: argparse.Namespace) -> int:
    token = a.token or os.environ.get("CORRAL_CLUSTER_TOKEN", "")
    if not token:
        print("corral drain: needs the cluster token (--token or CORRAL_CLUSTER_TOKEN)",
              file=sys.stderr)
        return 2
    base = a.gateway.rstrip("/")
    headers = {"Authorization": f"Bearer {token}"}
    body: dict[str, Any] = {"then": "sleep" if a.sleep else "leave"}
    if a.deadline is not None:
        body["deadline"] = a.deadline
    wid = urllib.parse.quote(a.worker, safe=":")
    try:
        r = httpx.post(f"{base}/cluster/workers/{wid}/drain", json=body, headers=headers,
                       timeout=15.0)
    except httpx.HTTPError as exc:
        print(f"corral drain: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    if r.status_code != 200:
        try:
            why = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            why = r.text[:300]
        print(f"corral drain: {r.status_code}: {why}", file=sys.stderr)
        return 1
    print(json.dumps(r.json(), indent=2) if a.json else f"{a.worker}: draining, then "
          f"{body['then']}")
    if not a.wait:
        return 0
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        try:
            done = _gone(base, a.worker, headers)
        except httpx.HTTPError:
            done = None
        if done:
            print(f"{a.worker}: {done}")
            return 0
        time.sleep(0.5)
    print(f"corral drain: {a.worker} still draining after {a.timeout:g} s", file=sys.stderr)
    return 1


