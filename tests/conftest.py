"""Shared fixtures: images, instant retries, a clean destination."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import responses

import fetchpool.options
import fetchpool.storage
from fetchpool.testing import instant_retries


@pytest.fixture
def waits() -> Iterator[list[float]]:
    """Retry waits are recorded instead of slept."""
    with instant_retries() as recorded:
        yield recorded


def _unnamed_files_work(directory: Path) -> bool:
    """Whether ``O_TMPFILE`` works in ``directory`` (not on overlayfs before 6.6, NFS...)."""
    if not fetchpool.storage.UNNAMED:
        return False
    try:
        os.close(os.open(directory, os.O_RDWR | os.O_TMPFILE, 0o666))
    except OSError:
        return False
    return True


@pytest.fixture(params=["unnamed", "named"])
def temp_mode(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> str:
    """Run a test with unnamed (``O_TMPFILE``) temporary files, then with named ones."""
    mode: str = request.param
    if mode == "unnamed" and not _unnamed_files_work(tmp_path):
        pytest.skip("no O_TMPFILE here")
    monkeypatch.setattr(fetchpool.storage, "UNNAMED", mode == "unnamed")
    return mode


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """An empty destination directory."""
    d = tmp_path / "dest"
    d.mkdir()
    return d


@pytest.fixture
def rs() -> Iterator[responses.RequestsMock]:
    """HTTP mocked by ``responses`` for the test's duration."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture(params=["requests", "curl"])
def each_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test on each transfer backend: it becomes the default ``backend``.

    A test marked ``requests_only`` (about requests itself: ``session_factory``,
    ``responses``, the splice path) runs on the requests backend alone.
    """
    name: str = request.param
    if name == "curl":
        pytest.importorskip("pycurl")
    defaults = dataclasses.replace(fetchpool.options._DEFAULTS, backend=name)
    monkeypatch.setattr(fetchpool.options, "_DEFAULTS", defaults)
    return name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the curl runs of tests marked ``requests_only``."""
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("each_backend") if callspec is not None else None
        if backend not in (None, "requests") and item.get_closest_marker("requests_only"):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
