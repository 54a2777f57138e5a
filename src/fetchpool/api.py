"""The one-call front door: :func:`download_all`."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING

from .downloader import Downloader, UrlInput, _input_items
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
    more than once is downloaded once and its repeats share its result.

    Args:
        urls: an iterable of URL strings, or a mapping ``{url: filename}`` with
            filenames relative to ``dest``.
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
        by_url: dict[str, Future[DownloadResult]] = {}
        futures: list[Future[DownloadResult]] = []
        for url, filename in items:
            fut = by_url.get(url) if isinstance(url, str) else None
            if fut is None:
                fut = dl.submit(url, filename)  # type: ignore[arg-type]
                if isinstance(url, str):
                    by_url[url] = fut
            futures.append(fut)
        # One wake-up when all are done, not one per result: this thread would otherwise
        # take the GIL from the downloads once per file.
        wait(futures)
        results = [fut.result() for fut in futures]
    return Results(results, elapsed=time.monotonic() - start)
