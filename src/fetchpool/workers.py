"""The requests backend's runner: worker threads that wait for the network, nothing else.

A worker drives a download's steps (:mod:`fetchpool.steps`) and performs its sends and
reads itself, blocking, as requests does. Every other wait parks the download instead,
and the worker takes up the next one:

- a retry's wait (backoff or ``Retry-After``) and a host's turn (per-host limits) are
  timers, kept by one timer thread that lives while there is something to wake;
- a call that may block for long with no response open (a lock another writer holds, a
  big file found hashed) goes to a helper thread. One with a response open (creating
  the temporary file, an fsync) stays on the worker: another download there would make
  one transfer more than ``workers``.

A download whose wait is over goes before every download not yet started. At most
:data:`IN_PROGRESS` times ``workers`` downloads are under way at once (in flight,
parked, or in a helper), and there are as many helper threads as that may need, so a
helper is always there for a download whose lock another parked download holds.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any, TypeVar

from .backends import Transport, on_done
from .hosts import HostLimits, Ticket
from .retry import CLOCK
from .steps import Admit, Block, Sleep, Steps, perform
from .storage import Cancelled

__all__ = ["IN_PROGRESS", "Workers"]

T = TypeVar("T")

#: Downloads under way at once, per worker.
IN_PROGRESS = 8
#: How often a download waiting for a slot on a busy host asks again (seconds).
_SLOT_POLL = 0.05


class _Run:
    """A started download: its steps, its future, and the Admit it may wait on."""

    __slots__ = ("future", "parked", "steps")

    def __init__(self, steps: Steps[Any], future: Future[Any]) -> None:
        self.steps = steps
        self.future = future
        self.parked: Admit | None = None


# What a worker takes up: a new download (its future, its steps' maker, its ticket), or a
# run to resume with a value or an error.
_New = tuple[Future[Any], Callable[[], Steps[Any]], Ticket | None]
_Resume = tuple[_Run, Any, BaseException | None]


class Workers:
    """Runs downloads' steps on ``workers`` threads (see the module's docstring).

    Args:
        workers: the number of worker threads (and of transfers in flight).
        transport: what performs the sends and reads.
        hosts: the per-host limits, or ``None``.
    """

    def __init__(
        self, workers: int, transport: Transport, hosts: HostLimits[Any] | None = None
    ) -> None:
        self._workers = workers
        self._transport = transport
        self._hosts = hosts
        self._cap = IN_PROGRESS * workers
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="fetchpool")
        self._helpers: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._timers_changed = threading.Condition(self._lock)
        self._resumed: deque[_Resume] = deque()
        self._new: deque[_New] = deque()
        self._busy = 0  # workers driving downloads
        self._started = 0  # downloads under way
        # Parked downloads: (when, number, run, cancel); the timer thread, while any are.
        self._timers: list[tuple[float, int, _Run | None, threading.Event | None]] = []
        self._seq = itertools.count()
        self._timer_thread: threading.Thread | None = None
        self._rouse = False
        # The futures not done yet: shutdown(wait=True) waits for them, not by joining
        # the threads. A join that a Ctrl-C interrupted may later return at once while
        # its thread still runs (CPython up to 3.12), and close() waits again after one.
        self._unfinished: set[Future[Any]] = set()
        self._refusing = False  # shut down: no new downloads

    # -- the Runner protocol ---------------------------------------------------------------

    def submit(self, start: Callable[[], Steps[T]], ticket: Ticket | None = None) -> Future[T]:
        """Queue a download; the future gets what its steps end with.

        Raises:
            RuntimeError: shut down.
        """
        future: Future[T] = Future()
        with self._lock:
            if self._refusing:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if ticket is not None and self._hosts is not None:
                self._hosts.push((future, start, ticket), ticket)
            else:
                self._new.append((future, start, None))
            self._unfinished.add(future)
        on_done(future, self._finished)
        self._pump()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking downloads; cancel those not started; wait for the rest."""
        with self._lock:
            self._refusing = True
            queued: list[_New] = []
            if cancel_futures:
                queued = list(self._new)
                self._new.clear()
                if self._hosts is not None:
                    queued += self._hosts.drain()
        for future, _, _ in queued:
            future.cancel()
        if not wait:
            return
        with self._lock:
            unfinished = list(self._unfinished)  # none is added once shut down
        futures_wait(unfinished)
        self._executor.shutdown(wait=True)
        if self._helpers is not None:
            self._helpers.shutdown(wait=True)

    def wake(self) -> None:
        """End the waits whose cancel event is set (the Downloader is cancelling)."""
        with self._lock:
            self._rouse = True
            self._timers_changed.notify_all()

    def _finished(self, future: Future[Any]) -> None:
        with self._lock:
            self._unfinished.discard(future)

    # -- handing work to workers -------------------------------------------------------------

    def _take(self) -> _New | _Resume | None:
        """The next thing to do, a resumed download first (with ``_lock`` held)."""
        if self._resumed:
            return self._resumed.popleft()
        if self._started >= self._cap:
            return None
        item: _New | None = None
        if self._new:
            item = self._new.popleft()
        elif self._hosts is not None:
            item = self._hosts.pop()
        if item is not None:
            self._started += 1
        return item

    def _pump(self) -> None:
        """Give waiting work to idle workers."""
        while True:
            with self._lock:
                if self._busy >= self._workers:
                    return
                item = self._take()
                if item is None:
                    break
                self._busy += 1
            try:
                self._executor.submit(self._work, item)
            except RuntimeError:
                # The executor is gone (interpreter exit): this thread does the work.
                with self._lock:
                    self._busy -= 1
                self._do(item)
        if self._hosts is not None:
            self._wake_at(self._hosts.next_check(), None, None)

    def _work(self, item: _New | _Resume | None) -> None:
        # A worker done with one download takes the next itself: no hand-off between two.
        while item is not None:
            self._do(item)
            with self._lock:
                item = self._take()
                if item is None:
                    self._busy -= 1
            self._pump()

    def _do(self, item: _New | _Resume) -> None:
        if isinstance(item[0], Future):
            future, start, ticket = item
            if not future.set_running_or_notify_cancel():
                if ticket is not None:
                    ticket.finish()
                self._ended()
                return
            self._step(_Run(start(), future), None, None)
        else:
            run, value, error = item
            if run.parked is not None:
                self._readmit(run)
            else:
                self._step(run, value, error)

    def _ended(self) -> None:
        with self._lock:
            self._started -= 1

    def _resume(self, run: _Run, value: Any, error: BaseException | None) -> None:
        with self._lock:
            self._resumed.append((run, value, error))
        self._pump()

    # -- driving a download ------------------------------------------------------------------

    def _step(self, run: _Run, value: Any, error: BaseException | None) -> None:
        """Resume ``run`` and perform its steps until it ends or must wait."""
        steps = run.steps
        transport = self._transport
        while True:
            try:
                effect = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as stop:
                self._ended()
                run.future.set_result(stop.value)
                return
            except BaseException as exc:  # noqa: BLE001 - the steps' own failure: its future's
                self._ended()
                run.future.set_exception(exc)
                return
            value, error = None, None
            if isinstance(effect, Sleep):
                if CLOCK.record is None and effect.seconds > 0:
                    self._wake_at(time.monotonic() + effect.seconds, run, effect.cancel)
                    return
            elif isinstance(effect, Admit):
                delay = effect.ticket.admit(effect.key)
                if delay:
                    if effect.cancel.is_set():
                        error = Cancelled()
                        continue
                    run.parked = effect
                    self._wake_at(time.monotonic() + min(delay, _SLOT_POLL), run, effect.cancel)
                    return
                continue
            elif isinstance(effect, Block) and effect.idle:
                # With a response open, the call is this worker's: another download on
                # it would be one transfer more than workers.
                self._block(run, effect.call)
                return
            try:
                value = perform(effect, transport)
            except BaseException as exc:  # noqa: BLE001 - thrown into the steps, which decide
                error = exc

    def _readmit(self, run: _Run) -> None:
        """Ask again for the host's turn ``run`` waits for; go on with it if given."""
        effect = run.parked
        assert effect is not None
        if effect.cancel.is_set():
            run.parked = None
            self._step(run, None, Cancelled())
            return
        delay = effect.ticket.admit(effect.key)
        if delay:
            self._wake_at(time.monotonic() + min(delay, _SLOT_POLL), run, effect.cancel)
            return
        run.parked = None
        self._step(run, None, None)

    def _block(self, run: _Run, call: Callable[[], Any]) -> None:
        with self._lock:
            if self._helpers is None:
                # One for every download that may be under way: a download waiting for a
                # lock that another, parked, holds never leaves that one without a thread
                # for its own blocking call.
                self._helpers = ThreadPoolExecutor(self._cap, thread_name_prefix="fetchpool-wait")
            helpers = self._helpers

        def unblocked(done: Future[Any]) -> None:
            error = done.exception()
            self._resume(run, None if error is not None else done.result(), error)

        try:
            future = helpers.submit(call)
        except RuntimeError:  # shut down (interpreter exit): call it here
            try:
                value = call()
            except BaseException as exc:  # noqa: BLE001 - thrown into the steps
                self._step(run, None, exc)
            else:
                self._step(run, value, None)
            return
        future.add_done_callback(unblocked)

    # -- timers ------------------------------------------------------------------------------

    def _wake_at(self, when: float, run: _Run | None, cancel: threading.Event | None) -> None:
        """Resume ``run`` at ``when`` (or once ``cancel`` is set); no run: pump then."""
        if when == float("inf"):
            return
        with self._lock:
            if run is None and any(entry[2] is None for entry in self._timers):
                return  # a pump is due already
            heapq.heappush(
                self._timers,
                (when, next(self._seq), run, cancel),
            )
            self._timers_changed.notify_all()
            if self._timer_thread is not None:
                return
            # Not a daemon: downloads parked at interpreter exit still end, as a thread
            # pool's queued work does. It ends when nothing is parked.
            thread = self._timer_thread = threading.Thread(
                target=self._keep_time, name="fetchpool-timer"
            )
        thread.start()

    def _keep_time(self) -> None:
        while True:
            due: list[_Run | None] = []
            with self._lock:
                while True:
                    timers = self._timers
                    if not timers:
                        self._timer_thread = None
                        return
                    now = time.monotonic()
                    if self._rouse:
                        self._rouse = False
                        kept = [e for e in timers if e[3] is None or not e[3].is_set()]
                        due += [e[2] for e in timers if e[3] is not None and e[3].is_set()]
                        heapq.heapify(kept)
                        self._timers = timers = kept
                    while timers and timers[0][0] <= now:
                        due.append(heapq.heappop(timers)[2])
                    if due:
                        break
                    if timers:
                        self._timers_changed.wait(timers[0][0] - now)
            for run in due:
                if run is None:
                    self._pump()
                else:
                    self._resume(run, None, None)
