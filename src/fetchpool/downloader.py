"""The :class:`Downloader`: a thread pool of workers, each with its own session."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import requests

from .deadline import Guard, Watchdog
from .errors import (
    FetchError,
    NotAnImageError,
    StorageError,
    TransferError,
    UnsafeFilenameError,
)
from .naming import (
    check_relative_filename,
    derived_name,
    name_from_content_disposition,
    name_from_url,
    origin_url,
    redact_url,
    scrub,
    secrets_of,
    validate_url,
)
from .options import (
    DEFAULT_MAX_BYTES,
    Options,
    Overwrite,
    ProgressCallback,
    SessionFactory,
    Timeout,
    Verify,
    make_options,
)
from .results import DownloadResult, ProgressEvent, ProgressState
from .retry import CLOCK, RetryPolicy, call_with_retries
from .sniff import SNIFF_BYTES, sniff_image
from .storage import (
    Cancelled,
    PathLock,
    Pins,
    TempFile,
    child_path,
    inspect_target,
    lock_key,
    supports_xattrs,
    sweep,
)
from .transfer import Body, default_session, open_response, prepare_session

if TYPE_CHECKING:
    from .progress import TqdmBar

__all__ = ["Downloader"]

log = logging.getLogger("fetchpool")

UrlInput = Iterable[str] | Mapping[str, str]


@dataclass
class _Task:
    """One URL on its way through the pool."""

    url: str
    origin: str
    path: Path
    caller_named: bool
    #: The URL as messages show it (no user-info), and what messages must not show.
    shown: str
    secrets: tuple[str, ...]
    #: Every claim taken for this task (derived and Content-Disposition names too).
    claimed: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class _Outcome:
    status: Literal["downloaded", "skipped"]
    path: Path
    nbytes: int
    content_type: str | None = None
    recorded: bool = False


def _key(text: str | Path) -> bytes:
    """Return the 16-byte digest that stands for a path or a URL in :class:`_Claims`.

    A remembered name costs its digests instead of a ``Path`` and the URL (measured with
    tracemalloc over 20,000 names: 428 bytes a name before, 128 after). Two names or
    URLs share a digest with odds of about 2**-64 even after billions of names.
    """
    data = os.fsencode(text) if isinstance(text, Path) else text.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=16).digest()


class _Claims:
    """Which URL owns which final path, within one Downloader.

    A claim protects a name while its download is in flight. After it, the file's
    ``user.xdg.origin.url`` record takes over, so the claim is dropped; it is kept
    for the Downloader's lifetime only where no such record exists (no xattrs, a
    skipped file with no record) and for caller-given names, whose files may belong
    to an earlier run. A failed download drops its claims: it has no file to protect.
    Kept claims grow with the names given out, so they hold digests only.
    """

    def __init__(self, remember: bool) -> None:
        self.remember = remember
        self._lock = threading.Lock()
        #: Claims in flight: path digest -> (URL digest, number of claims).
        self._owners: dict[bytes, tuple[bytes, int]] = {}
        #: Claims kept for good: path digest -> URL digest.
        self._kept: dict[bytes, bytes] = {}

    def _owner(self, key: bytes) -> bytes | None:
        held = self._owners.get(key)
        return held[0] if held is not None else self._kept.get(key)

    def _add(self, key: bytes, origin: bytes) -> None:
        held = self._owners.get(key)
        if held is None:
            self._owners[key] = (self._kept.get(key, origin), 1)
        else:
            self._owners[key] = (held[0], held[1] + 1)

    def url_name(self, directory: Path, name: str, url: str, origin: str) -> Path:
        """Claim ``directory/name`` for ``url``, or its derived name if another URL has it."""
        path = child_path(directory, name)
        key, mine = _key(path), _key(origin)
        with self._lock:
            owner = self._owner(key)
        # Looked at outside the lock: its syscalls release the GIL, and workers ending
        # their claims must not queue behind them. A stale answer is harmless, as the
        # worker decides again under the file's lock.
        found = inspect_target(path) if owner is None else None
        with self._lock:
            owner = self._owner(key)
            if owner is not None:
                taken = owner != mine
            else:
                taken = (
                    found is not None
                    and found.kind == "file"
                    and found.origin not in (None, origin)
                )
            if taken:
                path = child_path(directory, derived_name(name, url))
                key = _key(path)
            self._add(key, mine)
        return path

    def add(self, path: Path, origin: str) -> None:
        """Claim ``path`` for ``origin`` unconditionally (a URL's own derived name)."""
        key, mine = _key(path), _key(origin)
        with self._lock:
            self._add(key, mine)

    def caller_name(self, path: Path, origin: str) -> bool:
        """Claim a caller-given path; ``False`` if another URL of this run has it."""
        key, mine = _key(path), _key(origin)
        with self._lock:
            owner = self._owner(key)
            if owner is not None and owner != mine:
                return False
            self._add(key, mine)
            return True

    def release(self, path: Path, origin: str, *, keep: bool) -> None:
        """End one claim of ``origin`` on ``path``; ``keep`` remembers the name for good."""
        key, mine = _key(path), _key(origin)
        with self._lock:
            held = self._owners.get(key)
            if held is None or held[0] != mine:
                return
            if keep:
                self._kept[key] = mine
            if held[1] <= 1:
                del self._owners[key]
            else:
                self._owners[key] = (mine, held[1] - 1)

    def __len__(self) -> int:
        """The number of names claimed now or kept (for tests and diagnostics)."""
        with self._lock:
            return len(self._owners.keys() | self._kept.keys())


_DEFAULT_RETRY = RetryPolicy()


class Downloader:
    """Download URLs on a pool of threads; ``submit`` returns futures, ``map`` streams.

    Use it as a context manager; leaving the block waits for pending downloads, or
    cancels them if the block raised (``KeyboardInterrupt`` included).

    Args:
        dest: the directory to download into; created if missing.
        workers: the number of threads, each with its own ``requests.Session``.
        retry: a :class:`RetryPolicy`, or an int n meaning ``RetryPolicy(attempts=n)``.
        timeout: ``(connect, read)`` seconds per socket operation, or one number for both.
        deadline: the most seconds one attempt may take, headers and body included.
        max_bytes: abort a file larger than this many (decoded) bytes; ``None`` lifts it.
        overwrite: ``"skip"`` keeps a file already there (no request), ``"replace"``
            downloads again, ``"error"`` fails that URL with ``StorageError``.
        content_disposition: name files from ``Content-Disposition`` when present.
        allow_downgrade: allow a redirect from https to http.
        fsync: flush each file and its directory to disk before reporting it.
        verify: ``"image"`` requires the body to start like an image; ``None`` accepts any.
        headers: extra request headers.
        session_factory: a callable returning a configured ``requests.Session``,
            called once per worker thread.
        progress: ``True`` for a progress bar on stderr (needs ``tqdm``), or a callable
            that receives :class:`ProgressEvent` objects (calls are serialised).

    Raises:
        NotADirectoryError: ``dest`` exists and is not a directory.
        ValueError, TypeError: an option is out of range or of the wrong type.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        workers: int = 8,
        *,
        retry: RetryPolicy | int = _DEFAULT_RETRY,
        timeout: Timeout = (10.0, 30.0),
        deadline: float = 300.0,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        overwrite: Overwrite = "skip",
        content_disposition: bool = False,
        allow_downgrade: bool = False,
        fsync: bool = False,
        verify: Verify | None = "image",
        headers: Mapping[str, str] | None = None,
        session_factory: SessionFactory | None = None,
        progress: bool | ProgressCallback | None = None,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise TypeError(f"workers must be an int, not {type(workers).__name__}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self._opts: Options = make_options(
            retry=retry,
            timeout=timeout,
            deadline=deadline,
            max_bytes=max_bytes,
            overwrite=overwrite,
            content_disposition=content_disposition,
            allow_downgrade=allow_downgrade,
            fsync=fsync,
            verify=verify,
            headers=headers,
            session_factory=session_factory,
            progress=progress,
        )
        self.dest = Path(dest)
        if self.dest.exists() and not self.dest.is_dir():
            raise NotADirectoryError(f"dest is not a directory: {self.dest}")
        self.dest.mkdir(parents=True, exist_ok=True)
        self._real_dest = Path(os.path.realpath(self.dest))
        self.workers = workers
        self._callback: Callable[[ProgressEvent], object] | None = None
        self._bar: TqdmBar | None = None
        if self._opts.progress is True:
            from .progress import TqdmBar  # noqa: PLC0415 - tqdm is optional

            self._bar = TqdmBar()
            self._callback = self._bar
        elif callable(self._opts.progress):
            self._callback = self._opts.progress
        # Reentrant: a callback may call submit(), which emits "started".
        self._progress_lock = threading.RLock()
        self._cancel = threading.Event()
        self._watchdog = Watchdog()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self._swept: set[Path] = set()
        self._swept_lock = threading.Lock()
        # Lock files stay open while this Downloader lives; also released if it is
        # dropped without close(), at the latest when the interpreter exits.
        self._pins = Pins()
        weakref.finalize(self, self._pins.release)
        self._closed = False
        self._closing = False
        self._cancelled_urls: deque[str] = deque()
        self._sweep(self.dest)
        self._claims = _Claims(remember=not supports_xattrs(self.dest))
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetchpool")

    # -- public API -------------------------------------------------------------------

    def submit(
        self, url: str, filename: str | os.PathLike[str] | None = None
    ) -> Future[DownloadResult]:
        """Schedule one download and return a future of its :class:`DownloadResult`.

        The future never raises for a failed download: the result says ``ok == False``.

        Args:
            url: an http(s) URL (anything else becomes a failed result).
            filename: a path relative to ``dest`` to save to, instead of the URL's name.

        Raises:
            RuntimeError: the downloader is closed.
            TypeError: ``filename`` is not a str or path.
        """
        if self._closed:
            raise RuntimeError("cannot submit to a closed Downloader")
        if filename is not None and not isinstance(filename, (str, os.PathLike)):
            raise TypeError(f"filename must be str or os.PathLike, not {type(filename).__name__}")
        self._emit(url, 0, None, "started")
        try:
            task = self._prepare(url, filename)
        except FetchError as exc:
            result = DownloadResult(url=_shown_input(url), path=None, status="failed", error=exc)
            self._finish(result)
            done: Future[DownloadResult] = Future()
            done.set_result(result)
            return done
        try:
            future = self._executor.submit(self._run, task)
        except BaseException:
            # Closed meanwhile, or no thread could be started: the task never runs.
            self._release_claims(task, None)
            raise
        future.add_done_callback(partial(self._settle_cancelled, task))
        return future

    def _settle_cancelled(self, task: _Task, future: Future[DownloadResult]) -> None:
        # A download cancelled before it started still owes its "failed" event and
        # its claims. During close() this runs under the executor's shutdown lock,
        # which a callback calling submit() may be waiting for: defer the event.
        if not future.cancelled():
            return
        self._release_claims(task, None)
        if self._closing:
            self._cancelled_urls.append(task.url)
        else:
            self._emit(task.url, 0, None, "failed")

    def map(self, urls: UrlInput) -> Iterator[DownloadResult]:
        """Download ``urls`` lazily, yielding results in input order.

        At most ``2 * workers`` URLs are in flight or buffered, so an endless generator
        runs in flat memory. Repeats are not merged: a repeat finds the file and skips.

        Args:
            urls: an iterable of URLs, or a mapping ``{url: filename}``.

        Raises:
            TypeError: ``urls`` is a single string.
        """
        items = _input_items(urls)
        return self._map(items)

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
        """Wait for all downloads and release threads, sessions and sockets.

        Args:
            cancel: cancel pending downloads and stop those in flight at their next
                read; their temporary files are removed.
        """
        self._closed = True
        if cancel:
            # Empty the queue first, so that no worker freed by the cancel below picks up
            # a pending download (which must end cancelled, not failed).
            self._closing = True
            try:
                self._executor.shutdown(wait=False, cancel_futures=True)
            finally:
                self._closing = False
            while self._cancelled_urls:
                self._emit(self._cancelled_urls.popleft(), 0, None, "failed")
            self._cancel.set()
            self._watchdog.cancel_all()
        self._executor.shutdown(wait=True)
        self._watchdog.stop()
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self._pins.release()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Downloader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(cancel=exc_type is not None)

    # -- preparing a task (caller's thread) --------------------------------------------

    def _prepare(self, url: object, filename: str | os.PathLike[str] | None) -> _Task:
        valid = validate_url(url)
        origin = origin_url(valid)
        shown = redact_url(valid)
        secrets = secrets_of(valid, self._opts.headers)
        if filename is not None:
            relative = check_relative_filename(filename, valid)
            path = self.dest.joinpath(*relative.parts)
            if not self._claims.caller_name(path, origin):
                raise UnsafeFilenameError(
                    f"filename {str(relative)!r} is already used by another URL in this run "
                    f"({shown})",
                    url=shown,
                )
            return _Task(valid, origin, path, True, shown, secrets, claimed=[path])
        path = self._claims.url_name(self.dest, name_from_url(valid), valid, origin)
        return _Task(valid, origin, path, False, shown, secrets, claimed=[path])

    # -- the worker -------------------------------------------------------------------

    def _run(self, task: _Task) -> DownloadResult:
        start = time.monotonic()
        attempts = [0]
        outcome: _Outcome | None = None
        try:
            outcome = self._download(task, attempts)
            result = DownloadResult(
                url=task.url,
                path=outcome.path,
                status=outcome.status,
                bytes=outcome.nbytes,
                # A skip may follow a request (a Content-Disposition name), but no
                # download was attempted: the contract says 0.
                attempts=0 if outcome.status == "skipped" else attempts[0],
                elapsed=time.monotonic() - start,
                content_type=outcome.content_type,
            )
        except FetchError as exc:
            result = self._failed(task, exc, attempts[0], start)
        except Cancelled:
            shown = task.shown
            cancelled = TransferError(f"download of {shown} cancelled", url=shown, cancelled=True)
            result = self._failed(task, cancelled, attempts[0], start)
        except Exception as exc:
            # A bug here must not lose the URL: it becomes that URL's failure.
            log.exception("internal error while downloading %s", task.shown)
            text = scrub(repr(exc), task.secrets)
            error = FetchError(f"internal error downloading {task.shown}: {text}", url=task.shown)
            error.__cause__ = exc
            result = self._failed(task, error, attempts[0], start)
        finally:
            self._release_claims(task, outcome)
        self._finish(result)
        return result

    def _release_claims(self, task: _Task, outcome: _Outcome | None) -> None:
        for path in task.claimed:
            mine = outcome is not None and path == outcome.path
            keep = task.caller_named or (
                mine and outcome is not None and (self._claims.remember or not outcome.recorded)
            )
            self._claims.release(path, task.origin, keep=keep)
        task.claimed.clear()

    def _failed(
        self, task: _Task, error: FetchError, attempts: int, start: float
    ) -> DownloadResult:
        log.info("failed: %s", error)
        return DownloadResult(
            url=task.url,
            path=None,
            status="failed",
            attempts=attempts,
            elapsed=time.monotonic() - start,
            error=error,
        )

    def _download(self, task: _Task, attempts: list[int]) -> _Outcome:
        if self._cancel.is_set():
            raise Cancelled
        start = CLOCK.monotonic()  # the retry budget counts waiting for the lock too
        self._ensure_dir(task)
        if self._opts.content_disposition and not task.caller_named:
            # The name may come with the headers: settle it inside the attempt.
            return self._with_retries(task, None, attempts, start)
        lock, path, early = self._settle(task, task.path)
        if early is not None:
            return early
        assert lock is not None
        try:
            return self._with_retries(task, path, attempts, start)
        finally:
            lock.release()

    def _ensure_dir(self, task: _Task) -> None:
        parent = task.path.parent
        if parent == self.dest:
            return
        shown = task.shown
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create directory {parent} for {shown}: {exc}", url=shown, errno=exc.errno
            ) from exc
        real = Path(os.path.realpath(parent))
        if real != self._real_dest and self._real_dest not in real.parents:
            raise UnsafeFilenameError(
                f"{parent} leads outside the destination (a symlink?) for {shown}", url=shown
            )
        self._sweep(parent)

    def _sweep(self, directory: Path) -> None:
        with self._swept_lock:
            if directory in self._swept:
                return
            self._swept.add(directory)
            self._pins.add(directory)
        removed = sweep(directory)
        if removed:
            log.info("removed %d leftover temporary file(s) in %s", removed, directory)

    def _settle(self, task: _Task, path: Path) -> tuple[PathLock | None, Path, _Outcome | None]:
        """Lock ``path`` and decide: download into it, skip, fail, or take the derived name.

        Returns the held lock and the path to write, or no lock and the outcome.
        """
        shown = task.shown
        may_derive = not task.caller_named
        while True:
            lock = PathLock(
                path.parent, lock_key(path), self._cancel, shown, timeout=self._opts.retry.budget
            )
            lock.acquire()
            try:
                found = inspect_target(path)
                if found.kind == "other":
                    raise StorageError(
                        f"{path} exists and is not a regular file ({shown})", url=shown
                    )
                foreign = found.origin is not None and found.origin != task.origin
                if found.kind == "file" and foreign and may_derive:
                    # Another URL's file holds the plain name: use this URL's own name.
                    lock.release()
                    path = child_path(path.parent, derived_name(path.name, task.url))
                    self._claims.add(path, task.origin)
                    task.claimed.append(path)
                    may_derive = False
                    continue
                if found.kind == "file" and self._opts.overwrite == "skip":
                    lock.release()
                    return (
                        None,
                        path,
                        _Outcome("skipped", path, found.size, recorded=found.origin == task.origin),
                    )
                if self._opts.overwrite == "error" and (
                    found.kind == "file" or os.path.islink(path)
                ):
                    raise StorageError(f"{path} already exists (overwrite='error')", url=shown)
            except BaseException:
                lock.release()
                raise
            return lock, path, None

    def _with_retries(
        self, task: _Task, path: Path | None, attempts: list[int], start: float
    ) -> _Outcome:
        shown = task.shown

        def attempt(number: int, time_left: float) -> _Outcome:
            attempts[0] = number
            return self._attempt(task, path, time_left)

        def before_retry(exc: BaseException, number: int, wait: float) -> None:
            log.info("retrying %s in %.1f s after attempt %d: %s", shown, wait, number, exc)
            self._emit(task.url, 0, None, "retrying")

        return call_with_retries(
            self._opts.retry, attempt, cancel=self._cancel, before_retry=before_retry, start=start
        )

    def _attempt(self, task: _Task, path: Path | None, time_left: float) -> _Outcome:
        shown = task.shown
        if self._cancel.is_set():
            raise Cancelled
        if time_left <= 0:
            raise TransferError(f"retry budget used up for {shown}", url=shown, retryable=False)
        limit = "deadline" if self._opts.deadline <= time_left else "retry budget"
        session = self._session()
        with self._watchdog.guard(min(self._opts.deadline, time_left), limit) as guard:
            log.debug("GET %s", shown)
            resp = open_response(
                session,
                task.url,
                headers=self._opts.headers,
                timeout=self._opts.timeout,
                allow_downgrade=self._opts.allow_downgrade,
                guard=guard,
                secrets=task.secrets,
                env_cache=self._local.env_cache,
                shown=shown,
            )
            try:
                lock: PathLock | None = None
                if path is None:
                    # Content-Disposition names arrive with the headers: settle the
                    # name (and skip) now, before any of the body is read.
                    lock, path, early = self._settle(task, self._disposition_path(task, resp))
                    if early is not None:
                        return early
                try:
                    return self._receive(task, path, resp, guard)
                finally:
                    if lock is not None:
                        lock.release()
            finally:
                resp.close()

    def _disposition_path(self, task: _Task, resp: requests.Response) -> Path:
        name = name_from_content_disposition(resp.headers.get("Content-Disposition"))
        if name is None or name == task.path.name:
            return task.path
        path = self._claims.url_name(self.dest, name, task.url, task.origin)
        task.claimed.append(path)
        return path

    def _receive(self, task: _Task, path: Path, resp: requests.Response, guard: Guard) -> _Outcome:
        shown = task.shown
        body = Body(resp, task.url, self._opts.max_bytes, guard, task.secrets, shown)
        content_type = resp.headers.get("Content-Type")
        chunks = body.chunks()
        head = b""
        for chunk in chunks:
            # Usually the first chunk is enough: keep it as it is rather than copy it.
            head = head + chunk if head else chunk
            if len(head) >= SNIFF_BYTES:
                break
        if self._opts.verify == "image" and sniff_image(head[:SNIFF_BYTES]) is None:
            what = content_type or "no Content-Type"
            raise NotAnImageError(
                f"{shown} is not an image ({what}, starts with {head[:16]!r})", url=shown
            )
        return self._write(task, path, head, chunks, body, content_type)

    def _write(
        self,
        task: _Task,
        path: Path,
        head: bytes,
        chunks: Iterator[bytes],
        body: Body,
        content_type: str | None,
    ) -> _Outcome:
        tmp = TempFile(path.parent, lock_key(path), task.shown)
        try:
            if head:
                tmp.write(head)
                self._emit(task.url, tmp.size, body.total, "progress")
            # A big plain-HTTP body goes socket to file by splice(2); chunks then only
            # ends it (or reads all of the rest where it cannot be spliced).
            body.splice_into(tmp, lambda: self._emit(task.url, tmp.size, body.total, "progress"))
            for chunk in chunks:
                tmp.write(chunk)
                self._emit(task.url, tmp.size, body.total, "progress")
            recorded = tmp.commit(path, task.origin, self._opts.fsync)
        except BaseException:
            tmp.discard()
            raise
        return _Outcome("downloaded", path, tmp.size, content_type, recorded)

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            factory = self._opts.session_factory
            if factory is not None:
                session = factory()
                if not isinstance(session, requests.Session):
                    raise TypeError("session_factory must return a requests.Session")
                prepare_session(session)
            else:
                session = default_session(self.workers)
            self._local.session = session
            self._local.env_cache = {}
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    # -- progress ---------------------------------------------------------------------

    def _emit(self, url: object, nbytes: int, total: int | None, state: ProgressState) -> None:
        callback = self._callback
        if callback is None:
            return
        event = ProgressEvent(url=_shown_input(url), bytes=nbytes, total=total, state=state)
        with self._progress_lock:
            try:
                callback(event)
            except Exception:
                log.exception("progress callback raised; ignored")

    def _finish(self, result: DownloadResult) -> None:
        state: ProgressState = "done" if result.ok else "failed"
        self._emit(result.url, result.bytes, None, state)


def _shown_input(url: object) -> str:
    return url if isinstance(url, str) else repr(url)


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
