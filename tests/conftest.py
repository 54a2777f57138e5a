"""Shared fixtures: images, instant retries, a clean destination."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import responses

from fetchpool.testing import instant_retries


@pytest.fixture
def waits() -> Iterator[list[float]]:
    """Retry waits are recorded instead of slept."""
    with instant_retries() as recorded:
        yield recorded


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
