"""Test your own code that downloads with fetchpool, with HTTP mocked by ``responses``.

``save_avatars`` stands for your code; the tests below mock its HTTP with
``responses.RequestsMock`` (fetchpool uses ``requests``, in worker threads too) and make
retry waits instant with ``fetchpool.testing.instant_retries``, so nothing sleeps.

    python -m pytest examples/test_with_responses.py
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import responses

from fetchpool import RetryPolicy, download_all
from fetchpool.testing import instant_retries

AVATARS = "https://avatars.example.com/u"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(1024)  # fetchpool checks the body looks like an image


def save_avatars(user_ids: list[int], dest: Path) -> dict[int, Path | None]:
    """Your code: save each user's avatar as ``<id>.png``; None for those that failed."""
    urls = {f"{AVATARS}/{uid}": f"{uid}.png" for uid in user_ids}
    results = download_all(urls, dest, workers=4, retry=RetryPolicy(attempts=3))
    return {uid: result.path for uid, result in zip(user_ids, results, strict=True)}


@pytest.fixture
def http() -> Iterator[responses.RequestsMock]:
    """Every request in the test goes to ``responses``; an unmocked URL fails the download."""
    with responses.RequestsMock() as mock:
        yield mock


@pytest.fixture
def waits() -> Iterator[list[float]]:
    """Retry waits are recorded instead of slept."""
    with instant_retries() as recorded:
        yield recorded


def test_saves_every_avatar(http: responses.RequestsMock, tmp_path: Path) -> None:
    for uid in (1, 2):
        http.get(f"{AVATARS}/{uid}", body=PNG, content_type="image/png")
    paths = save_avatars([1, 2], tmp_path)
    assert paths == {1: tmp_path / "1.png", 2: tmp_path / "2.png"}
    assert (tmp_path / "1.png").read_bytes() == PNG


def test_retries_a_flaky_server(
    http: responses.RequestsMock, tmp_path: Path, waits: list[float]
) -> None:
    http.get(f"{AVATARS}/7", status=503)  # registered twice: answered in this order
    http.get(f"{AVATARS}/7", body=PNG, content_type="image/png")
    assert save_avatars([7], tmp_path) == {7: tmp_path / "7.png"}
    assert len(http.calls) == 2
    assert len(waits) == 1  # one backoff wait, not slept


def test_a_missing_avatar_is_none_and_not_retried(
    http: responses.RequestsMock, tmp_path: Path, waits: list[float]
) -> None:
    http.get(f"{AVATARS}/404", status=404)
    assert save_avatars([404], tmp_path) == {404: None}
    assert len(http.calls) == 1
    assert waits == []
    assert not list(tmp_path.iterdir())  # the error page is not saved


def test_an_html_page_is_not_saved_as_an_avatar(
    http: responses.RequestsMock, tmp_path: Path
) -> None:
    http.get(f"{AVATARS}/5", body="<html>Sign in</html>", content_type="text/html")
    assert save_avatars([5], tmp_path) == {5: None}


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
