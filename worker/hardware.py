"""What this box is: CPU, cores, memory. Reported in `/status` for routing and placement."""

from __future__ import annotations

import functools
import os
import platform
import socket

import psutil

from wire.status import Hardware, Memory
from worker.hostcores import usable_cpus

__all__ = ["cpu_flags", "cpu_model", "hardware", "memory", "usable_cpus"]


def _cpuinfo(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line starting with one of `keys`."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(keys):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The CPU's instruction-set flags as the kernel lists them (/proc/cpuinfo): what a
    runtime that picks its kernels at run time (OpenVINO) dispatches on. A VM may hide
    some of a model's flags, so the model name alone does not say which kernels run."""
    return tuple(sorted(set((_cpuinfo("flags", "Features") or "").split())))


def hardware(extra: dict | None = None, threads: int | None = None,
             host: dict | None = None) -> Hardware:
    """`threads` is what decodes now (0: nothing placed); `host` the host-sharing facts."""
    h = Hardware(
        cpu=cpu_model(),
        cores=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        threads=usable_cpus() if threads is None else threads,
        hostname=socket.gethostname(),
    )
    for k, v in {**(host or {}), **(extra or {})}.items():
        setattr(h, k, v)
    return h


def memory(limit: int | None = None, model_bytes: int = 0) -> Memory:
    """Memory this worker offers. With a limit the box acts as if it were that small."""
    vm = psutil.virtual_memory()
    if limit:
        return Memory(
            total=limit,
            available=max(0, min(limit - model_bytes, vm.available)),
            physical_total=vm.total,
            model_bytes=model_bytes,
        )
    return Memory(total=vm.total, available=vm.available, physical_total=vm.total,
                  model_bytes=model_bytes)
