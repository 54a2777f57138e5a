"""The one-call front door: :func:`download_all`."""

from __future__ import annotations

import operator
import os
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, cast

from .checksums import Expected
from .downloader import Downloader, UrlInput, _input_items
from .errors import FetchError
from .items import Item, expected_of
from .naming import redact_url
from .results import DownloadResult, Results

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .options import DownloadOptions

__all__ = ["download_all"]


def download_all(
    urls: UrlInput,
    dest: str | os.PathLike[str],
    workers: int = 8,
    **options: Unpack[DownloadOptions],
) -> Results:
    """Download every URL into ``dest`` on ``workers`` threads and return all results.

    Failures do not raise: each is a failed :class:`DownloadResult` carrying its
    :class:`FetchError`; call ``results.raise_for_errors()`` to raise. A URL that appears
    more than once is downloaded once and its repeats share its result; a repeat that
    asks for another file name, size or hash than the first (an :class:`Item`) is a
    failed result instead, with a :class:`FetchError` that says so.

    Args:
        urls: an iterable of URL strings and :class:`Item` objects (mixed as you
            like), or a mapping ``{url: filename}`` with filenames relative to ``dest``.
        dest: the directory to download into; created if missing.
        workers: the number of threads.
        **options: the keyword options of :class:`Downloader` (``retry``, ``timeout``,
            ``deadline``, ``max_bytes``, ``overwrite``, ``content_disposition``,
            ``allow_downgrade``, ``fsync``, ``verify``, ``headers``,
            ``session_factory``, ``progress``, ``backend``).

    Returns:
        :class:`Results`, one entry per input item, in input order.

    Raises:
        TypeError: ``urls`` is a single string, or an option is unknown or has the
            wrong type.
        ImportError: ``backend="curl"`` without pycurl.
        ValueError: ``workers < 1`` or an option is out of range.
        NotADirectoryError: ``dest`` is an existing file.
    """
    items = list(_input_items(urls))
    start = time.monotonic()
    with Downloader(dest, workers, **options) as dl:
        futures = _submit_all(dl, items)
    # Leaving the block waited for every download: one wake-up when all are done, not one
    # per result (this thread would take the GIL from the downloads once per file), and
    # no waiter for each future to feed.
    results = [fut.result() for fut in futures]
    return Results(results, elapsed=time.monotonic() - start)


def _submit_all(
    dl: Downloader, items: list[tuple[object, str | None]]
) -> list[Future[DownloadResult]]:
    """Submit every input item and return a future per item, in input order.

    A URL that appears again shares its first occurrence's future, or gets a failed
    result if it asks for another file name or expectations (the rules of
    :func:`download_all`, shared with :func:`fetchpool.aio.download_all`). Plain URLs
    (strings with no file name) are submitted in runs, at once (``Downloader._submit_plain``);
    the order of submission is the input order all the same.
    """
    given = list(map(_URL_OF, items))
    if set(map(type, given)) == {str} and set(map(type, map(_FILENAME_OF, items))) == {_NONE}:
        # The common input, plain URL strings alone: the same submissions, made without a
        # Python step per URL on this thread (which holds the GIL from the downloads).
        unique: list[str] = list(dict.fromkeys(given))
        shared = dict(zip(unique, dl._submit_plain(unique), strict=True))
        return list(map(shared.__getitem__, given))
    by_url: dict[str, tuple[int, _Wanted]] = {}
    futures: list[Future[DownloadResult] | None] = []
    plain: list[str] = []  # plain URLs not submitted yet
    places: list[int] = []  # and their places in futures
    repeats: list[tuple[int, int]] = []  # (place, place of the first occurrence)

    def submit_plain() -> None:
        if plain:
            for place, future in zip(places, dl._submit_plain(plain), strict=True):
                futures[place] = future
            plain.clear()
            places.clear()

    for item, filename in items:
        url = item.url if isinstance(item, Item) else item
        if not isinstance(url, str):  # not a URL: its result says so
            submit_plain()
            futures.append(dl.submit(item, filename))  # type: ignore[arg-type]
            continue
        bare = type(item) is str and filename is None
        if not bare:
            submit_plain()  # before _wanted, which may raise (a filename of a wrong type)
        wanted = _PLAIN if bare else _wanted(item, filename)
        first = by_url.get(url)
        if first is None:
            by_url[url] = (len(futures), wanted)
            if bare:
                plain.append(url)
                places.append(len(futures))
                futures.append(None)
                continue
            futures.append(dl.submit(item, filename))  # type: ignore[arg-type]
        elif first[1] == wanted:
            repeats.append((len(futures), first[0]))
            futures.append(None)
        else:
            submit_plain()
            futures.append(dl._refuse(url, _conflict(url, first[1], wanted)))
    submit_plain()
    for place, first_place in repeats:
        futures[place] = futures[first_place]
    return cast("list[Future[DownloadResult]]", futures)


_URL_OF = operator.itemgetter(0)
_FILENAME_OF = operator.itemgetter(1)
_NONE = type(None)  # types, not values: a filename need not be hashable

#: What an input item asks for beyond its URL: the file name, and the expectations.
_Wanted = tuple[str | None, Expected | None]


def _wanted(item: object, filename: str | os.PathLike[str] | None) -> _Wanted:
    if not isinstance(item, Item):
        return _PLAIN if filename is None else (os.fspath(filename), None)
    if item.filename is not None:
        filename = item.filename
    return (None if filename is None else os.fspath(filename)), expected_of(item)


_PLAIN: _Wanted = (None, None)


def _conflict(url: str, first: _Wanted, repeat: _Wanted) -> FetchError:
    """The error of a repeated URL that asks for something else than its first occurrence."""
    shown = redact_url(url)
    what = "file name" if first[0] != repeat[0] else "size or hash"
    return FetchError(
        f"{shown} is repeated with another {what} than its first occurrence; a URL is "
        "downloaded once per call, so its repeats must ask for the same",
        url=shown,
    )
