"""An asyncio front door: await downloads without blocking the event loop.

>>> import fetchpool.aio
>>> results = await fetchpool.aio.download_all(urls, "images", workers=16)  # doctest: +SKIP

Thin wrappers over the thread-pool :class:`fetchpool.Downloader`, not a second engine:
the downloads run on its threads (or on the curl backend's loop) exactly as in the
synchronous API, with the same options, validation, errors and results; this module
only awaits its ``concurrent.futures`` futures (``asyncio.wrap_future``) and runs what
would block (making the Downloader, which sweeps ``dest``, and closing it, which waits)
on the event loop's default executor.

Names: this module is what says "asyncio", so its calls keep the names of the
synchronous ones (``download_all``, ``Downloader``, ``submit``, ``map``) and moving code
between the two is adding ``await`` / ``async``, as httpx's ``AsyncClient`` and
``redis.asyncio`` do. The one ``a``-prefixed name is :meth:`Downloader.aclose`: the
asyncio spelling of an awaitable close (async generators, ``contextlib.aclosing``).

Cancellation: cancelling the task that awaits cancels the downloads it started. Those
not started never start; those in flight stop at once and remove their temporary
files, and the ``CancelledError`` goes on once they have. A download that was stopped
is not reported: its awaiting task was cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Iterable,
    Iterator,
    Sequence,
)
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import downloader as _sync
from .api import _submit_all
from .backends import on_done
from .deadline import Stop
from .downloader import UrlInput, _input_items, check_workers
from .items import Item
from .options import make_options
from .results import DownloadResult, Results

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .options import DownloadOptions

__all__ = ["Downloader", "download_all"]

#: An input of :meth:`Downloader.map`: what the synchronous ``map`` takes, or an async
#: iterable of URL strings and :class:`~fetchpool.Item` objects.
AsyncUrlInput = UrlInput | AsyncIterable[str | Item]


async def download_all(
    urls: UrlInput,
    dest: str | os.PathLike[str],
    workers: int = 8,
    **options: Unpack[DownloadOptions],
) -> Results:
    """Download every URL into ``dest`` and return all results, without blocking the loop.

    :func:`fetchpool.download_all` for asyncio: the same arguments, rules and results.
    Cancelling the awaiting task cancels the downloads (see the module's docstring);
    the ``CancelledError`` then goes on, once every temporary file is removed.

    Args:
        urls: an iterable of URL strings and :class:`~fetchpool.Item` objects, or a
            mapping ``{url: filename}`` with filenames relative to ``dest``.
        dest: the directory to download into; created if missing.
        workers: the number of threads (of transfers in flight).
        **options: the keyword options of :class:`fetchpool.Downloader`.

    Returns:
        :class:`~fetchpool.Results`, one entry per input item, in input order.

    Raises:
        TypeError: ``urls`` is a single string, or an option is unknown or has the
            wrong type.
        ImportError: ``backend="curl"`` without pycurl.
        ValueError: ``workers < 1`` or an option is out of range.
        NotADirectoryError: ``dest`` is an existing file.
    """
    items = list(_input_items(urls))
    start = time.monotonic()
    async with Downloader(dest, workers, **options) as dl:
        futures = _submit_all(dl._opened(), items)
        await _all_done(futures)
    return Results([fut.result() for fut in futures], elapsed=time.monotonic() - start)


class Downloader:
    """A :class:`fetchpool.Downloader` for asyncio: ``async with``, awaitable, cancellable.

    Open it with ``async with`` (its threads start and ``dest`` is swept off the loop);
    leaving the block waits for the downloads still running, or cancels them if the
    block raised (a ``CancelledError`` included). The arguments are checked here, at
    once, as the synchronous class checks them; ``dest`` (``NotADirectoryError``) and
    the backend (``ImportError``) when the block is entered.

    Args:
        dest: the directory to download into; created if missing.
        workers: the number of threads (of transfers in flight).
        **options: the keyword options of :class:`fetchpool.Downloader`.

    Raises:
        ValueError, TypeError: ``workers`` or an option is out of range, of the wrong
            type, or unknown.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        workers: int = 8,
        **options: Unpack[DownloadOptions],
    ) -> None:
        check_workers(workers)
        #: The transfer backend in use.
        self.backend = make_options(options).backend
        self.dest = Path(dest)
        self.workers = workers
        self._options = options
        self._dl: _sync.Downloader | None = None
        self._entered = False
        self._closing: asyncio.Future[None] | None = None

    # -- opening and closing ----------------------------------------------------------

    async def __aenter__(self) -> Downloader:
        if self._entered:
            raise RuntimeError("a fetchpool.aio.Downloader is entered once")
        self._entered = True
        loop = asyncio.get_running_loop()
        make = partial(_sync.Downloader, self.dest, self.workers, **self._options)
        opening = loop.run_in_executor(None, make)
        try:
            self._dl = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # It is made all the same: closed once made, so that it leaves nothing open.
            opening.add_done_callback(partial(_close_when_made, loop))
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose(cancel=exc_type is not None)

    async def aclose(self, cancel: bool = False) -> None:
        """Wait for every download and release threads, connections and lock files.

        Waiting happens off the event loop. If the awaiting task is cancelled meanwhile,
        what is pending is cancelled and what is in flight stops, then the
        ``CancelledError`` goes on (as ``KeyboardInterrupt`` does for the synchronous
        ``close``).

        Args:
            cancel: cancel pending downloads and stop those in flight at once; their
                temporary files are removed.
        """
        dl = self._dl
        if dl is None:
            self._entered = True  # never opened: nothing to release, and it stays closed
            return
        if self._closing is None:
            loop = asyncio.get_running_loop()
            self._closing = loop.run_in_executor(None, dl.close, cancel)
        elif cancel:
            dl._cancel_all()  # a second aclose(cancel=True) while the first waits
        closing = self._closing
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            if not closing.done():
                dl._cancel_all()
                with contextlib.suppress(asyncio.CancelledError):
                    await closing
            raise

    # -- downloading --------------------------------------------------------------------

    async def submit(
        self, url: str | Item, filename: str | os.PathLike[str] | None = None
    ) -> DownloadResult:
        """Download one URL and return its :class:`~fetchpool.DownloadResult`.

        Never raises for a failed download: the result says ``ok == False``. Run many at
        once with ``asyncio.gather`` or a ``TaskGroup``; cancelling the awaiting task
        cancels this download (it never starts, or stops where it is).

        Args:
            url: an http(s) URL (anything else becomes a failed result), or an
                :class:`~fetchpool.Item`.
            filename: a path relative to ``dest`` to save to, instead of the URL's name.

        Raises:
            RuntimeError: the downloader is not open (``async with``) or is closed.
            TypeError: ``filename`` is not a str or path, or is given both here and in
                the :class:`~fetchpool.Item`.
        """
        dl = self._opened()
        job = dl._submit_stoppable(url, filename)
        try:
            return await asyncio.wrap_future(job[0])
        except asyncio.CancelledError:
            await _stop(dl, [job])
            raise

    def map(self, urls: AsyncUrlInput) -> AsyncGenerator[DownloadResult, None]:
        """Download ``urls`` lazily, yielding results in input order: ``async for``.

        As the synchronous ``map``: at most ``2 * workers`` URLs in flight or buffered,
        so an endless (async) generator runs in flat memory, and repeats are not merged.
        Cancelling the task that iterates, or closing the iterator early (``break``
        inside ``contextlib.aclosing(dl.map(urls))``), cancels the downloads it started
        and not yet yielded.

        Args:
            urls: an iterable or an async iterable of URL strings and
                :class:`~fetchpool.Item` objects, or a mapping ``{url: filename}``.

        Raises:
            RuntimeError: the downloader is not open (``async with``) or is closed.
            TypeError: ``urls`` is a single string.
        """
        dl = self._opened()
        if isinstance(urls, AsyncIterable):
            return _map(dl, _async_items(urls))
        return _map(dl, _sync_items(_input_items(urls)))

    def _opened(self) -> _sync.Downloader:
        dl = self._dl
        if dl is None or self._closing is not None:
            state = "closed" if self._entered else "not open: use 'async with'"
            raise RuntimeError(f"this fetchpool.aio.Downloader is {state}")
        return dl


#: A download that can be stopped alone: its future and its stop.
_Job = tuple["Future[DownloadResult]", Stop]


async def _map(
    dl: _sync.Downloader, items: AsyncIterator[tuple[object, str | None]]
) -> AsyncGenerator[DownloadResult, None]:
    window: deque[_Job] = deque()
    limit = 2 * dl.workers
    try:
        async for url, filename in items:
            window.append(dl._submit_stoppable(url, filename))  # type: ignore[arg-type]
            while len(window) >= limit:
                result = await asyncio.wrap_future(window[0][0])
                window.popleft()
                yield result
        while window:
            result = await asyncio.wrap_future(window[0][0])
            window.popleft()
            yield result
    finally:
        # Cancelled, closed early, or the input raised: what was not yielded stops.
        if window:
            await _stop(dl, window)


async def _sync_items(
    items: Iterator[tuple[object, str | None]],
) -> AsyncIterator[tuple[object, str | None]]:
    for pair in items:
        yield pair


async def _async_items(urls: AsyncIterable[object]) -> AsyncIterator[tuple[object, str | None]]:
    async for url in urls:
        yield url, None


async def _stop(dl: _sync.Downloader, jobs: Iterable[_Job]) -> None:
    """Stop ``jobs`` and wait until those in flight have ended (their files removed)."""
    running = []
    for future, stop in jobs:
        dl._stop(future, stop)
        if not future.done():
            running.append(asyncio.wrap_future(future))
    if running:
        await asyncio.wait(running)


def _all_done(futures: Sequence[Future[Any]]) -> asyncio.Future[None]:
    """An asyncio future done once all ``futures`` are.

    One wake-up of the loop when the last one ends, not one per download.
    """
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    unique = set(futures)  # repeats of a URL share its future
    left = len(unique)
    lock = threading.Lock()

    def one_done(_: Future[Any]) -> None:
        nonlocal left
        with lock:
            left -= 1
            if left:
                return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(_settle, waiter)

    if not unique:
        waiter.set_result(None)
    for future in unique:
        on_done(future, one_done)
    return waiter


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # not cancelled meanwhile
        waiter.set_result(None)


def _close_when_made(loop: asyncio.AbstractEventLoop, opening: asyncio.Future[Any]) -> None:
    if opening.cancelled() or opening.exception() is not None:
        return
    loop.run_in_executor(None, opening.result().close)
