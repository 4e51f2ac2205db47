"""Getting a model file from the gateway: streamed, resumable, checksummed, never half-loaded.

The file is written to `<cache>/<name>-<sha256[:16]>.gguf.part`, appending to what an
earlier attempt left (an HTTP Range request), hashed as it arrives, and renamed to its
final name only when its size and sha256 match what the gateway announced. A file under
its final name is therefore complete. Progress is kept on a `Download` for `/status`.

The cache is bounded (`CORRAL_CACHE_MAX_BYTES`, default 32 GiB): before a download, the
least recently used complete files (by mtime, refreshed on each use: `touch`) are removed
until the new one fits; files a loaded model maps (`in_use`) are never removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger("corral.worker")

CHUNK = 1 << 20
DEFAULT_CACHE_MAX = 32 << 30

#: Paths of files loaded models map right now: never cleaned up.
in_use: set[Path] = set()


def cache_dir() -> Path:
    raw = os.environ.get("CORRAL_CACHE_DIR")
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "corral" / "models"


def cache_max() -> int:
    raw = os.environ.get("CORRAL_CACHE_MAX_BYTES")
    return int(raw) if raw else DEFAULT_CACHE_MAX


def touch(path: Path) -> None:
    """Marks a cached file as just used (its mtime is the LRU clock)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def make_room(incoming: int, limit: int | None = None) -> list[Path]:
    """Removes least recently used cached models until `incoming` more bytes fit the
    bound; returns what it removed. Files in use stay, even if the bound is exceeded."""
    limit = cache_max() if limit is None else limit
    d = cache_dir()
    files = []
    with contextlib.suppress(OSError):
        for p in d.glob("*.gguf"):
            with contextlib.suppress(OSError):
                st = p.stat()
                files.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in files)
    removed: list[Path] = []
    for _, size, p in sorted(files):
        if total + incoming <= limit:
            break
        if p.resolve() in {q.resolve() for q in in_use}:
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            total -= size
            removed.append(p)
            log.warning("model cache: removed %s (least recently used, %d bytes) to stay "
                        "under %d bytes", p.name, size, limit)
    return removed


class ChecksumError(Exception):
    pass


@dataclass
class Download:
    name: str
    sha256: str
    size: int
    done: int = 0
    state: str = "pending"  # pending | downloading | verified | failed
    error: str | None = None
    resumed_from: int = 0  # bytes an earlier attempt had left in the .part file

    def to_json(self) -> dict[str, object]:
        return {"model": self.name, "bytes": self.done, "total": self.size, "state": self.state,
                "error": self.error, "resumed_from": self.resumed_from}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def target(name: str, sha256: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return cache_dir() / f"{safe}-{sha256[:16]}.gguf"


async def fetch(url: str, dl: Download, token: str | None = None,
                attempts: int = 5) -> Path:
    """The verified local path of the model, downloading what is missing."""
    final = target(dl.name, dl.sha256)
    if final.is_file() and final.stat().st_size == dl.size:
        dl.done, dl.state = dl.size, "verified"
        touch(final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    make_room(dl.size)
    part = final.with_name(final.name + ".part")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    last: Exception | None = None
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0),
                                 headers=headers) as client:
        for attempt in range(attempts):
            try:
                await _resume(client, url, part, dl)
                break
            except (httpx.HTTPError, OSError) as exc:  # resume where it stopped
                last = exc
                await asyncio.sleep(min(5.0, 0.5 * 2 ** attempt))
        else:
            dl.state, dl.error = "failed", f"download failed: {last}"
            raise RuntimeError(dl.error)
    got = await asyncio.to_thread(sha256_of, part)
    if got != dl.sha256:
        part.unlink(missing_ok=True)  # a corrupt part must not be resumed
        dl.state, dl.error = "failed", f"sha256 mismatch: got {got[:16]}…, want {dl.sha256[:16]}…"
        raise ChecksumError(dl.error)
    os.replace(part, final)
    dl.state = "verified"
    return final


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


async def _resume(client: httpx.AsyncClient, url: str, part: Path, dl: Download) -> None:
    have = _size(part)
    if have > dl.size:
        os.unlink(part)
        have = 0
    dl.done, dl.state = have, "downloading"
    if have == dl.size:
        return
    req_headers = {"Range": f"bytes={have}-"} if have else {}
    async with client.stream("GET", url, headers=req_headers) as r:
        if r.status_code == 200:
            have = 0  # the server ignored the range: start over
        elif r.status_code != 206:
            raise httpx.HTTPStatusError(f"GET {url}: {r.status_code}", request=r.request,
                                        response=r)
        elif have and not dl.resumed_from:
            dl.resumed_from = have
        dl.done = have
        with part.open("r+b" if have else "wb") as f:
            f.seek(have)
            f.truncate()
            async for chunk in r.aiter_bytes(CHUNK):
                f.write(chunk)
                dl.done += len(chunk)
        dl.done = _size(part)
    if dl.done != dl.size:
        raise OSError(f"short download: {dl.done} of {dl.size} bytes")
