"""The optional progress bar behind ``progress=True`` (needs ``tqdm``)."""

from __future__ import annotations

import sys

from .results import ProgressEvent

__all__ = ["TqdmBar"]


class TqdmBar:
    """A tqdm bar on stderr: files finished of files started, bytes, failures.

    Raises:
        ImportError: tqdm is not installed (``pip install 'fetchpool[progress]'``).
    """

    def __init__(self) -> None:
        try:
            from tqdm import tqdm  # noqa: PLC0415 - optional dependency
        except ImportError as exc:
            raise ImportError(
                "progress=True needs tqdm: pip install 'fetchpool[progress]'"
            ) from exc
        self._bar = tqdm(total=0, unit="file", file=sys.stderr, dynamic_ncols=True, leave=True)
        self._inflight: dict[str, int] = {}
        self._bytes = 0
        self._failed = 0

    def __call__(self, event: ProgressEvent) -> None:
        """Take one event (calls are serialised by the Downloader)."""
        if event.state == "started":
            self._bar.total = (self._bar.total or 0) + 1
            self._bar.refresh()
            return
        if event.state == "progress":
            before = self._inflight.get(event.url, 0)
            self._inflight[event.url] = event.bytes
            self._bytes += max(0, event.bytes - before)
        elif event.state == "retrying":
            self._bytes -= self._inflight.pop(event.url, 0)
        else:
            self._inflight.pop(event.url, None)
            if event.state == "failed":
                self._failed += 1
            self._bar.update(1)
        self._bar.set_postfix_str(
            f"{self._bytes / 1e6:.1f} MB, {self._failed} failed", refresh=False
        )

    def close(self) -> None:
        """Close the bar."""
        self._bar.close()
