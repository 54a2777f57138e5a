"""The error hierarchy: one root, mix-ins, URL, cause text, pickling."""

from __future__ import annotations

import pickle

import pytest

import fetchpool
from fetchpool import (
    FetchError,
    HTTPStatusError,
    InvalidURL,
    NotAnImageError,
    RedirectError,
    ShardError,
    StorageError,
    TooLargeError,
    TransferError,
    UnsafeFilenameError,
)

ALL = [
    InvalidURL,
    HTTPStatusError,
    TransferError,
    TooLargeError,
    NotAnImageError,
    UnsafeFilenameError,
    RedirectError,
    StorageError,
    ShardError,
]


@pytest.mark.parametrize("cls", ALL)
def test_every_error_is_a_fetch_error_that_pickles(cls: type[FetchError]) -> None:
    err = cls("something broke for http://h/x: cause text", url="http://h/x")
    assert isinstance(err, FetchError)
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is cls
    assert str(clone) == str(err)
    assert clone.url == "http://h/x"
    assert "cause text" in str(clone)


def test_extra_attributes_survive_pickling() -> None:
    h = pickle.loads(pickle.dumps(HTTPStatusError("m", "u", status_code=503, retry_after=2.5)))
    assert (h.status_code, h.retry_after) == (503, 2.5)
    t = pickle.loads(pickle.dumps(TransferError("m", "u", retryable=False)))
    assert t.retryable is False
    assert t.cancelled is False
    c = pickle.loads(pickle.dumps(TransferError("m", "u", cancelled=True)))
    assert (c.cancelled, c.retryable) == (True, False)  # a cancelled download is final
    s = pickle.loads(pickle.dumps(StorageError("disk full", "u", errno=28)))
    assert s.errno == 28


def test_mixins() -> None:
    assert issubclass(StorageError, OSError)
    assert issubclass(InvalidURL, ValueError)
    assert issubclass(UnsafeFilenameError, ValueError)
    assert issubclass(NotAnImageError, ValueError)


def test_all_public_names_exported() -> None:
    for name in fetchpool.__all__:
        assert hasattr(fetchpool, name), name
    for cls in ALL:
        assert cls.__name__ in fetchpool.__all__
