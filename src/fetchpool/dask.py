"""Shards of a URL list on a Dask cluster, under the same contract as on one machine.

``pip install "fetchpool[dask]"``. The input is cut into shards of ``shard_size`` items as
it is read; each shard is one Dask task that runs :func:`fetchpool.download_all` on its
worker (``workers`` threads, or curl transfers) and sends back its results. At most
``window`` shards run at once, and results come back in input order, one per input item.

Every worker writes into ``dest``, so ``dest`` must be one filesystem that all of them see
(a local path for a ``LocalCluster``; NFS, CephFS, Lustre... for a real cluster). The
per-file locks (POSIX record locks) and atomic renames that make concurrent processes
safe on one machine make concurrent shards safe there.

Progress (``progress=``) stays on the client and is fed per shard: ``"started"`` for each
item when its shard is sent, then ``"progress"`` (its bytes) and ``"done"`` or ``"failed"``
for each file when its shard's results arrive.

``distributed`` is imported only when a function here is called: ``import fetchpool`` (or
unpickling a :class:`~fetchpool.ShardError`) never imports Dask.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .downloader import UrlInput, _input_items
from .errors import FetchError, ShardError, StorageError, TransferError, UnsafeFilenameError
from .items import Item
from .naming import redact_url, shown_input
from .options import Options, make_options
from .progress import Emitter
from .results import DownloadResult, Results

if TYPE_CHECKING:
    from distributed import Client
    from typing_extensions import Unpack

    from .options import DownloadOptions

__all__ = ["DEFAULT_SHARD_SIZE", "ShardPool", "download_all", "map", "shipped_options"]

log = logging.getLogger("fetchpool")

#: Items per shard by default: large enough that a shard's start (a Downloader, its
#: connections, the sweep of ``dest``) is small beside its transfers, small enough that a
#: shard lost with its worker costs little to run again.
DEFAULT_SHARD_SIZE = 500
#: Seconds an incomplete shard waits for more input before it is sent anyway (a slow
#: pipe must not hold back the items already read).
LINGER = 0.5
#: The most seconds ``close(cancel=True)`` waits for Dask to report shards cancelled.
_CANCEL_WAIT = 10.0
#: The options that stay on the client: callables of the caller's process.
CLIENT_SIDE = frozenset({"progress"})


def shipped_options(opts: Options) -> dict[str, Any]:
    """Return validated options as the keyword arguments a worker passes on.

    Every field but the client-side ones (``progress``) is kept as it is: plain data
    that pickles (``headers`` included), and that ``make_options`` takes back unchanged,
    so an option added to :class:`~fetchpool.options.Options` travels with no change here.
    """
    return {
        f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name not in CLIENT_SIDE
    }


def download_all(
    urls: UrlInput,
    dest: str | os.PathLike[str],
    *,
    client: Client | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int = 8,
    window: int | None = None,
    **options: Unpack[DownloadOptions],
) -> Results:
    """Download every URL into ``dest`` on a Dask cluster and return all results.

    As :func:`fetchpool.download_all`, but a URL repeated in another shard is settled
    as :meth:`fetchpool.Downloader.map` settles repeats: it finds the file and is
    ``skipped``. See :func:`map` for the arguments.

    Returns:
        :class:`~fetchpool.Results`, one entry per input item, in input order.

    Raises:
        RuntimeError: no ``client`` given and no current Dask client.
        ImportError: ``distributed`` is not installed.
        TypeError, ValueError: as :func:`map`.
    """
    start = time.monotonic()
    results = list(
        map(
            urls,
            dest,
            client=client,
            shard_size=shard_size,
            workers=workers,
            window=window,
            **options,
        )
    )
    return Results(results, elapsed=time.monotonic() - start)


def map(  # noqa: A001 - fetchpool.dask.map, as Downloader.map
    urls: UrlInput,
    dest: str | os.PathLike[str],
    *,
    client: Client | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int = 8,
    window: int | None = None,
    **options: Unpack[DownloadOptions],
) -> Iterator[DownloadResult]:
    """Download ``urls`` on a Dask cluster lazily, yielding results in input order.

    The input is read as shards are needed: at most about ``window + 1`` shards of
    items are held, so a generator of millions of URLs runs in flat memory. Leaving
    the loop early, or Ctrl-C, cancels the shards not finished.

    Args:
        urls: an iterable of URL strings and :class:`~fetchpool.Item` objects, or a
            mapping ``{url: filename}``.
        dest: the directory to download into, as the workers see it (made absolute
            here, against the client's working directory); created if missing.
        client: the Dask client; ``None`` takes the current one
            (``distributed.get_client()``).
        shard_size: the items per shard (one Dask task each).
        workers: the threads (or curl transfers) of each shard's Downloader.
        window: the most shards running at once; default twice the cluster's worker
            threads.
        **options: the options of :class:`~fetchpool.Downloader`; ``progress`` is
            fed here, on the client, per shard.

    Raises:
        RuntimeError: no ``client`` given and no current Dask client.
        ImportError: ``distributed`` is not installed.
        TypeError: ``urls`` is a single string, or an option is unknown or of the
            wrong type.
        ValueError: ``workers``, ``shard_size`` or ``window`` is below 1, or an option
            is out of range.
    """
    pairs = _input_items(urls)
    pool = ShardPool(
        dest,
        client=client,
        shard_size=shard_size,
        workers=workers,
        window=window,
        **options,
    )
    return _ordered(pool, pairs)


def _ordered(
    pool: ShardPool, pairs: Iterator[tuple[object, str | None]]
) -> Iterator[DownloadResult]:
    futures: deque[Future[DownloadResult]] = deque()
    # The items of the shards that may run, plus the one being filled.
    limit = (pool.window + 1) * pool.shard_size
    cancel = True
    try:
        for item, filename in pairs:
            futures.append(pool.submit(item, filename))  # type: ignore[arg-type]
            while len(futures) > limit:
                yield futures.popleft().result()
        pool.flush()
        while futures:
            yield futures.popleft().result()
        cancel = False
    finally:
        pool.close(cancel=cancel)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, not {value}")
    return value


def _current_client(client: Client | None) -> Any:
    # Any: distributed's own annotations leave much of Client untyped.
    try:
        import distributed  # noqa: PLC0415 - optional, and Dask is slow to import
    except ImportError as exc:
        raise ImportError(
            "fetchpool.dask needs distributed: pip install 'fetchpool[dask]'"
        ) from exc
    if client is not None:
        return client
    try:
        return distributed.get_client()
    except ValueError as exc:
        raise RuntimeError(
            "fetchpool.dask needs a Dask client: start one (distributed.Client(address), "
            "or distributed.Client(distributed.LocalCluster())) or pass client="
        ) from exc


@dataclass(eq=False)
class _Shard:
    """Items sent as one Dask task, with the futures of their results."""

    opened: float
    items: list[object] = field(default_factory=list)
    futures: list[Future[DownloadResult]] = field(default_factory=list)
    key: str = ""


class ShardPool:
    """Downloads on a Dask cluster behind ``submit``/``close``, as a Downloader's.

    Items are gathered into shards of ``shard_size``; a shard is sent when it is full,
    when no item came for :data:`LINGER` seconds, or on :meth:`flush` or :meth:`close`.
    ``submit`` waits while ``window`` shards run. :func:`map` and the command line
    (``fetchpool --dask``) are built on it.

    Args:
        dest: the directory to download into, as the workers see it.
        client: the Dask client; ``None`` takes the current one.
        shard_size: the items per shard.
        workers: the threads of each shard's Downloader.
        window: the most shards running at once; default twice the cluster's threads.
        **options: the options of :class:`~fetchpool.Downloader`.

    Raises:
        RuntimeError: no ``client`` given and no current Dask client.
        ImportError: ``distributed`` is not installed.
        TypeError, ValueError: a count or option of the wrong type or out of range.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        *,
        client: Client | None = None,
        shard_size: int = DEFAULT_SHARD_SIZE,
        workers: int = 8,
        window: int | None = None,
        **options: Unpack[DownloadOptions],
    ) -> None:
        self.shard_size = _check_count("shard_size", shard_size)
        self.workers = _check_count("workers", workers)
        opts = make_options(options)
        self._client = _current_client(client)
        if window is None:
            threads = sum(self._client.nthreads().values())
            window = 2 * max(1, threads)
        self.window = _check_count("window", window)
        #: The transfer backend each shard uses.
        self.backend = opts.backend
        self.dest = os.path.abspath(os.fspath(dest))
        self._shipped = shipped_options(opts)
        self._emit = Emitter(opts.progress)
        self._lock = threading.Condition()
        self._open: _Shard | None = None
        self._running: dict[str, Any] = {}  # key -> the Dask future of a shard sent
        self._sending = 0  # shards waiting for room, or being sent
        self._token = uuid.uuid4().hex[:12]
        self._numbers = itertools.count()
        # Caller-given file names -> their URL: each shard's Downloader refuses a name
        # given twice only within the shard, so the run does it across shards.
        self._names: dict[str, object] = {}
        self._closed = False
        self._cancelled = False
        # Started by the first submit: a map() never iterated leaves no thread behind.
        self._flusher: threading.Thread | None = None

    # -- submitting ----------------------------------------------------------------------

    def submit(
        self, url: str | Item, filename: str | os.PathLike[str] | None = None
    ) -> Future[DownloadResult]:
        """Queue one download; return a future of its result (never an exception).

        Raises:
            RuntimeError: the pool is closed.
            TypeError: ``filename`` is given both here and in the :class:`Item`.
        """
        if self._closed:
            raise RuntimeError("cannot submit to a closed ShardPool")
        item = _with_filename(url, filename)
        bare = item.url if isinstance(item, Item) else item
        future: Future[DownloadResult] = Future()
        self._emit(bare, 0, None, "started")
        refusal = self._claim(item)
        if refusal is not None:
            shown = shown_input(bare)
            result = DownloadResult(url=shown, path=None, status="failed", error=refusal)
            self._emit(shown, 0, None, "failed")
            future.set_result(result)
            return future
        full = None
        with self._lock:
            shard = self._open
            if shard is None:
                shard = self._open = _Shard(opened=time.monotonic())
                self._lock.notify_all()  # the flusher times it
                if self._flusher is None:
                    self._flusher = threading.Thread(
                        target=self._linger, name="fetchpool-dask-flush", daemon=True
                    )
                    self._flusher.start()
            shard.items.append(item)
            shard.futures.append(future)
            if len(shard.items) >= self.shard_size:
                full, self._open = shard, None
                self._sending += 1
        if full is not None:
            self._send(full)
        return future

    def _claim(self, item: object) -> FetchError | None:
        """Refuse a caller-given file name that another URL of this run was given."""
        if not isinstance(item, Item) or item.filename is None or not isinstance(item.url, str):
            return None
        name = os.path.normpath(os.fspath(item.filename))
        with self._lock:
            first = self._names.setdefault(name, item.url)
        if first == item.url:
            return None
        shown = redact_url(item.url)
        return UnsafeFilenameError(
            f"filename {name!r} is already used by another URL in this run ({shown})",
            url=shown,
        )

    def flush(self) -> None:
        """Send the shard being filled now, however small."""
        with self._lock:
            shard, self._open = self._open, None
            if shard is not None:
                self._sending += 1
        if shard is not None:
            self._send(shard)

    def _linger(self) -> None:
        # Sends a shard that got no item for LINGER seconds.
        while True:
            with self._lock:
                shard = self._open
                if shard is None:
                    if self._closed:
                        return
                    self._lock.wait()
                    continue
                due = shard.opened + LINGER - time.monotonic()
                if due > 0:
                    self._lock.wait(due)
                    continue
                self._open = None
                self._sending += 1
            self._send(shard)

    def _send(self, shard: _Shard) -> None:
        """Send ``shard`` as one Dask task once fewer than ``window`` shards run."""
        try:
            with self._lock:
                self._lock.wait_for(lambda: len(self._running) < self.window or self._cancelled)
                if self._cancelled:
                    for future in shard.futures:
                        future.cancel()
                    return
                # Running from here: a future cancelled before is left out of the shard.
                kept = [
                    (item, future)
                    for item, future in zip(shard.items, shard.futures, strict=True)
                    if future.set_running_or_notify_cancel()
                ]
                if not kept:
                    return
                shard.items = [item for item, _ in kept]
                shard.futures = [future for _, future in kept]
                shard.key = f"fetchpool-shard-{self._token}-{next(self._numbers)}"
                self._running[shard.key] = None
        finally:
            with self._lock:
                self._sending -= 1
                self._lock.notify_all()
        try:
            task = self._client.submit(
                _run_shard,
                shard.items,
                self.dest,
                self.workers,
                self._shipped,
                key=shard.key,
                pure=False,
            )
        except Exception as exc:  # noqa: BLE001 - a closed client, say: its items fail
            log.warning("cannot send a shard to the Dask cluster: %r", exc)
            self._finish(shard, None, exc)
            return
        except BaseException as exc:  # an interrupt: its items fail, and it goes on
            self._finish(shard, None, exc)
            raise
        with self._lock:
            self._running[shard.key] = task
        if self._was_cancelled():  # close(cancel=True) came while it was being sent
            self._client.cancel([task])
        task.add_done_callback(lambda done: self._finished(shard, done))

    def _was_cancelled(self) -> bool:
        with self._lock:
            return self._cancelled

    # -- results -------------------------------------------------------------------------

    def _finished(self, shard: _Shard, task: Any) -> None:
        # On Dask's callback thread: fetch the shard's results once, for every item.
        try:
            results: list[DownloadResult] | None = task.result()
            failure: BaseException | None = None
        except BaseException as exc:  # noqa: BLE001 - any failure becomes the results'
            results, failure = None, exc
        # Now, not when the future is collected: the results leave the worker's memory
        # and the scheduler forgets the task.
        task.release()
        self._finish(shard, results, failure)

    def _finish(
        self,
        shard: _Shard,
        results: list[DownloadResult] | None,
        failure: BaseException | None,
    ) -> None:
        if results is None or len(results) != len(shard.items):
            if failure is None:
                failure = RuntimeError(
                    f"the shard sent back {0 if results is None else len(results)} results "
                    f"for {len(shard.items)} items"
                )
            results = [self._failed(item, failure) for item in shard.items]
        for result, future in zip(results, shard.futures, strict=True):
            if result.bytes and result.status == "downloaded":
                self._emit(result.url, result.bytes, result.bytes, "progress")
            self._emit(result.url, result.bytes, None, "done" if result.ok else "failed")
            future.set_result(result)
        with self._lock:
            self._running.pop(shard.key, None)
            self._lock.notify_all()

    def _failed(self, item: object, failure: BaseException) -> DownloadResult:
        """The failed result of ``item`` in a shard that failed as a whole."""
        bare = item.url if isinstance(item, Item) else item
        url = shown_input(bare)
        shown = redact_url(url)
        why = _describe(failure)
        error: FetchError
        if self._cancelled:
            error = TransferError(
                f"{shown} was not downloaded: the run was cancelled ({why})",
                url=shown,
                cancelled=True,
            )
        elif isinstance(failure, OSError):
            error = StorageError(
                f"{shown} was not downloaded: {why}", url=shown, errno=failure.errno
            )
        else:
            error = ShardError(
                f"{shown} was not downloaded: its shard failed on the Dask cluster ({why})",
                url=shown,
            )
        error.__cause__ = failure
        return DownloadResult(url=url, path=None, status="failed", error=error)

    # -- closing -------------------------------------------------------------------------

    def close(self, cancel: bool = False) -> None:
        """Send what is left and wait for every shard; or cancel what is not done.

        Shards cancelled before they started never run; a shard already running on a
        worker cannot be stopped there (Dask does not interrupt a running task): it
        finishes its files, and its results are dropped.

        Args:
            cancel: cancel the shards not finished (their items fail as cancelled).
        """
        if not cancel:
            try:
                self.flush()
                with self._lock:
                    self._lock.wait_for(lambda: not self._running and not self._sending)
            except BaseException:
                self.close(cancel=True)
                raise
        with self._lock:
            self._closed = True
            if cancel:
                self._cancelled = True
            shard, self._open = self._open, None
            tasks = [task for task in self._running.values() if task is not None]
            self._lock.notify_all()
        if shard is not None:
            for future in shard.futures:
                future.cancel()
        if tasks:
            self._client.cancel(tasks)
            # Their results (cancelled) come through Dask's callback thread: wait for
            # them, so that no event reaches a closed bar, but not forever.
            with self._lock:
                self._lock.wait_for(lambda: not self._running, timeout=_CANCEL_WAIT)
        if self._flusher is not None:
            self._flusher.join()
        self._emit.close()

    def __enter__(self) -> ShardPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(cancel=exc_type is not None)


def _with_filename(url: object, filename: str | os.PathLike[str] | None) -> object:
    """The input item, with ``filename`` folded into an :class:`Item` when given."""
    if filename is None:
        return url
    if isinstance(url, Item):
        if url.filename is not None:
            raise TypeError("filename given twice: in the Item and as filename=")
        return dataclasses.replace(url, filename=filename)
    return Item(url, filename)  # type: ignore[arg-type]  # a non-str URL fails as one


def _describe(failure: BaseException) -> str:
    text = str(failure)
    name = type(failure).__name__
    return f"{name}: {text}" if text else name


def _run_shard(
    items: list[object], dest: str, workers: int, options: dict[str, Any]
) -> list[DownloadResult]:
    """Download one shard on a Dask worker (the task each shard is).

    Raises:
        StorageError: ``dest`` cannot be used on this worker (the message names it).
    """
    from .api import download_all as download_here  # noqa: PLC0415 - not at import time

    try:
        results = download_here(items, dest, workers, **options)  # type: ignore[arg-type]
    except OSError as exc:
        where = _worker_address()
        raise StorageError(
            f"the Dask worker {where} cannot use dest {dest}: {exc.strerror or exc}",
            errno=exc.errno,
        ) from exc
    finally:
        # The shard's Downloader leaves cycles (its threads' locals among them): where the
        # worker's profiler runs, collect them here, not wherever the next collection
        # happens. On Python 3.11 that can be inside the profiler (sys._current_frames,
        # every 10 ms), where freeing a thread-local deadlocked the whole process (seen on
        # a LocalCluster). Only there: a full collection in a worker costs 60-100 ms.
        if _profiler_on():
            gc.collect()
    return list(results)


def _profiler_on() -> bool:
    """Whether this process's Dask config runs the worker's statistical profiler."""
    try:
        import dask  # noqa: PLC0415 - on a worker: imported

        return bool(dask.config.get("distributed.worker.profile.enabled", default=True))
    except ImportError:
        return False


def _worker_address() -> str:
    try:
        from distributed import get_worker  # noqa: PLC0415 - on a worker: imported

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"process {os.getpid()}"
