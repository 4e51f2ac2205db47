"""The model catalogue: every model this gateway can place, and how.

Entries come from `--model` and `models = ["..."]` (pinned: always placed, as before), from
`[[models]]` tables (name, path, pin, min_replicas, aliases) and from every `*.gguf` in
`--models-dir` (unpinned: loaded on demand). With none at all, the bundled default model
is the catalogue, pinned. Names are known from the start; each file is hashed once, when
first placed (workers verify what they fetch).

`Catalog.resolve` maps a requested name (a model's name or one of its aliases) to the
catalogued name; `files` is what `api/models.py` serves to workers.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from gateway.config import GatewayConfig, ModelEntry

log = logging.getLogger("corral.gateway")


@dataclass
class ModelFile:
    name: str
    path: Path
    size: int
    sha256: str
    pin: bool = True
    min_replicas: int = 1
    aliases: tuple[str, ...] = ()


def _sha256(path: Path) -> str:
    from worker.fetch import sha256_of

    return sha256_of(path)


def entries(cfg: GatewayConfig) -> list[ModelEntry]:
    """What the configuration catalogues, in order (a name given twice: the first wins)."""
    out = [ModelEntry(spec, spec, pin=True) for spec in cfg.models]
    out += cfg.model_entries
    if cfg.models_dir:
        d = Path(cfg.models_dir).expanduser()
        if not d.is_dir():
            log.error("--models-dir %s is not a directory: nothing catalogued from it", d)
        else:
            out += [ModelEntry(p.stem, str(p)) for p in sorted(d.glob("*.gguf"))]
    return out


class Catalog:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.files: dict[str, ModelFile] = {}
        self.aliases: dict[str, str] = {}
        self.read = False

    @property
    def declared(self) -> bool:
        return bool(self.cfg.models or self.cfg.model_entries or self.cfg.models_dir)

    async def load(self) -> None:
        from worker.models import DEFAULT_MODEL, resolve

        self.read = True
        wanted = entries(self.cfg) or [ModelEntry(DEFAULT_MODEL, DEFAULT_MODEL, pin=True)]
        for e in wanted:
            try:
                name, path = await asyncio.to_thread(resolve, e.spec)
            except Exception as exc:
                log.error("model %r cannot be placed: %s", e.spec, exc)
                continue
            name = e.name if e.name != e.spec else name
            if name in self.files:
                continue
            self.files[name] = ModelFile(name, path, path.stat().st_size, "", e.pin,
                                         e.min_replicas, e.aliases)
            for a in e.aliases:
                self.aliases.setdefault(a, name)

    async def hash(self, name: str) -> str:
        """The file's sha256 (workers verify what they fetch), computed once, when first
        placed: a large --models-dir does not delay the gateway's start."""
        m = self.files[name]
        if not m.sha256:
            m.sha256 = await asyncio.to_thread(_sha256, m.path)
        return m.sha256

    def resolve(self, requested: str) -> str:
        """The catalogued name for a requested model name or alias (else as given)."""
        return requested if requested in self.files else self.aliases.get(requested, requested)

    def __iter__(self):  # noqa: ANN204 - the names
        return iter(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def values(self):  # noqa: ANN201 - a dict view
        return self.files.values()

    def get(self, name: str) -> ModelFile | None:
        return self.files.get(name)
