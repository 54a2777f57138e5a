"""Result types: one :class:`DownloadResult` per input URL, collected in :class:`Results`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

from .errors import FetchError
from .naming import redact_url

__all__ = ["DownloadResult", "ProgressEvent", "Results", "Status", "Summary"]

Status = Literal["downloaded", "skipped", "failed"]
ProgressState = Literal["started", "progress", "retrying", "done", "failed"]


def _repr_fields(obj: object, names: tuple[str, ...]) -> str:
    # Reprs end up in logs: show URLs without their user-info (DESIGN rule 9).
    parts = []
    for name in names:
        value = getattr(obj, name)
        if name == "url" and isinstance(value, str):
            value = redact_url(value)
        parts.append(f"{name}={value!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"


@dataclass(frozen=True, repr=False)
class DownloadResult:
    """The outcome of one URL.

    Attributes:
        url: the URL as the caller gave it.
        path: the final path of the file, or ``None`` if there is none.
        status: ``"downloaded"``, ``"skipped"`` (a file was already there) or ``"failed"``.
        bytes: bytes written (for a skipped file: the size of the file found).
        attempts: HTTP attempts made (0 for a skipped file or a URL refused up front).
        elapsed: seconds spent on this URL.
        content_type: the response's ``Content-Type``, if a response arrived.
        error: the :class:`FetchError` of a failed result, else ``None``.
        sha256, md5: the hex digest computed, when that hash was expected (an
            :class:`~fetchpool.Item` with ``sha256=`` or ``md5=``): of the body
            downloaded, or of the file found for a skipped result; else ``None``.
    """

    url: str
    path: Path | None
    status: Status
    bytes: int = 0
    attempts: int = 0
    elapsed: float = 0.0
    content_type: str | None = None
    error: FetchError | None = None
    sha256: str | None = None
    md5: str | None = None

    @property
    def ok(self) -> bool:
        """True unless the download failed."""
        return self.status != "failed"

    def __repr__(self) -> str:
        names = ("url", "path", "status", "bytes", "attempts", "elapsed", "content_type", "error")
        # The hashes only where computed: most results have none.
        hashes = tuple(name for name in ("sha256", "md5") if getattr(self, name) is not None)
        return _repr_fields(self, names + hashes)

    @classmethod
    def _downloaded(
        cls,
        url: str,
        path: Path,
        nbytes: int,
        attempts: int,
        elapsed: float,
        content_type: str | None,
    ) -> DownloadResult:
        """A ``"downloaded"`` result with no hashes, made at less cost than by ``__init__``
        (a frozen dataclass's sets each field through ``object.__setattr__``): one is made
        per file."""
        result = object.__new__(cls)
        result.__dict__.update(
            url=url,
            path=path,
            status="downloaded",
            bytes=nbytes,
            attempts=attempts,
            elapsed=elapsed,
            content_type=content_type,
            error=None,
            sha256=None,
            md5=None,
        )
        return result

    def raise_for_error(self) -> None:
        """Raise the result's error if it failed.

        Raises:
            FetchError: the error of a failed result.
        """
        if self.error is not None:
            raise self.error


@dataclass(frozen=True, repr=False)
class ProgressEvent:
    """One progress notification for the ``progress`` callback.

    Every URL gets ``"started"`` and then ``"done"`` or ``"failed"``; in between,
    ``"progress"`` after each chunk written and ``"retrying"`` before a retry.

    Attributes:
        url: the URL as the caller gave it.
        bytes: bytes received so far in the current attempt.
        total: the expected size (``Content-Length``), or ``None``.
        state: ``"started"``, ``"progress"``, ``"retrying"``, ``"done"`` or ``"failed"``.
    """

    url: str
    bytes: int
    total: int | None
    state: ProgressState

    def __repr__(self) -> str:
        return _repr_fields(self, ("url", "bytes", "total", "state"))


class Summary(str):
    """A one-line human summary of a batch that also exposes its figures as attributes.

    It is a ``str`` so that ``print(results.summary())`` reads well; the numbers are on
    ``total``, ``downloaded``, ``skipped``, ``failed``, ``bytes`` (downloaded bytes only),
    ``elapsed`` (seconds) and ``throughput`` (downloaded bytes per second).
    """

    total: int
    downloaded: int
    skipped: int
    failed: int
    bytes: int
    elapsed: float
    throughput: float

    def __new__(
        cls,
        *,
        total: int,
        downloaded: int,
        skipped: int,
        failed: int,
        nbytes: int,
        elapsed: float,
    ) -> Summary:
        throughput = nbytes / elapsed if elapsed > 0 else 0.0
        urls = "1 URL" if total == 1 else f"{total} URLs"
        text = (
            f"{urls}: {downloaded} downloaded, {skipped} skipped, {failed} failed; "
            f"{_human_bytes(nbytes)} in {elapsed:.2f} s ({_human_bytes(int(throughput))}/s)"
        )
        self = super().__new__(cls, text)
        self.total = total
        self.downloaded = downloaded
        self.skipped = skipped
        self.failed = failed
        self.bytes = nbytes
        self.elapsed = elapsed
        self.throughput = throughput
        return self

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_summary,
            (self.total, self.downloaded, self.skipped, self.failed, self.bytes, self.elapsed),
        )


def _rebuild_summary(
    total: int, downloaded: int, skipped: int, failed: int, nbytes: int, elapsed: float
) -> Summary:
    return Summary(
        total=total,
        downloaded=downloaded,
        skipped=skipped,
        failed=failed,
        nbytes=nbytes,
        elapsed=elapsed,
    )


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


class Results(Sequence[DownloadResult]):
    """A read-only sequence of :class:`DownloadResult`, one per input item, in input order.

    Attributes:
        elapsed: wall-clock seconds the whole batch took.
    """

    __slots__ = ("_items", "elapsed")

    def __init__(self, items: Iterable[DownloadResult], elapsed: float | None = None) -> None:
        self._items: tuple[DownloadResult, ...] = tuple(items)
        self.elapsed: float = (
            elapsed if elapsed is not None else sum(r.elapsed for r in self._items)
        )

    @overload
    def __getitem__(self, index: int) -> DownloadResult: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[DownloadResult]: ...
    def __getitem__(self, index: int | slice) -> DownloadResult | Sequence[DownloadResult]:
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[DownloadResult]:
        return iter(self._items)

    def __repr__(self) -> str:
        return f"<Results {self.summary()}>"

    @property
    def succeeded(self) -> list[DownloadResult]:
        """Results with status ``"downloaded"``, in input order."""
        return [r for r in self._items if r.status == "downloaded"]

    @property
    def skipped(self) -> list[DownloadResult]:
        """Results with status ``"skipped"``, in input order."""
        return [r for r in self._items if r.status == "skipped"]

    @property
    def failed(self) -> list[DownloadResult]:
        """Results with status ``"failed"``, in input order."""
        return [r for r in self._items if r.status == "failed"]

    @property
    def paths(self) -> list[Path]:
        """The final path of every ok result, in input order."""
        return [r.path for r in self._items if r.ok and r.path is not None]

    def summary(self) -> Summary:
        """Counts, bytes downloaded, time and throughput, as a printable :class:`Summary`.

        Skipped files count as skipped; their bytes are not counted as downloaded.
        """
        succeeded = self.succeeded
        return Summary(
            total=len(self._items),
            downloaded=len(succeeded),
            skipped=len(self.skipped),
            failed=len(self.failed),
            nbytes=sum(r.bytes for r in succeeded),
            elapsed=self.elapsed,
        )

    def raise_for_errors(self) -> None:
        """Raise the error of the first failed result, if any.

        Raises:
            FetchError: the error of the first failure in input order (``.failed`` has
                them all).
        """
        for result in self._items:
            result.raise_for_error()
