"""The worker's model cache is bounded: least recently used files go first, never one a
loaded model maps (files only, no processes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker import fetch


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fetch, "in_use", set())
    return tmp_path


def _file(d: Path, name: str, size: int, mtime: float) -> Path:
    p = d / f"{name}.gguf"
    p.write_bytes(b"\0" * size)
    os.utime(p, (mtime, mtime))
    return p


def test_least_recently_used_files_go_until_the_new_one_fits(cache: Path) -> None:
    old = _file(cache, "old", 400, 1_000)
    mid = _file(cache, "mid", 400, 2_000)
    new = _file(cache, "new", 400, 3_000)
    removed = fetch.make_room(500, limit=1_000)
    assert removed == [old, mid] and new.exists()  # 400 + 500 fit; 800 + 500 did not


def test_a_file_in_use_stays_and_use_refreshes_its_place(cache: Path) -> None:
    a = _file(cache, "a", 400, 1_000)
    b = _file(cache, "b", 400, 2_000)
    c = _file(cache, "c", 400, 3_000)
    fetch.in_use.add(a)  # a loaded model maps it
    fetch.touch(b)  # just used: now the most recent
    assert fetch.make_room(400, limit=1_200) == [c]  # a in use, b used since
    assert a.exists() and b.exists()
    assert fetch.make_room(0, limit=1_000) == []  # within the bound: nothing goes
