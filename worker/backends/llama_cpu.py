"""Which of llama.cpp's CPU kernels the worker may load a model onto on this box.

llama.cpp built for a CPU with AMX (Intel Sapphire Rapids and later, as `-march=native`
builds it there) moves quantised weights into an AMX buffer at load, and its AMX matrix
multiply then segfaults in the first decode: SmolLM2 Q4_1 on a KVM Xeon, in the worker and
in llama.cpp's own `llama-server` alike (ggml-org/llama.cpp#20824, closed without a fix).
The one switch llama.cpp offers at load is all of its "extra" weight buffers or none
(`use_extra_bufts`, llama-server's `--no-repack`), so a build with AMX loads without them
and runs the AVX-512 kernels instead. CORRAL_LLAMA_REPACK=1 forces them back (a llama.cpp
that fixed it), =0 turns them off on any box.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import llama_cpp

log = logging.getLogger("corral.llama")

_AMX_BUG = "ggml-org/llama.cpp#20824"


def system_features(info: str | None = None) -> set[str]:
    """The CPU features llama.cpp was built with and found (`AVX2`, `AMX_INT8`, ...)."""
    if info is None:
        info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    return {part.split("=")[0].strip() for part in info.split("|")
            if part.strip().endswith("= 1")}


@dataclass(frozen=True)
class Repack:
    """Whether weights may go into llama.cpp's extra buffers, and why not when not."""

    on: bool
    why: str | None = None


def repack_choice(features: set[str], env: str | None) -> Repack:
    """The decision, from the build's features and CORRAL_LLAMA_REPACK's raw value."""
    raw = (env or "").strip().lower()
    if raw in ("0", "false", "no", "off"):
        return Repack(False, "CORRAL_LLAMA_REPACK=0")
    if raw and raw not in ("1", "true", "yes", "on"):
        raise ValueError(f"CORRAL_LLAMA_REPACK must be 0 or 1, not {env!r}")
    if raw or "AMX_INT8" not in features:
        return Repack(True)
    return Repack(False, f"llama.cpp's AMX kernels crash ({_AMX_BUG}); "
                         "CORRAL_LLAMA_REPACK=1 turns them back on")


def repack() -> Repack:
    """This process's choice (llama_backend_init must have run)."""
    return repack_choice(system_features(), os.environ.get("CORRAL_LLAMA_REPACK"))


def model_params(**fields: Any) -> Any:
    """llama.cpp's default model parameters with `fields` set, and without the extra
    weight buffers where `repack()` says so (logged once a load)."""
    mp = llama_cpp.llama_model_default_params()
    for name, value in fields.items():
        setattr(mp, name, value)
    choice = repack()
    if not choice.on:
        mp.use_extra_bufts = False
        log.warning("loading without llama.cpp's weight repacking: %s", choice.why)
    return mp


__all__ = ["Repack", "model_params", "repack", "repack_choice", "system_features"]
