"""`corral keys add|list|revoke|set-limits`: API keys at run time, through the admin API.

Every call sends the cluster token (`--token`, else CORRAL_CLUSTER_TOKEN). A new key's
secret is printed once by `add`; the gateway keeps only its digest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx

LIMITS = ("rpm", "tpm", "user_rpm", "user_tpm", "tokens_per_day", "tokens_per_month",
          "user_tokens_per_day", "user_tokens_per_month")


def add_parser(sub: Any) -> None:
    k = sub.add_parser("keys", help="API keys at run time (admin API, cluster token)")
    ks = k.add_subparsers(dest="keys_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gateway", default="http://127.0.0.1:8000")
        p.add_argument("--token", default=None,
                       help="the cluster token (default: $CORRAL_CLUSTER_TOKEN)")
        p.add_argument("--json", action="store_true", help="print the answer as JSON")

    def limits(p: argparse.ArgumentParser) -> None:
        for name in LIMITS:
            p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None)

    a = ks.add_parser("add", help="make a key (its secret is printed once)")
    common(a)
    a.add_argument("--user", required=True, help="who the key belongs to")
    a.add_argument("--key", default=None, help="use this secret instead of a new one")
    a.add_argument("--frontend", choices=("openwebui", "headers"), default=None,
                   help="trust this front end's forwarded end-user identity")
    a.add_argument("--frontend-jwt-secret", default=None,
                   help="require the front end's signed identity (HS256)")
    limits(a)
    ls = ks.add_parser("list", help="every key, by id (never the secret)")
    common(ls)
    r = ks.add_parser("revoke", help="revoke a run-time key")
    common(r)
    r.add_argument("id", help="the key's id (key_..., from `corral keys list`)")
    s = ks.add_parser("set-limits", help="change a run-time key's limits (0: none)")
    common(s)
    s.add_argument("id")
    limits(s)
    k.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    token = a.token or os.environ.get("CORRAL_CLUSTER_TOKEN", "")
    if not token:
        print("corral keys: needs the cluster token (--token or CORRAL_CLUSTER_TOKEN)",
              file=sys.stderr)
        return 2
    base = a.gateway.rstrip("/") + "/admin/keys"
    headers = {"Authorization": f"Bearer {token}"}
    chosen = {n: getattr(a, n) for n in LIMITS if getattr(a, n, None) is not None}
    try:
        if a.keys_command == "add":
            body = {"user": a.user, **chosen}
            for n in ("key", "frontend", "frontend_jwt_secret"):
                if getattr(a, n):
                    body[n] = getattr(a, n)
            r = httpx.post(base, json=body, headers=headers, timeout=10)
        elif a.keys_command == "list":
            r = httpx.get(base, headers=headers, timeout=10)
        elif a.keys_command == "revoke":
            r = httpx.delete(f"{base}/{a.id}", headers=headers, timeout=10)
        else:
            if not chosen:
                print("corral keys set-limits: name at least one limit", file=sys.stderr)
                return 2
            r = httpx.patch(f"{base}/{a.id}", json=chosen, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        print(f"corral keys: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    try:
        data = r.json()
    except ValueError:
        data = {}
    if r.status_code >= 400:
        msg = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
        print(f"corral keys: {r.status_code}: {msg or r.text}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(data, indent=2))
    elif a.keys_command == "add":
        print(f"{data['id']}  user={data['user']}\n{data['key']}\n"
              "(the secret is shown once; the gateway keeps only its digest)")
    elif a.keys_command == "list":
        for k in data.get("data", []):
            lim = " ".join(f"{n}={k[n]}" for n in LIMITS if k.get(n))
            front = f" frontend={k['frontend']}" if k.get("frontend") else ""
            print(f"{k['id']}  {k['user']:<16} {k['source']:<8}{front} {lim}".rstrip())
    elif a.keys_command == "revoke":
        print(f"{data['id']} revoked")
    else:
        lim = " ".join(f"{n}={data[n]}" for n in LIMITS if data.get(n))
        print(f"{data['id']}  {lim or 'no limits'}")
    return 0
