"""Resumable steps: the pipeline asks its driver to do what would block.

The per-URL pipeline (:mod:`fetchpool.pipeline`, :mod:`fetchpool.transfer`) is written
as generators that ``yield`` an effect wherever they would wait: send a request, read
body bytes, move a body into a file, sleep before a retry, wait for a host's turn
(per-host limits), or call something that may
block for long (a lock another writer holds, an fsync). The effect's result is sent
back in; its failure is thrown in at the ``yield``.

Two drivers run the same steps. :func:`run` performs each effect on the calling thread
(the requests backend's worker threads: one download per thread). A backend with an
event loop (the curl backend) performs them without a thread per download: a step
waiting on the network costs no thread, and a retry's wait holds no worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from .storage import Cancelled

if TYPE_CHECKING:
    from .backends import Reply, Request, SpliceSink, Transport
    from .deadline import Guard
    from .hosts import Ticket

__all__ = ["Admit", "Block", "Effect", "Read", "Send", "Sleep", "Splice", "Steps", "perform", "run"]

T = TypeVar("T")


class Send(NamedTuple):
    """Send one request; the result is the :class:`~fetchpool.backends.Reply`."""

    request: Request
    guard: Guard


class Read(NamedTuple):
    """Read up to ``size`` body bytes as sent; the result is ``b""`` at the end."""

    reply: Reply
    size: int


class Splice(NamedTuple):
    """Move ``length`` body bytes into ``sink``; the result says whether it was done.

    A driver that cannot splice answers ``False`` at once: :class:`Read` then does it.
    """

    reply: Reply
    sink: SpliceSink
    length: int
    moved: Callable[[int], None]


class Sleep(NamedTuple):
    """Wait ``seconds`` (a retry's backoff), less if ``cancel`` is set meanwhile."""

    seconds: float
    cancel: threading.Event


class Admit(NamedTuple):
    """Wait until the per-host limits let a request to ``key`` go (:mod:`fetchpool.hosts`).

    The result is ``None``; a set ``cancel`` ends the wait with
    :class:`~fetchpool.storage.Cancelled`.
    """

    ticket: Ticket
    key: str
    cancel: threading.Event


class Block(NamedTuple):
    """Call ``call()``, which may block for long; the result is what it returns.

    ``idle``: the download has no transfer open meanwhile, so a driver that gives each
    transfer a thread may give that thread to another download while the call runs.
    """

    call: Callable[[], Any]
    idle: bool = False


Effect = Send | Read | Splice | Sleep | Admit | Block
#: A resumable step that ends with a ``T``.
Steps = Generator[Effect, Any, T]


def perform(effect: Effect, transport: Transport | None) -> Any:
    """Do one effect on this thread, blocking until it is done.

    Raises:
        Whatever the effect raises (a :class:`~fetchpool.errors.FetchError` above all).
    """
    if isinstance(effect, Read):
        return effect.reply.read(effect.size)
    if isinstance(effect, Send):
        assert transport is not None
        return transport.send(effect.request, effect.guard)
    if isinstance(effect, Splice):
        return effect.reply.splice(effect.sink, effect.length, effect.moved)
    if isinstance(effect, Sleep):
        from .retry import CLOCK  # noqa: PLC0415 - retry imports this module

        CLOCK.sleep(effect.seconds, effect.cancel)
        return None
    if isinstance(effect, Admit):
        if not effect.ticket.wait(effect.key, effect.cancel.is_set):
            raise Cancelled
        return None
    return effect.call()


def run(
    steps: Steps[T],
    transport: Transport | None = None,
    value: Any = None,
    error: BaseException | None = None,
) -> T:
    """Drive ``steps`` to its end on this thread and return what it returns.

    Args:
        steps: the generator to run (fresh, or parked at a ``yield``).
        transport: what performs :class:`Send` (and whose replies :class:`Read` reads).
        value, error: what to resume a parked generator with.

    Raises:
        Whatever ``steps`` raises.
    """
    while True:
        try:
            effect = steps.send(value) if error is None else steps.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        error = None
        try:
            value = perform(effect, transport)
        except BaseException as exc:  # noqa: BLE001 - thrown into the step, which decides
            value, error = None, exc
