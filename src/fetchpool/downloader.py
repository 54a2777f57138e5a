"""The :class:`Downloader`: a pool running the per-URL pipeline, on threads or a loop.

On the requests backend each download runs on a worker thread of its own; a backend
with an event loop (curl) drives the pipeline's steps itself, ``workers`` at once.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from .backends import Runner, Transport, on_done, open_transport
from .checksums import Expected
from .deadline import Stop, Watchdog
from .errors import FetchError
from .hosts import HostLimits
from .items import Item, expected_of
from .options import Options, make_options
from .pipeline import Pipeline, Task
from .progress import Emitter
from .results import DownloadResult
from .ssrf import make_policy
from .storage import Pins
from .workers import Workers

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .options import DownloadOptions

__all__ = ["Downloader"]

T = TypeVar("T")

UrlInput = Iterable[str | Item] | Mapping[str, str]


class Downloader:
    """Download URLs on a pool of threads; ``submit`` returns futures, ``map`` streams.

    Use it as a context manager; leaving the block waits for pending downloads, or
    cancels them if the block raised (``KeyboardInterrupt`` included).

    Args:
        dest: the directory to download into; created if missing.
        workers: the number of threads (and of transfers in flight).
        retry: a :class:`RetryPolicy`, or an int n meaning ``RetryPolicy(attempts=n)``.
        timeout: ``(connect, read)`` seconds per socket operation, or one number for both
            (default ``(10, 30)``).
        deadline: the most seconds one attempt may take, headers and body included
            (default 300).
        max_bytes: abort a file larger than this many (decoded) bytes; ``None`` lifts it
            (default 2 GiB).
        overwrite: ``"skip"`` (default) keeps a file already there (no request),
            ``"replace"`` downloads again, ``"error"`` fails that URL with ``StorageError``.
        content_disposition: name files from ``Content-Disposition`` when present.
        allow_downgrade: allow a redirect from https to http.
        fsync: flush each file and its directory to disk before reporting it.
        verify: ``"image"`` (default) requires the body to start like an image; ``None``
            accepts any.
        headers: extra request headers.
        session_factory: a callable returning a configured ``requests.Session``,
            called once per worker thread (``backend="requests"`` only).
        progress: ``True`` for a progress bar on stderr (needs ``tqdm``), or a callable
            that receives :class:`ProgressEvent` objects (calls are serialised).
        backend: the transfer backend: ``"requests"`` (default; what ``responses``
            mocks, and the only one that takes ``session_factory``) or ``"curl"``
            (``pip install "fetchpool[curl]"``: libcurl's multi interface, HTTP/2 where
            the server offers it).
        block_private: ``True`` refuses to connect to loopback, private, link-local and
            other non-public addresses, checked at connect time on every redirect hop
            (a ``BlockedAddressError`` result); ``"allow-proxy"`` also lets URLs go
            through a proxy from the environment, unchecked unless their host is an
            IP literal.
        allow_hosts: host names (``"*.example.com"`` for subdomains), addresses and
            networks (``"10.0.0.0/8"``) that ``block_private`` lets through.

    Raises:
        NotADirectoryError: ``dest`` exists and is not a directory.
        ValueError, TypeError: an option is out of range, of the wrong type, or unknown;
            ``block_private=True`` with a proxy set in the environment.
        ImportError: ``backend="curl"`` without pycurl.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        workers: int = 8,
        **options: Unpack[DownloadOptions],
    ) -> None:
        check_workers(workers)
        self._opts: Options = make_options(options)
        policy = make_policy(self._opts.block_private, self._opts.allow_hosts)
        self.dest = Path(dest)
        if self.dest.exists() and not self.dest.is_dir():
            raise NotADirectoryError(f"dest is not a directory: {self.dest}")
        self.workers = workers
        #: The transfer backend in use.
        self.backend = self._opts.backend
        self._cancel = threading.Event()
        self._watchdog = Watchdog()
        # Before anything is created: a missing backend fails with nothing left behind.
        self._transport = open_transport(
            self._opts.backend, workers, self._opts.session_factory, policy
        )
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
            self._emit = Emitter(self._opts.progress)
            self._pipeline = Pipeline(
                self.dest, self._opts, self._transport, self._emit, self._cancel, self._watchdog
            )
        except BaseException:
            self._transport.close()
            raise
        # Lock files stay open while this Downloader lives. Dropped without close(), it
        # still gives back its lock files, connections and threads (pending work keeps
        # it alive: its futures' callbacks hold it), at the latest at interpreter exit.
        weakref.finalize(self, _release, self._pipeline.pins, self._transport, self._watchdog)
        self._closed = False
        self._closing = False
        self._cancelled_urls: deque[object] = deque()
        opts = self._opts
        self._hosts: HostLimits[Any] | None = (
            HostLimits(opts.per_host, opts.rate, opts.retry.retry_after_cap)
            if opts.host_limits
            else None
        )
        # The Stops of downloads that can be stopped alone (fetchpool.aio's) and are not
        # done: cancelling everything sets their events too.
        self._stops: set[Stop] = set()
        self._stops_lock = threading.Lock()
        make_runner = getattr(self._transport, "runner", None)
        pipeline = self._pipeline
        self._runner: Runner = (
            make_runner(workers, self._hosts, pipeline if pipeline.express_ok else None)
            if make_runner is not None
            else Workers(workers, self._transport, self._hosts)
        )
        self._loop_prepares = make_runner is not None
        # A runner with an express lane takes plain URLs there (see Pipeline.express).
        self._express: (
            Callable[[str, Callable[[str, Future[Any]], None]], Future[DownloadResult]] | None
        ) = (
            getattr(self._runner, "submit_express", None)
            if getattr(self._runner, "takes_express", False)
            else None
        )
        self._express_many: (
            Callable[[list[str], Callable[[str, Future[Any]], None]], list[Future[DownloadResult]]]
            | None
        ) = getattr(self._runner, "submit_express_many", None) if self._express else None

    # -- public API -------------------------------------------------------------------

    def submit(
        self, url: str | Item, filename: str | os.PathLike[str] | None = None
    ) -> Future[DownloadResult]:
        """Schedule one download and return a future of its :class:`DownloadResult`.

        The future never raises for a failed download: the result says ``ok == False``.

        Args:
            url: an http(s) URL (anything else becomes a failed result), or an
                :class:`Item` (a URL with its file name, size or hash).
            filename: a path relative to ``dest`` to save to, instead of the URL's name.

        Raises:
            RuntimeError: the downloader is closed.
            TypeError: ``filename`` is not a str or path, or is given both here and
                in the :class:`Item`.
        """
        return self._submit(url, filename, None)

    def _submit_stoppable(
        self, url: str | Item, filename: str | os.PathLike[str] | None = None
    ) -> tuple[Future[DownloadResult], Stop]:
        """:meth:`submit`, and return the :class:`Stop` that :meth:`_stop` takes too.

        Raises:
            As :meth:`submit`.
        """
        stop = Stop()
        with self._stops_lock:
            self._stops.add(stop)
        if self._cancel.is_set():  # cancelled meanwhile: _cancel_all may have missed it
            stop.event.set()
        try:
            future = self._submit(url, filename, stop)
        except BaseException:
            self._forget_stop(stop)
            raise
        on_done(future, lambda _: self._forget_stop(stop))
        return future, stop

    def _forget_stop(self, stop: Stop) -> None:
        with self._stops_lock:
            self._stops.discard(stop)

    def _stop(self, future: Future[DownloadResult], stop: Stop) -> None:
        """Stop one download of :meth:`_submit_stoppable`: cancelled if it has not
        started, else stopped where it is (its result: a cancelled ``TransferError``)."""
        if future.cancel() or future.done():
            return
        stop.set()
        if self._hosts is not None:
            self._hosts.wake_all()  # a wait for its host's turn ends now
        self._runner.wake()  # a retry's wait on the curl loop ends now

    def _submit(
        self, url: str | Item, filename: str | os.PathLike[str] | None, stop: Stop | None
    ) -> Future[DownloadResult]:
        if self._closed:
            raise RuntimeError("cannot submit to a closed Downloader")
        expected: Expected | None = None
        if isinstance(url, Item):
            if url.filename is not None:
                if filename is not None:
                    raise TypeError("filename given twice: in the Item and as filename=")
                filename = url.filename
            expected = expected_of(url)
            url = url.url
        if filename is not None and not isinstance(filename, (str, os.PathLike)):
            raise TypeError(f"filename must be str or os.PathLike, not {type(filename).__name__}")
        self._emit(url, 0, None, "started")
        express = self._express
        if (
            express is not None
            and filename is None
            and expected is None
            and stop is None
            and type(url) is str
        ):
            return express(url, self._express_cancelled)
        hosts = self._hosts
        ticket = None if hosts is None or not isinstance(url, str) else hosts.ticket(url)
        if self._loop_prepares:
            # The loop starts downloads one at a time in submit order: it validates and
            # claims names itself, in that order, and this thread hands over no work.
            future = self._runner.submit(
                partial(self._pipeline.steps_of, url, filename, expected, ticket, stop), ticket
            )
            on_done(future, partial(self._settle_cancelled, None, url))
            return future
        try:
            task = self._pipeline.prepare(url, filename, expected, stop)
        except FetchError as exc:
            return self._refused(url, exc)
        task.ticket = ticket
        try:
            future = self._runner.submit(partial(self._pipeline.steps, task), ticket)
        except BaseException:
            # Closed meanwhile, or no thread could be started: the task never runs.
            self._pipeline.release_claims(task, None)
            raise
        on_done(future, partial(self._settle_cancelled, task, task.url))
        return future

    def _submit_plain(self, urls: list[str]) -> list[Future[DownloadResult]]:
        """:meth:`submit` each of ``urls`` (strings, no file name), in their order; at
        once where the express lane takes them (see ``submit_express_many``).

        Raises:
            RuntimeError: the downloader is closed.
        """
        many = self._express_many
        if many is None:
            return [self._submit(url, None, None) for url in urls]
        if self._closed:
            raise RuntimeError("cannot submit to a closed Downloader")
        told = 0
        try:
            for url in urls:
                self._emit(url, 0, None, "started")
                told += 1
        except BaseException:
            # A progress callback raised (Ctrl-C, say): the URLs it was told of are
            # queued all the same, as one by one they would have been, so that each
            # "started" gets its end ("failed", once cancelled).
            if told:
                many(urls[:told], self._express_cancelled)
            raise
        return many(urls, self._express_cancelled)

    def _express_cancelled(self, url: str, future: Future[Any]) -> None:
        self._settle_cancelled(None, url, future)

    def _settle_cancelled(
        self, task: Task | None, url: object, future: Future[DownloadResult]
    ) -> None:
        # A download cancelled before it started still owes its "failed" event and
        # its claims. During close() this runs under the executor's shutdown lock,
        # which a callback calling submit() may be waiting for: defer the event.
        if not future.cancelled():
            return
        if task is not None:
            self._pipeline.release_claims(task, None)
        if self._closing:
            self._cancelled_urls.append(url)
        else:
            self._emit(url, 0, None, "failed")

    def map(self, urls: UrlInput) -> Iterator[DownloadResult]:
        """Download ``urls`` lazily, yielding results in input order.

        At most ``2 * workers`` URLs are in flight or buffered, so an endless generator
        runs in flat memory. Repeats are not merged: a repeat finds the file and skips
        (if it matches what the repeat expects).

        Args:
            urls: an iterable of URL strings and :class:`Item` objects, or a mapping
                ``{url: filename}``.

        Raises:
            TypeError: ``urls`` is a single string.
        """
        items = _input_items(urls)
        return self._map(items)

    def _refuse(self, url: str, error: FetchError) -> Future[DownloadResult]:
        """Return the done future of a failed result for an input never submitted.

        Its ``"started"`` and ``"failed"`` events are sent, as for a submitted URL.
        """
        self._emit(url, 0, None, "started")
        return self._refused(url, error)

    def _refused(self, url: object, error: FetchError) -> Future[DownloadResult]:
        # The done future of a URL refused before it ran ("failed" event sent).
        done: Future[DownloadResult] = Future()
        done.set_result(self._pipeline.refused(url, error))
        return done

    def _map(self, items: Iterator[tuple[object, str | None]]) -> Iterator[DownloadResult]:
        window: deque[Future[DownloadResult]] = deque()
        limit = 2 * self.workers
        try:
            for url, filename in items:
                window.append(self.submit(url, filename))  # type: ignore[arg-type]
                while len(window) >= limit:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for fut in window:
                fut.cancel()

    def close(self, cancel: bool = False) -> None:
        """Wait for all downloads and release threads, connections and lock files.

        Args:
            cancel: cancel pending downloads and stop those in flight at their next
                read; their temporary files are removed.
        """
        self._closed = True
        if cancel:
            self._cancel_all()
        try:
            self._runner.shutdown(wait=True)
        except BaseException:
            # Interrupted while waiting (Ctrl-C after the with block ended well): what is
            # pending is cancelled and what is in flight stops, then the interrupt goes on.
            self._cancel_all()
            self._runner.shutdown(wait=True)
            raise
        finally:
            self._watchdog.stop()
            self._transport.close()
            self._pipeline.pins.release()
            self._emit.close()

    def _cancel_all(self) -> None:
        # Empty the queue first, so that no worker freed by the cancel below picks up a
        # pending download (which must end cancelled, not failed).
        self._closing = True
        try:
            self._runner.shutdown(wait=False, cancel_futures=True)
        finally:
            self._closing = False
        while self._cancelled_urls:
            self._emit(self._cancelled_urls.popleft(), 0, None, "failed")
        self._cancel.set()
        with self._stops_lock:
            stops = list(self._stops)
        for stop in stops:
            stop.event.set()
        self._watchdog.cancel_all()
        if self._hosts is not None:
            self._hosts.wake_all()  # those waiting for a host's turn, first
        self._runner.wake()

    def __enter__(self) -> Downloader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(cancel=exc_type is not None)


def _release(pins: Pins, transport: Transport, watchdog: Watchdog) -> None:
    """What a Downloader dropped without ``close()`` still owes (its finalizer).

    A finalizer runs on whatever thread drops the last reference, wherever it stands:
    on one of the Downloader's own threads (the curl loop, a helper), that may be inside
    a lock that closing takes too, and the thread would wait for itself forever. Off the
    main thread the work goes to a thread of its own; on it (and at interpreter exit,
    when no thread may start) it is done here.
    """
    if threading.current_thread() is not threading.main_thread():
        try:
            threading.Thread(
                target=_release_now,
                args=(pins, transport, watchdog),
                name="fetchpool-release",
                daemon=True,
            ).start()
        except RuntimeError:  # the interpreter is exiting
            pass
        else:
            return
    _release_now(pins, transport, watchdog)


def _release_now(pins: Pins, transport: Transport, watchdog: Watchdog) -> None:
    pins.release()
    transport.close()
    watchdog.stop()


def check_workers(workers: object) -> None:
    """Check the ``workers`` argument.

    Raises:
        TypeError: not an int.
        ValueError: less than 1.
    """
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"workers must be an int, not {type(workers).__name__}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")


def _input_items(urls: UrlInput) -> Iterator[tuple[object, str | None]]:
    """Return (url, filename) pairs; a mapping gives filenames, an iterable gives None.

    Raises:
        TypeError: ``urls`` is a string or bytes (an iterable of characters).
    """
    if isinstance(urls, (str, bytes, bytearray)):
        raise TypeError(
            "urls must be an iterable of URL strings or a mapping {url: filename}, "
            "not a single string"
        )
    if isinstance(urls, Mapping):
        return iter(urls.items())
    return zip(urls, itertools.repeat(None))
