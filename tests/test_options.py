"""Validated options cross process boundaries: they pickle, and validate again unchanged."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import pytest
import requests

from fetchpool import RetryPolicy
from fetchpool.dask import CLIENT_SIDE, shipped_options
from fetchpool.options import OPTION_NAMES, Options, make_options


def _progress(event: object) -> None:
    """A progress callback that pickles (by reference)."""


#: A value other than the default for every option, as a caller gives it. An option
#: added to Options without an entry here fails test_every_option_has_a_test_value.
NON_DEFAULT: dict[str, Any] = {
    "retry": RetryPolicy(attempts=2, wait_initial=0.1, budget=9.0),
    "timeout": (3, 4.5),
    "deadline": 12,
    "max_bytes": 1234,
    "overwrite": "replace",
    "content_disposition": True,
    "allow_downgrade": True,
    "fsync": True,
    "verify": None,
    "headers": {"X-Token": "secret", "Accept-Language": "fr"},
    "session_factory": requests.Session,
    "progress": _progress,
    "backend": "curl",
    "per_host": 3,
    "rate": 2.5,
    "resume": True,
    "block_private": "allow-proxy",
    "allow_hosts": ["127.0.0.1", "10.0.0.0/8", "*.example.org"],
}
#: What an option needs beside it to be valid on its own.
COMPANIONS: dict[str, dict[str, Any]] = {"allow_hosts": {"block_private": True}}


def _given(name: str) -> dict[str, Any]:
    return {**COMPANIONS.get(name, {}), name: NON_DEFAULT[name]}


def test_every_option_has_a_test_value() -> None:
    missing = sorted(set(OPTION_NAMES) - set(NON_DEFAULT))
    assert not missing, f"add a non-default value for {missing} to NON_DEFAULT"


@pytest.mark.parametrize("name", OPTION_NAMES)
def test_each_option_pickles_with_a_non_default_value(name: str) -> None:
    opts = make_options(_given(name))
    assert getattr(opts, name) != getattr(Options(), name)
    clone = pickle.loads(pickle.dumps(opts))
    assert clone == opts
    assert getattr(clone, name) == getattr(opts, name)


@pytest.mark.parametrize("name", OPTION_NAMES)
def test_each_option_survives_the_trip_to_a_dask_worker(name: str) -> None:
    # What fetchpool.dask ships: pickled, then validated again by the worker's
    # download_all. Every option but the client-side ones arrives as it was.
    opts = make_options(_given(name))
    shipped = pickle.loads(pickle.dumps(shipped_options(opts)))
    again = make_options(shipped)
    if name in CLIENT_SIDE:
        assert name not in shipped
        assert getattr(again, name) == getattr(Options(), name)
    else:
        assert again == opts


def test_all_options_at_once_pickle() -> None:
    given = {k: v for k, v in NON_DEFAULT.items() if k != "session_factory"}
    opts = make_options(given)  # session_factory needs the requests backend
    assert pickle.loads(pickle.dumps(opts)) == opts
    assert make_options(pickle.loads(pickle.dumps(shipped_options(opts)))) == dataclasses.replace(
        opts, progress=None
    )


def test_headers_stay_read_only_and_keep_secrets_out_of_their_repr() -> None:
    opts = make_options({"headers": {"Authorization": "Bearer hunter2"}})
    assert dict(opts.headers) == {"Authorization": "Bearer hunter2"}
    with pytest.raises(TypeError):
        opts.headers["Authorization"] = "x"  # type: ignore[index]
    assert "hunter2" not in repr(opts.headers)
    assert hash(opts) == hash(pickle.loads(pickle.dumps(opts)))
