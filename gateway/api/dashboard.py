"""The dashboard: `GET /` serves a page that shows the cluster's topology and load, live.

The page is static (gateway/static/dashboard.*: vanilla JS and CSS, no build step, nothing
fetched from outside the gateway, so it works on an offline LAN). It polls two routes:

- `GET /cluster` (the gateway's own, public contract) for workers, their state and load,
  and the placements;
- `GET /dashboard/summary` (here) for request rates and latencies: the gateway's counters
  and histograms read from its Prometheus registry (`app.state.registry`, else the
  gateway's `metrics.prom`, else prometheus_client's default), summed over models. The
  page turns the cumulative numbers into rates and windowed percentiles itself, from
  successive polls.
"""

from __future__ import annotations

import math
import time
from importlib import resources
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

router = APIRouter()

_ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "topology.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_NO_CACHE = {"Cache-Control": "no-cache"}

# Counters read as {label value: total}, summed over every other label.
_COUNTERS = {
    "requests": ("corral_requests", "status"),
    "tokens": ("corral_tokens", "kind"),
    "retries": ("corral_retries", "reason"),
    "rejected": ("corral_rejected", "reason"),
    "upstream_errors": ("corral_upstream_errors", "kind"),
}
# Histograms read as cumulative buckets, summed over every label but `le`.
_HISTOGRAMS = {
    "ttft": "corral_time_to_first_token_seconds",
    "latency": "corral_request_duration_seconds",
    "queue_wait": "corral_queue_wait_seconds",
}


def _asset(name: str) -> str:
    return resources.files("gateway").joinpath("static", name).read_text(encoding="utf-8")


def _allowed(request: Request) -> bool:
    """Closed views (auth.py): a key or the cluster token once API keys exist."""
    gw = getattr(request.app.state, "gateway", None)
    if gw is None:
        return True
    try:
        gw.auth.viewer(request)
    except Exception:  # noqa: BLE001 - an APIError 401
        return False
    return True


@router.get("/", include_in_schema=False)
async def page(request: Request) -> HTMLResponse:
    # Without credentials the page still loads, with a 401: it holds no data, asks for a
    # key or the cluster token, keeps it in sessionStorage and sends it to /cluster.
    status = 200 if _allowed(request) else 401
    return HTMLResponse(_asset("dashboard.html"), status, headers=_NO_CACHE)


@router.get("/dashboard/static/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in _ASSETS:
        raise HTTPException(status_code=404, detail="not found")
    return Response(_asset(name), media_type=_ASSETS[name], headers=_NO_CACHE)


def _registry(request: Request) -> Any:
    """The gateway's Prometheus registry, wherever the app keeps it (None if nowhere)."""
    from prometheus_client import REGISTRY, CollectorRegistry

    state = request.app.state
    candidates = [
        getattr(state, "registry", None),
        getattr(state, "prom", None),
        getattr(getattr(getattr(state, "gateway", None), "metrics", None), "prom", None),
    ]
    for reg in candidates:
        if isinstance(reg, CollectorRegistry):
            return reg
    return REGISTRY


def summarize(registry: Any) -> dict[str, Any]:
    """The gateway's request metrics in a form the page can difference between polls."""
    out: dict[str, Any] = {key: {} for key in _COUNTERS}
    hist: dict[str, dict[str, Any]] = {
        key: {"buckets": {}, "count": 0.0, "sum": 0.0} for key in _HISTOGRAMS
    }
    by_family = {fam: key for key, (fam, _) in _COUNTERS.items()}
    by_hist = {fam: key for key, fam in _HISTOGRAMS.items()}
    seen = False
    for family in registry.collect():
        name = family.name
        if name in by_family:
            key = by_family[name]
            label = _COUNTERS[key][1]
            for s in family.samples:
                if s.name == name + "_total":
                    seen = True
                    v = s.labels.get(label, "")
                    out[key][v] = out[key].get(v, 0.0) + s.value
        elif name in by_hist:
            h = hist[by_hist[name]]
            for s in family.samples:
                if s.name == name + "_bucket":
                    le = s.labels.get("le", "+Inf")
                    h["buckets"][le] = h["buckets"].get(le, 0.0) + s.value
                elif s.name == name + "_count":
                    h["count"] += s.value
                elif s.name == name + "_sum":
                    h["sum"] += s.value
    for key, h in hist.items():
        bounds = sorted(h["buckets"].items(), key=lambda kv: float(kv[0]))
        out[key] = {
            "buckets": [[_bound(le), c] for le, c in bounds],
            "count": h["count"],
            "sum": h["sum"],
        }
        seen = seen or bool(bounds)
    out["available"] = seen
    return out


def _bound(le: str) -> float | None:
    v = float(le)
    return None if math.isinf(v) else v  # JSON has no Infinity: null is the +Inf bucket


@router.get("/dashboard/summary", include_in_schema=False)
async def summary(request: Request) -> JSONResponse:
    if not _allowed(request):
        return JSONResponse({"error": {"message": "This view needs an API key or the cluster "
                                       "token.", "type": "invalid_request_error",
                                       "param": None, "code": "invalid_api_key"}}, 401,
                            headers={"WWW-Authenticate": "Bearer"})
    try:
        body = summarize(_registry(request))
    except Exception as exc:  # the page must keep working even if metrics do not
        body = {"available": False, "error": str(exc)}
    body["time"] = time.time()
    return JSONResponse(body, headers={"Cache-Control": "no-store"})
