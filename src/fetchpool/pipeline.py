"""The per-URL pipeline, shared by every backend: from a URL to its result.

Claim a name, lock it, decide whether to skip, run attempts under the retry policy,
sniff the head, stream into a temporary file, commit it at its final name, report
progress, build the result. It is written as steps (:mod:`fetchpool.steps`): the pool
(:mod:`fetchpool.downloader`) runs them on its worker threads with :meth:`Pipeline.run`,
or hands them to a backend that drives them on its event loop; the backend behind
:mod:`fetchpool.backends` only sends requests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

from .backends import Reply, Request, Transport
from .checksums import Algorithm, Expected, hash_file
from .claims import Claims
from .deadline import Guard, Stop, Watchdog
from .errors import (
    FetchError,
    HTTPStatusError,
    NotAnImageError,
    StorageError,
    TransferError,
    UnsafeFilenameError,
)
from .hosts import Ticket
from .naming import (
    check_relative_filename,
    derived_name,
    name_from_content_disposition,
    name_from_url,
    origin_url,
    redact_url,
    scrub,
    secrets_of,
    shown_input,
    validate_url,
)
from .options import Options
from .progress import Emitter
from .results import DownloadResult
from .resume import Kept, check_partial_reply, range_headers, validator_of
from .retry import CLOCK, is_retryable, retrying
from .sniff import SNIFF_BYTES, sniff_image
from .steps import Admit, Block, Steps, run
from .storage import (
    Cancelled,
    PathLock,
    Pins,
    TempFile,
    child_path,
    inspect_target,
    lock_key,
    partial_path,
    read_partial,
    slow_to_create,
    store_whole,
    supports_xattrs,
    sweep,
)
from .transfer import SPLICE_BLOCK, Body, content_length, open_response, request_headers

__all__ = ["NOT_PLAIN", "NO_LENGTH", "Outcome", "Pipeline", "Task"]

log = logging.getLogger("fetchpool")

#: The biggest body the express lane takes whole into memory (see Pipeline.express).
_EXPRESS_MAX = 1024 * 1024
#: What :meth:`Pipeline.express_length` says of an answer without a length, and of one
#: that may not stay in the express lane.
NO_LENGTH = -1
NOT_PLAIN = -2

#: A file found at the final name up to this big is hashed where the pipeline runs;
#: a bigger one in a Block step, which a driver with a loop runs on another thread.
_HASH_INLINE_MAX = 256 * 1024


@dataclass
class Task:
    """One URL on its way through the pool."""

    url: str
    origin: str
    path: Path
    caller_named: bool
    #: The URL as messages show it (no user-info), and what messages must not show.
    shown: str
    secrets: tuple[str, ...]
    #: The directory of ``path``, and of every other path the task may take (a derived or
    #: Content-Disposition name is always a sibling): kept, not made again from ``path``.
    directory: Path
    #: Set when the download is cancelled: the Downloader's event, or its own :class:`Stop`'s.
    cancel: threading.Event
    #: Every claim taken for this task (derived and Content-Disposition names too).
    claimed: list[Path] = field(default_factory=list)
    #: What the caller expects of the file (from an Item), or ``None``.
    expected: Expected | None = None
    #: Its standing with the per-host limits, if they are on.
    ticket: Ticket | None = None
    #: What stops this download alone, if it can be (``None``: only with the Downloader).
    stop: Stop | None = None
    #: When its first attempt began, where a driver began it in its express lane
    #: (:meth:`Pipeline.express`): ``time.monotonic()`` and the retry clock's.
    began: tuple[float, float] | None = None
    #: The lock of ``path``, taken in the express lane (nothing was found there): the
    #: steps go on under it, with no other writer let in between.
    held: PathLock | None = None


class Outcome(NamedTuple):
    """What a download that did not fail came to.

    A named tuple, not a frozen dataclass: one is made per file, and a frozen dataclass's
    ``__init__`` is a Python call that sets each field by hand.
    """

    status: Literal["downloaded", "skipped"]
    path: Path
    nbytes: int
    content_type: str | None = None
    recorded: bool = False
    #: The hashes computed (of the body, or of the file found), if any were expected.
    digests: dict[Algorithm, str] | None = None


class Pipeline:
    """Everything one URL goes through, for one Downloader.

    Args:
        dest: the destination directory (it exists).
        opts: the validated options.
        transport: the backend that sends requests.
        emit: where progress events go.
        cancel: set when the Downloader cancels; attempts and lock waits end.
        watchdog: fires the attempts' deadlines.
    """

    def __init__(
        self,
        dest: Path,
        opts: Options,
        transport: Transport,
        emit: Emitter,
        cancel: threading.Event,
        watchdog: Watchdog,
    ) -> None:
        self.dest = dest
        self.opts = opts
        self._real_dest = Path(os.path.realpath(dest))
        self._transport = transport
        self._emit = emit
        self._cancel = cancel
        self._watchdog = watchdog
        self._swept: set[Path] = set()
        self._swept_lock = threading.Lock()
        # Lock files stay open while the Downloader lives (its finalizer releases them).
        self.pins = Pins()
        self._sweep(dest)
        xattrs = supports_xattrs(dest)
        self.claims = Claims(remember=not xattrs)
        # resume=True keeps partial files only where they can record what they hold.
        self._partials = opts.resume and xattrs
        if opts.resume and not xattrs:
            log.warning(
                "resume=True: %s has no user extended attributes; partial files are not "
                "kept across runs (a body is still resumed within a run)",
                dest,
            )
        self._header_secrets = secrets_of("", opts.headers)
        #: Whether a driver may take plain downloads through :meth:`express`: none of
        #: the options that make a first attempt more than a GET written to a new file.
        self.express_ok = not (
            self._partials or opts.content_disposition or opts.fsync or opts.host_limits
        )
        # Every express request sends these (what open_response's first hop sends).
        self._express_headers = request_headers(opts.headers, False)
        cap = _EXPRESS_MAX if opts.max_bytes is None else min(_EXPRESS_MAX, opts.max_bytes)
        #: The most body bytes an express download holds in memory: past them (or a
        #: bigger Content-Length), the download goes on through :meth:`steps`.
        self.express_cap = cap

    # -- preparing a task (caller's thread) --------------------------------------------

    def prepare(
        self,
        url: object,
        filename: str | os.PathLike[str] | None,
        expected: Expected | None = None,
        stop: Stop | None = None,
        *,
        look: bool = True,
    ) -> Task:
        """Validate ``url`` and claim its final path (on the caller's thread, in input order).

        ``expected`` is what the caller expects of the file, if anything; ``stop``, what
        stops this download alone, if anything. ``look=False``: a name from the URL is
        claimed without a look at a file there (see :meth:`Claims.url_name
        <fetchpool.claims.Claims.url_name>`).

        Raises:
            InvalidURL: not an http(s) URL.
            UnsafeFilenameError: ``filename`` escapes ``dest`` or another URL has it.
        """
        valid = validate_url(url)
        origin = origin_url(valid)
        shown = redact_url(valid)
        # A URL without user-info has the headers' secrets only: the same for every URL.
        secrets = secrets_of(valid, self.opts.headers) if "@" in valid else self._header_secrets
        cancel = self._cancel if stop is None else stop.event
        if filename is not None:
            relative = check_relative_filename(filename, valid)
            path = self.dest.joinpath(*relative.parts)
            if not self.claims.caller_name(path, origin):
                raise UnsafeFilenameError(
                    f"filename {str(relative)!r} is already used by another URL in this run "
                    f"({shown})",
                    url=shown,
                )
            directory = path.parent
        else:
            path = self.claims.url_name(self.dest, name_from_url(valid), valid, origin, look=look)
            directory = self.dest
        return Task(
            valid,
            origin,
            path,
            filename is not None,
            shown,
            secrets,
            directory,
            cancel,
            [path],
            expected,
            stop=stop,
        )

    def refused(self, url: object, error: FetchError) -> DownloadResult:
        """The result of a URL that :meth:`prepare` refused (its "failed" event sent)."""
        result = DownloadResult(url=shown_input(url), path=None, status="failed", error=error)
        self._emit(result.url, 0, None, "failed")
        return result

    def steps_of(
        self,
        url: object,
        filename: str | os.PathLike[str] | None,
        expected: Expected | None = None,
        ticket: Ticket | None = None,
        stop: Stop | None = None,
    ) -> Steps[DownloadResult]:
        """:meth:`prepare` and then :meth:`steps`, as one step (for a driver that starts
        downloads in submit order); ``ticket``: the download's, with per-host limits."""
        try:
            task = self.prepare(url, filename, expected, stop)
        except FetchError as exc:
            if ticket is not None:
                ticket.finish()
            return self.refused(url, exc)
        task.ticket = ticket
        return (yield from self.steps(task))

    # -- the express lane (a driver's plain first attempt) ------------------------------

    def express(self, url: str) -> tuple[Task, PathLock | None] | DownloadResult:
        """Prepare ``url`` for a driver's express lane, on its loop thread.

        The express lane is the common case at the least cost: one GET, a 2xx answer
        with a plain body of up to :attr:`express_cap` bytes, written to a new file.
        The driver sends :meth:`express_request`, keeps the answer in memory, and
        gives it to :meth:`finish_express`; anything else (another answer, a failure,
        a bigger body) goes on through :meth:`steps`, with the answer the express lane
        received as its first attempt's (the driver replays it), so that every rule
        stays written once, there.

        Returns:
            The task with its final path locked and found free; the task with no lock
            where it must take :meth:`steps` from the start (the lock is busy, a file
            is there, the URL has user-info...); or the result of a URL refused.
        """
        try:
            # The name is looked at once, under its lock, rather than also before it:
            # where a file stands there, it is claimed again below, looking (on this
            # thread, where every claim of the driver's is made: no other sees the first).
            task = self.prepare(url, None, look=False)
        except FetchError as exc:
            return self.refused(url, exc)
        if not (task.cancel.is_set() or "@" in task.url or slow_to_create(task.directory)):
            lock = self._path_lock(task, task.path)
            try:
                locked = lock.acquire(blocking=False)
            except Exception:  # noqa: BLE001 - the steps meet it again (no lock file...), and say so
                locked = False
            if locked:
                path = task.path
                try:
                    plain = inspect_target(path).kind == "none" and not (
                        self.opts.overwrite == "error" and os.path.islink(path)
                    )
                except OSError:
                    plain = False
                if plain:
                    task.began = time.monotonic(), CLOCK.monotonic()
                    log.debug("GET %s", task.shown)
                    return task, lock
                lock.release()
        self.release_claims(task, None)
        try:
            task = self.prepare(url, None)
        except FetchError as exc:  # pragma: no cover - it passed a moment ago
            return self.refused(url, exc)
        return task, None

    def abandon(self, task: Task) -> None:
        """Release what a task prepared holds (its lock, its claims), for steps that
        never ran."""
        held, task.held = task.held, None
        if held is not None:
            held.release()
        self.release_claims(task, None)

    def express_request(self, task: Task) -> Request:
        """The request of ``task``'s express attempt: what :meth:`steps` sends first."""
        opts = self.opts
        return Request(
            task.url, self._express_headers, None, (), opts.timeout, task.shown, task.secrets
        )

    def express_limit(self) -> float:
        """How long an express attempt may take (what its first attempt's guard allows)."""
        return min(self.opts.deadline, self.opts.retry.budget)

    def express_length(self, status: int, headers: Mapping[str, str], shown: str) -> int:
        """Whether an answer may stay in the express lane, from its status and headers:
        its ``Content-Length``, :data:`NO_LENGTH` if it has none, or :data:`NOT_PLAIN`
        if it may not (not a 2xx, encoded, too big...)."""
        if not 200 <= status < 300 or status == 206:
            return NOT_PLAIN
        encoding = headers.get("Content-Encoding")
        if encoding is not None and encoding.strip().lower() not in ("", "identity"):
            return NOT_PLAIN
        try:
            length = content_length(headers, shown)
        except TransferError:
            return NOT_PLAIN
        if length is None:
            return NO_LENGTH
        return length if length <= self.express_cap else NOT_PLAIN

    def finish_express(
        self, task: Task, lock: PathLock, headers: Mapping[str, str], length: int, body: bytes
    ) -> DownloadResult | None:
        """Write ``task``'s express answer to its file and return the result.

        ``lock`` is the one :meth:`express` took; released here if this returns a result,
        else kept for :meth:`steps` (put it in :attr:`Task.held`).
        ``length``: what :meth:`express_length` said of the answer (not :data:`NOT_PLAIN`).

        Returns:
            The result (a failed one where the file cannot be written: that is not
            retried); or ``None`` where the answer is no plain success (a length that
            does not match, not an image...): the driver then goes on with
            :meth:`steps`, which finds out what it is and says so.
        """
        shown = task.shown
        size = len(body)
        if length not in (NO_LENGTH, size) or size > self.express_cap:
            return None
        if self.opts.verify == "image" and sniff_image(body[:SNIFF_BYTES]) is None:
            return None
        path = task.path
        began = task.began
        assert began is not None
        url = task.url
        # With the event the steps send once the body is written, before its commit.
        written = (
            partial(self._emit, url, size, None if length == NO_LENGTH else length, "progress")
            if body
            else None
        )
        try:
            recorded = store_whole(
                task.directory, lock.key, shown, body, path, task.origin, written
            )
        except StorageError as exc:
            lock.release()
            self.release_claims(task, None)
            result = self._failed(task, exc, 1, began[0])
            self._finish(result)
            return result
        lock.release()
        content_type = headers.get("Content-Type")
        # What release_claims does for the one name an express download claims (its own,
        # from the URL), without an Outcome to tell it.
        claims = self.claims
        claims.release(path, task.origin, keep=claims.remember or not recorded)
        task.claimed.clear()
        result = DownloadResult._downloaded(
            url, path, size, 1, time.monotonic() - began[0], content_type
        )
        self._finish(result)
        return result

    def run(self, task: Task) -> DownloadResult:
        """Download one prepared task on this thread; never raises for a failure."""
        return run(self.steps(task), self._transport)

    def steps(self, task: Task) -> Steps[DownloadResult]:
        """Download one prepared task, as steps (:mod:`fetchpool.steps`) for a driver.

        The step never raises for a failure: it ends with the result.
        """
        start = time.monotonic() if task.began is None else task.began[0]
        attempts = [0]
        outcome: Outcome | None = None
        try:
            outcome = yield from self._download(task, attempts)
            digests = outcome.digests
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
                sha256=None if digests is None else digests.get("sha256"),
                md5=None if digests is None else digests.get("md5"),
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
            self.release_claims(task, outcome)
            if task.ticket is not None:
                task.ticket.finish()
        self._finish(result)
        return result

    def release_claims(self, task: Task, outcome: Outcome | None) -> None:
        """End the task's name claims; the name of a finished file may be kept for good."""
        for path in task.claimed:
            mine = outcome is not None and (path is outcome.path or path == outcome.path)
            keep = task.caller_named or (
                mine and outcome is not None and (self.claims.remember or not outcome.recorded)
            )
            self.claims.release(path, task.origin, keep=keep)
        task.claimed.clear()

    def _failed(self, task: Task, error: FetchError, attempts: int, start: float) -> DownloadResult:
        log.info("failed: %s", error)
        return DownloadResult(
            url=task.url,
            path=None,
            status="failed",
            attempts=attempts,
            elapsed=time.monotonic() - start,
            error=error,
        )

    def _download(self, task: Task, attempts: list[int]) -> Steps[Outcome]:
        held, task.held = task.held, None
        if held is not None:
            try:
                # No cancel check here: the attempt makes it, and counts itself (it began).
                assert task.began is not None
                start = task.began[1]
                return (yield from self._with_retries(task, task.path, held.key, attempts, start))
            finally:
                held.release()
        if task.cancel.is_set():
            raise Cancelled
        # The retry budget counts waiting for the lock too, and an express attempt.
        start = CLOCK.monotonic() if task.began is None else task.began[1]
        self._ensure_dir(task)
        if self.opts.content_disposition and not task.caller_named:
            # The name may come with the headers: settle it inside the attempt.
            return (yield from self._with_retries(task, None, None, attempts, start))
        lock, path, early = yield from self._settle(task, task.path, idle=True)
        if early is not None:
            return early
        assert lock is not None
        try:
            return (yield from self._with_retries(task, path, lock.key, attempts, start))
        finally:
            lock.release()

    def _ensure_dir(self, task: Task) -> None:
        parent = task.directory
        if parent is self.dest or parent == self.dest:
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
            self.pins.add(directory)
        removed = sweep(directory)
        if removed:
            log.info("removed %d leftover temporary file(s) in %s", removed, directory)

    def _path_lock(self, task: Task, path: Path) -> PathLock:
        """The lock of ``path`` (in ``task``'s directory) for ``task``, not taken yet."""
        return PathLock(
            task.directory, lock_key(path), task.cancel, task.shown, timeout=self.opts.retry.budget
        )

    def _settle(
        self, task: Task, path: Path, idle: bool = False
    ) -> Steps[tuple[PathLock | None, Path, Outcome | None]]:
        """Lock ``path`` and decide: download into it, skip, fail, or take the derived name.

        ``idle``: no response is open (see :class:`~fetchpool.steps.Block`).
        Returns the held lock and the path to write, or no lock and the outcome.
        """
        shown = task.shown
        may_derive = not task.caller_named
        while True:
            lock = self._path_lock(task, path)
            if not lock.acquire(blocking=False):
                # Another writer has it: wait where waiting holds up no other download
                # (nor, with a rate, the next download of this host).
                if task.ticket is not None:
                    task.ticket.stand_aside()
                yield Block(lock.acquire, idle)
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
                    path = child_path(task.directory, derived_name(path.name, task.url))
                    self.claims.add(path, task.origin)
                    task.claimed.append(path)
                    may_derive = False
                    continue
                if found.kind == "file" and self.opts.overwrite == "skip":
                    digests: dict[Algorithm, str] | None = None
                    if task.expected is not None:
                        digests, why = yield from self._check_found(task, path, found.size, idle)
                        if why is not None:
                            # Not the file asked for: download it again, under this lock.
                            log.info("%s does not match, downloading it again: %s", path, why)
                            return lock, path, None
                    if self._partials:
                        self._remove_partial(path)
                    lock.release()
                    recorded = found.origin == task.origin
                    return (
                        None,
                        path,
                        Outcome("skipped", path, found.size, recorded=recorded, digests=digests),
                    )
                if self.opts.overwrite == "error" and (
                    found.kind == "file" or os.path.islink(path)
                ):
                    raise StorageError(f"{path} already exists (overwrite='error')", url=shown)
            except BaseException:
                lock.release()
                raise
            return lock, path, None

    def _check_found(
        self, task: Task, path: Path, size: int, idle: bool
    ) -> Steps[tuple[dict[Algorithm, str] | None, str | None]]:
        """Check the file found at ``path`` (``size`` bytes) against the expectations.

        The size first (it is known: no read), then the hashes (one read).

        Returns:
            (as the step's result) the hashes computed, if any, and why the file does
            not match, or ``None`` if it does.
        """
        expected = task.expected
        assert expected is not None
        error = expected.size_error(size, task.shown, "the file found has")
        if error is not None:
            return None, str(error)
        algorithms = expected.algorithms
        if not algorithms:
            return None, None
        read = partial(hash_file, path, algorithms, task.shown)
        # A big file is read where a driver's other downloads do not wait for it.
        digests: dict[Algorithm, str] = (
            (yield Block(read, idle)) if size > _HASH_INLINE_MAX else read()
        )
        error = expected.digest_error(digests, task.shown, "the file found has")
        return digests, None if error is None else str(error)

    def _remove_partial(self, path: Path) -> None:
        """Remove the partial file of ``path``, if any (its lock held): it is complete."""
        partial = partial_path(path)
        if partial is not None:
            with contextlib.suppress(OSError):
                os.unlink(partial)

    def _with_retries(
        self, task: Task, path: Path | None, key: str | None, attempts: list[int], start: float
    ) -> Steps[Outcome]:
        """Run the attempts into ``path`` (its :func:`lock_key` is ``key``, held), or
        into the name the headers give, with both ``None``.

        A body's bytes are kept between attempts (:class:`~fetchpool.resume.Kept`)
        where the path is known: a name from the headers is locked only during one.
        """
        kept: Kept | None = None
        try:
            if path is not None:
                assert key is not None
                kept = Kept(partial_path(path) if self._partials else None)
                if kept.partial is not None:
                    yield from self._adopt(task, key, kept)
            return (yield from self._attempts(task, path, key, attempts, start, kept))
        finally:
            if kept is not None:
                kept.finish(task.shown)

    def _adopt(self, task: Task, key: str, kept: Kept) -> Steps[None]:
        """Take the partial file an earlier run left for this URL into ``kept``, if any."""
        partial = kept.partial
        assert partial is not None
        record = read_partial(partial)
        if record is None:
            return
        if record.origin != task.origin or not 0 < record.size < record.total:
            log.info("%s is not a partial body of %s: starting over", partial, task.shown)
            return
        expected = task.expected
        digests = None if expected is None else expected.digests()
        tmp = TempFile(task.directory, key, task.shown, digests, partial)
        try:
            tmp.trim(record.size)
            if tmp.digests is not None:
                # The hashes must cover the bytes kept before the rest comes.
                if record.size > _HASH_INLINE_MAX:
                    yield Block(tmp.rehash)
                else:
                    tmp.rehash()
        except BaseException:
            tmp.keep()
            raise
        kept.start(tmp, record.validator, record.total)
        kept.recorded = True
        log.info(
            "resuming %s from %s at byte %d of %d", task.shown, partial, record.size, record.total
        )

    def _attempts(
        self,
        task: Task,
        path: Path | None,
        key: str | None,
        attempts: list[int],
        start: float,
        kept: Kept | None,
    ) -> Steps[Outcome]:
        policy = self.opts.retry
        # Most downloads succeed at once: the first attempt runs here, and the retry
        # machinery (its closures, its generator, tenacity) is set up once it failed.
        attempts[0] = 1
        try:
            began = task.began
            if began is None:
                time_left = policy.budget - (CLOCK.monotonic() - start)
                return (yield from self._attempt(task, path, key, time_left, kept))
            # Begun in the express lane: its limits count from then.
            return (yield from self._attempt(task, path, key, policy.budget, kept, began[0]))
        except Exception as exc:
            if policy.attempts <= 1 or not is_retryable(exc):
                raise
            failed = exc
        shown = task.shown

        def attempt(number: int, time_left: float) -> Steps[Outcome]:
            attempts[0] = number
            return self._attempt(task, path, key, time_left, kept)

        def before_retry(exc: BaseException, number: int, wait: float) -> None:
            log.info("retrying %s in %.1f s after attempt %d: %s", shown, wait, number, exc)
            self._emit(task.url, 0, None, "retrying")

        return (
            yield from retrying(
                policy,
                attempt,
                cancel=task.cancel,
                before_retry=before_retry,
                start=start,
                failed=failed,
            )
        )

    def _attempt(
        self,
        task: Task,
        path: Path | None,
        key: str | None,
        time_left: float,
        kept: Kept | None,
        began: float | None = None,
    ) -> Steps[Outcome]:
        """One attempt, with ``time_left`` of the retry budget; ``began``: when it began
        (``time.monotonic()``), if before now (in the express lane)."""
        shown = task.shown
        if task.cancel.is_set():
            raise Cancelled
        ticket = task.ticket
        if ticket is not None and time_left > 0:
            # The host's turn is waited for outside the attempt's deadline (a busy host
            # delays the request, it does not fail it), but within the retry budget.
            waited = CLOCK.monotonic()
            yield Admit(ticket, ticket.key, task.cancel)
            time_left -= CLOCK.monotonic() - waited
        if time_left <= 0:
            raise TransferError(f"retry budget used up for {shown}", url=shown, retryable=False)
        limit = "deadline" if self.opts.deadline <= time_left else "retry budget"
        headers = self.opts.headers
        offset = 0 if kept is None else kept.offset
        if offset:
            assert kept is not None
            assert kept.validator is not None
            headers = range_headers(headers, offset, kept.validator)
        with self._watchdog.guard(min(self.opts.deadline, time_left), limit, began) as guard:
            if task.stop is not None:
                task.stop.watch(guard)
            if began is None:  # else logged when the express lane sent it
                log.debug("GET %s%s", shown, f" from byte {offset}" if offset else "")
            try:
                reply = yield from open_response(
                    task.url,
                    headers=headers,
                    timeout=self.opts.timeout,
                    allow_downgrade=self.opts.allow_downgrade,
                    guard=guard,
                    secrets=task.secrets,
                    shown=shown,
                    ticket=ticket,
                    cancel=task.cancel,
                )
            except HTTPStatusError as exc:
                if not offset or exc.status_code != 416:
                    raise
                assert kept is not None
                kept.drop()
                raise TransferError(
                    f"cannot resume {shown} at byte {offset}: the server answered "
                    f"416 Range Not Satisfiable; starting over",
                    url=shown,
                ) from exc
            try:
                lock: PathLock | None = None
                if path is None:
                    # Content-Disposition names arrive with the headers: settle the
                    # name (and skip) now, before any of the body is read.
                    lock, path, early = yield from self._settle(
                        task, self._disposition_path(task, reply)
                    )
                    if early is not None:
                        return early
                    assert lock is not None
                    key = lock.key
                assert key is not None
                try:
                    return (yield from self._receive(task, path, key, reply, guard, kept, offset))
                finally:
                    if lock is not None:
                        lock.release()
            finally:
                reply.close()

    def _disposition_path(self, task: Task, reply: Reply) -> Path:
        name = name_from_content_disposition(reply.headers.get("Content-Disposition"))
        if name is None or name == task.path.name:
            return task.path
        path = self.claims.url_name(self.dest, name, task.url, task.origin)
        task.claimed.append(path)
        return path

    def _receive(
        self,
        task: Task,
        path: Path,
        key: str,
        reply: Reply,
        guard: Guard,
        kept: Kept | None,
        offset: int,
    ) -> Steps[Outcome]:
        shown = task.shown
        content_type = reply.headers.get("Content-Type")
        if reply.status == 206:
            if not offset:
                raise TransferError(
                    f"{shown} answered 206 Partial Content to a request for the whole body",
                    url=shown,
                )
            assert kept is not None
            assert kept.total is not None
            try:
                check_partial_reply(reply.headers, offset, kept.total, shown)
            except TransferError:
                kept.drop()
                raise
            body = Body(
                reply,
                shown,
                self.opts.max_bytes,
                guard,
                task.expected,
                offset=offset,
                total=kept.total,
            )
            log.info("resuming %s at byte %d of %d", shown, offset, kept.total)
            kept.resumed = True
            return (yield from self._write(task, path, key, b"", body, content_type, kept))
        if offset:
            # The validator changed, or the server ignores Range: the whole body again.
            log.info("%s came whole again: starting over from its first byte", shown)
        body = Body(reply, shown, self.opts.max_bytes, guard, task.expected)
        head = b""
        while len(head) < SNIFF_BYTES:
            chunk = yield from body.read()
            if not chunk:
                break
            # Usually the first chunk is enough: keep it as it is rather than copy it.
            head = head + chunk if head else chunk
        if self.opts.verify == "image" and sniff_image(head[:SNIFF_BYTES]) is None:
            what = content_type or "no Content-Type"
            raise NotAnImageError(
                f"{shown} is not an image ({what}, starts with {head[:16]!r})", url=shown
            )
        return (yield from self._write(task, path, key, head, body, content_type, kept))

    def _new_file(self, task: Task, key: str, body: Body, kept: Kept | None) -> Steps[TempFile]:
        """The file for a body from its first byte: a temporary file, or the partial
        file (emptied, recording what it will hold); ``kept`` holds it from then on."""
        tmp = None if kept is None else kept.tmp
        if tmp is None:
            expected = task.expected
            digests = None if expected is None else expected.digests()
            directory = task.directory
            make = partial(
                TempFile,
                directory,
                key,
                task.shown,
                digests,
                None if kept is None else kept.partial,
            )
            if slow_to_create(directory):
                # Where creating a file takes long, a driver that runs many downloads on
                # one thread has it done on another, and goes on with the others meanwhile.
                tmp = yield Block(make)
            else:
                tmp = make()
            assert tmp is not None
            if kept is None:
                return tmp
        assert kept is not None
        # An encoded body has no size announced (Body.total): it is never resumed.
        validator = None if body.total is None else validator_of(body.reply.headers)
        kept.start(tmp, validator, body.total)  # from here on, kept disposes of it
        if tmp.persistent or tmp.size:
            # Bytes of an earlier attempt, or a partial file another URL's or a body
            # whose validator changed: this body starts over from its first byte.
            tmp.restart()
        if tmp.persistent:
            kept.recorded = tmp.record(task.origin, validator, body.total)
        return tmp

    def _write(
        self,
        task: Task,
        path: Path,
        key: str,
        head: bytes,
        body: Body,
        content_type: str | None,
        kept: Kept | None,
    ) -> Steps[Outcome]:
        # ``key``: the held lock's, computed once (a SHA-256 of the name).
        expected = task.expected
        if body.offset:
            assert kept is not None
            tmp = kept.tmp
            assert tmp is not None
        else:
            tmp = yield from self._new_file(task, key, body, kept)
        url = task.url
        try:
            if head:
                tmp.write(head)
                self._emit(url, tmp.size, body.total, "progress")
            # A big plain-HTTP body goes socket to file by splice(2); reading then only
            # ends it (or reads all of the rest where it cannot be spliced).
            if body.may_splice():
                yield from body.splice_into(
                    tmp, lambda: self._emit(url, tmp.size, body.total, "progress")
                )
            reported = tmp.size
            while chunk := (yield from body.read()):
                tmp.write(chunk)
                # An event per MiB or so, not per read: a backend may give small blocks.
                if tmp.size - reported >= SPLICE_BLOCK:
                    reported = tmp.size
                    self._emit(url, reported, body.total, "progress")
            if tmp.size != reported:
                self._emit(url, tmp.size, body.total, "progress")
            hashes = None
            if expected is not None:
                hashes = self._check_body(task, expected, tmp)
            commit = partial(tmp.commit, path, task.origin, self.opts.fsync)
            # Flushing to disk may take long: not on a thread that other downloads share.
            recorded: bool = (yield Block(commit)) if self.opts.fsync else commit()
        except BaseException as exc:
            if kept is None:
                tmp.discard()
            else:
                kept.settle(exc)
            raise
        return Outcome("downloaded", path, tmp.size, content_type, recorded, hashes)

    def _check_body(
        self, task: Task, expected: Expected, tmp: TempFile
    ) -> dict[Algorithm, str] | None:
        """Check the whole body in ``tmp`` against the expectations; return its hashes.

        Raises:
            ChecksumError: the size or a hash differs (retried: a transfer can heal).
        """
        # Longer was stopped as it came; shorter shows only now (no Content-Length).
        error = expected.size_error(tmp.size, task.shown, "got")
        if error is not None:
            raise error
        if tmp.digests is None:
            return None
        found = tmp.digests.hexdigests()
        error = expected.digest_error(found, task.shown, "got")
        if error is not None:
            raise error
        return found

    def _finish(self, result: DownloadResult) -> None:
        self._emit(result.url, result.bytes, None, "done" if result.ok else "failed")
