"""Progress events: their delivery to a callback, and the optional bar (needs ``tqdm``)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from .naming import shown_input
from .results import ProgressEvent, ProgressState
from .results import _human_bytes as human_bytes

__all__ = ["Emitter", "TqdmBar"]

log = logging.getLogger("fetchpool")

#: The least time between two redraws caused by bytes arriving (files finishing redraw
#: through tqdm's own ``mininterval``).
_REDRAW_INTERVAL = 0.2


def _terminal_width(file: TextIO) -> int | None:
    """The width of the terminal ``file`` draws on, or ``None`` if it is no terminal."""
    try:
        return os.get_terminal_size(file.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return None


class TqdmBar:
    """A tqdm bar: files finished (of the total, when known), bytes, byte rate, failures.

    Args:
        total: the number of files expected, if known. Without it the total is the number
            of files started so far (what ``progress=True`` shows), unless ``open_ended``.
        open_ended: with no ``total``, show no total at all (a stream of unknown length)
            until :meth:`set_total` gives one.
        file: where to draw; ``sys.stderr`` by default.

    Raises:
        ImportError: tqdm is not installed (``pip install 'fetchpool[progress]'``).
    """

    def __init__(
        self, total: int | None = None, *, open_ended: bool = False, file: TextIO | None = None
    ) -> None:
        try:
            from tqdm import tqdm  # noqa: PLC0415 - optional dependency
        except ImportError as exc:
            raise ImportError(
                "a progress bar needs tqdm: pip install 'fetchpool[progress]'"
            ) from exc
        self._grow = total is None and not open_ended
        out = sys.stderr if file is None else file
        # A terminal that reports no size (some pseudo-terminals) would get an empty or
        # hidden bar from tqdm: draw on 80 columns and 24 rows there instead.
        fixed = 80 if _terminal_width(out) == 0 else None
        self._bar = tqdm(
            total=0 if self._grow else total,
            unit="file",
            file=out,
            ncols=fixed,
            nrows=None if fixed is None else 24,
            dynamic_ncols=fixed is None,
            leave=True,
        )
        self._lock = threading.Lock()
        self._inflight: dict[str, int] = {}
        self._bytes = 0
        self._failed = 0
        self._start = time.monotonic()
        self._drawn = self._start

    def __call__(self, event: ProgressEvent) -> None:
        """Take one event (the Downloader serialises calls; :meth:`set_total` may race)."""
        with self._lock:
            self._take(event)

    def _take(self, event: ProgressEvent) -> None:
        if event.state == "started":
            if self._grow:
                self._bar.total = (self._bar.total or 0) + 1
                self._bar.refresh()
            return
        redraw = False
        if event.state == "progress":
            before = self._inflight.get(event.url, 0)
            self._inflight[event.url] = event.bytes
            self._bytes += max(0, event.bytes - before)
            now = time.monotonic()
            redraw = now - self._drawn >= _REDRAW_INTERVAL
        elif event.state == "retrying":
            self._bytes -= self._inflight.pop(event.url, 0)
        else:
            self._inflight.pop(event.url, None)
            if event.state == "failed":
                self._failed += 1
            self._bar.update(1)
        self._bar.set_postfix_str(self._postfix(), refresh=False)
        if redraw:
            self._redraw()

    def _postfix(self) -> str:
        elapsed = time.monotonic() - self._start
        rate = self._bytes / elapsed if elapsed > 0 else 0.0
        return f"{human_bytes(self._bytes)}, {human_bytes(int(rate))}/s, {self._failed} failed"

    def _redraw(self) -> None:
        self._drawn = time.monotonic()
        self._bar.refresh()

    def set_total(self, total: int) -> None:
        """Fix the total number of files, once it is known (it stops following starts)."""
        with self._lock:
            self._grow = False
            self._bar.total = total
            self._redraw()

    def close(self) -> None:
        """Draw the final state and close the bar."""
        with self._lock:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.close()


class Emitter:
    """Delivers progress events to the caller's ``progress`` option, one call at a time.

    Args:
        progress: ``True`` for a :class:`TqdmBar`, a callable taking
            :class:`ProgressEvent`, or ``None``/``False`` for no events at all.

    Raises:
        ImportError: ``progress=True`` without tqdm.
    """

    def __init__(self, progress: bool | Callable[[ProgressEvent], object] | None) -> None:
        self.bar: TqdmBar | None = None
        self._callback: Callable[[ProgressEvent], object] | None = None
        if progress is True:
            self.bar = TqdmBar()
            self._callback = self.bar
        elif callable(progress):
            self._callback = progress
        # Reentrant: a callback may call submit(), which emits "started".
        self._lock = threading.RLock()

    def __call__(self, url: object, nbytes: int, total: int | None, state: ProgressState) -> None:
        """Send one event; a callback that raises is logged and ignored."""
        callback = self._callback
        if callback is None:
            return
        event = ProgressEvent(url=shown_input(url), bytes=nbytes, total=total, state=state)
        with self._lock:
            try:
                callback(event)
            except Exception:
                log.exception("progress callback raised; ignored")

    def close(self) -> None:
        """Close the bar, if there is one."""
        if self.bar is not None:
            self.bar.close()
