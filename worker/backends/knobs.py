"""Backend tuning knobs read from the environment (`CORRAL_LLAMA_*`, `CORRAL_OPENVINO_*`):
one place that parses them and says which one is malformed."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """Where the backends keep what they measured or compiled: $XDG_CACHE_HOME/corral, by
    default ~/.cache/corral."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "corral"


def env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    return default if raw is None else raw.strip().lower() not in ("0", "false", "no", "off")


def env_number(name: str, default: float, kind: type = int, least: float = 0,
               unit: str = "tokens") -> float:
    """`name` as a `kind` (int or float), at least `least`; `default` when unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return max(kind(least), kind(raw))
    except ValueError:
        what = "a whole number of" if kind is int else "a number of"
        raise ValueError(f"{name} must be {what} {unit}, not {raw!r}") from None
