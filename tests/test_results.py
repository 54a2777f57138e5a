"""Results and DownloadResult: the read-only sequence API."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from fetchpool import DownloadResult, HTTPStatusError, Results


def _results() -> Results:
    err = HTTPStatusError("HTTP 404 for http://h/c", url="http://h/c", status_code=404)
    return Results(
        [
            DownloadResult("http://h/a", Path("a"), "downloaded", bytes=1000, attempts=1),
            DownloadResult("http://h/b", Path("b"), "skipped", bytes=500),
            DownloadResult("http://h/c", None, "failed", attempts=1, error=err),
            DownloadResult("http://h/d", Path("d"), "downloaded", bytes=3000, attempts=2),
        ],
        elapsed=2.0,
    )


def test_sequence_and_partitions() -> None:
    r = _results()
    assert len(r) == 4
    assert r[0].url == "http://h/a"
    assert [x.url for x in r[1:3]] == ["http://h/b", "http://h/c"]
    assert [x.url for x in r.succeeded] == ["http://h/a", "http://h/d"]
    assert [x.url for x in r.skipped] == ["http://h/b"]
    assert [x.url for x in r.failed] == ["http://h/c"]
    assert r.paths == [Path("a"), Path("b"), Path("d")]
    assert [x.ok for x in r] == [True, True, False, True]


def test_summary_counts_downloaded_bytes_only() -> None:
    s = _results().summary()
    assert (s.total, s.downloaded, s.skipped, s.failed, s.bytes) == (4, 2, 1, 1, 4000)
    assert s.elapsed == 2.0
    assert s.throughput == 2000.0
    assert "2 downloaded" in s
    assert "1 skipped" in s
    assert "1 failed" in s
    assert pickle.loads(pickle.dumps(s)) == s
    assert s.startswith("4 URLs: ")
    one = Results([_results()[0]], elapsed=1.0).summary()
    assert one.startswith("1 URL: 1 downloaded")


def test_raise_for_errors() -> None:
    r = _results()
    with pytest.raises(HTTPStatusError) as info:
        r.raise_for_errors()
    assert info.value.status_code == 404
    with pytest.raises(HTTPStatusError):
        r[2].raise_for_error()
    r[0].raise_for_error()
    Results([r[0], r[1]]).raise_for_errors()


def test_results_are_read_only() -> None:
    r = _results()
    with pytest.raises(TypeError):
        r[0] = r[1]  # type: ignore[index]
    with pytest.raises(AttributeError):
        r[0].status = "failed"  # type: ignore[misc]


def test_results_pickle() -> None:
    r = _results()
    clone = pickle.loads(pickle.dumps(list(r)))
    assert clone[2].error.status_code == 404
