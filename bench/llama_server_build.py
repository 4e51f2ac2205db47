"""Builds llama.cpp's own `llama-server` from the source llama-cpp-python vendors, once.

    .venv/bin/python bench/llama_server_build.py     # prints the binary's path

The comparison in bench/llama_server.py must run the same llama.cpp as Corral's llama
backend, so the source comes from llama-cpp-python's sdist at the installed version
(`vendor/llama.cpp`), built Release with llama.cpp's defaults (native CPU flags, OpenMP:
as `pip install llama-cpp-python` builds it). The result is cached under
`~/.cache/corral/llama-server-<version>/`; a later call only checks it is there.
Never part of `make test`: it downloads ~75 MB and compiles for minutes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def installed_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def cache_dir(ver: str) -> Path:
    return Path(os.environ.get("CORRAL_CACHE", Path.home() / ".cache" / "corral")) / \
        f"llama-server-{ver}"


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def build(ver: str | None = None, jobs: int = 2) -> Path:
    """The cached llama-server binary for `ver` (default: installed), built if missing."""
    ver = ver or installed_version()
    out = cache_dir(ver)
    exe = out / "bin" / "llama-server"
    if exe.exists():
        return exe
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="corral-llama-server-") as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              f"llama-cpp-python=={ver}", "-d", tmp])
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        bdir = Path(tmp) / "build"
        _run(["cmake", "-S", str(src), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release",
              "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF",
              "-DLLAMA_USE_PREBUILT_UI=OFF", "-DBUILD_SHARED_LIBS=OFF"])
        _run(["nice", "-n", "10", "cmake", "--build", str(bdir), "--config", "Release",
              f"-j{jobs}", "--target", "llama-server"])
        (out / "bin").mkdir(exist_ok=True)
        shutil.copy2(next(bdir.rglob("bin/llama-server")), exe)
    return exe


if __name__ == "__main__":
    print(build())
