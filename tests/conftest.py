"""Shared fixtures: images, instant retries, a clean destination."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import responses

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
