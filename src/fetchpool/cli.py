"""The ``fetchpool`` command: download the URLs given as arguments or read from files.

``main()`` parses the arguments, streams the input (one row at a time, so a file of
millions of lines starts at once), keeps at most ``2 * workers`` URLs in flight through
:meth:`Downloader.submit`, writes one JSON line per finished URL to the report, and
returns the exit status. See ``fetchpool --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import math
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Any, Final, Literal, TextIO

from . import __version__
from .downloader import Downloader
from .errors import FetchError, InvalidURL, TransferError
from .naming import redact_url
from .progress import TqdmBar
from .results import DownloadResult, ProgressEvent, Summary
from .retry import RetryPolicy

__all__ = ["main"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

#: Failures listed on stderr at the end (all of them are in the report).
_SHOWN_FAILURES: Final = 10
#: Seconds between two looks at the stop request while waiting for results.
_POLL_INTERVAL: Final = 0.05
#: Bytes asked of an input file per read.
_READ_SIZE: Final = 64 * 1024
#: The longest text of a bad input row quoted in its error message.
_QUOTE_LIMIT: Final = 200

Format = Literal["lines", "csv", "tsv", "jsonl"]
_FORMAT_BY_SUFFIX: Final[dict[str, Format]] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}

log = logging.getLogger("fetchpool")


class UsageError(Exception):
    """A problem with the command line or its input files: exit status 2."""


# --------------------------------------------------------------------------- parsing


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_size(text: str) -> int | None:
    """Parse ``--max-bytes``: ``512K``, ``10M``, ``2G``, ``1.5G``, plain bytes, or ``none``.

    Suffixes are binary (``K`` = 1024); a trailing ``B`` or ``iB`` is allowed.

    Raises:
        argparse.ArgumentTypeError: not a size.
    """
    value = text.strip()
    if value.lower() in ("none", "unlimited"):
        return None
    match = _SIZE.fullmatch(value)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (expected e.g. 500K, 10M, 2G, 1048576 or none)"
        )
    number, unit = match.groups()
    factor = 1024 ** " kmgt".index(unit.lower() or " ")
    return int(float(number) * factor)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}")
    return value


def parse_timeout(text: str) -> float | tuple[float, float]:
    """Parse ``--timeout``: ``10`` for both, or ``5,30`` for connect and read.

    Raises:
        argparse.ArgumentTypeError: not one or two positive numbers.
    """
    parts = text.split(",")
    if len(parts) == 1:
        return _seconds(parts[0])
    if len(parts) == 2:
        return (_seconds(parts[0]), _seconds(parts[1]))
    raise argparse.ArgumentTypeError(f"expected SECONDS or CONNECT,READ, not {text!r}")


def parse_header(text: str) -> tuple[str, str]:
    """Parse ``-H 'Name: value'``.

    Raises:
        argparse.ArgumentTypeError: no colon, or a name that is not an HTTP token.
    """
    name, colon, value = text.partition(":")
    name = name.strip()
    if not colon or not _HEADER_NAME.fullmatch(name):
        # Do not echo the text: it may hold a credential typed without its colon.
        raise argparse.ArgumentTypeError("expected 'Name: value' (a token, a colon, a value)")
    if any(c in value for c in "\r\n\0"):
        raise argparse.ArgumentTypeError(f"the value of {name!r} contains a line break or NUL")
    return name, value.strip()


def _workers(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


_DESCRIPTION = """\
Download many files (first of all images) concurrently and safely.

Every file is written to a temporary name and renamed when complete, so nothing
partial ever carries a final name; URLs that share a basename get distinct,
stable names; a file already present is skipped, so running the same command
again resumes an interrupted batch."""

_EPILOG = """\
input:
  URLs come from the arguments, then from each -i FILE in order. Files are read
  as the downloads go, so a file of millions of lines starts at once. Formats:
    lines  one URL per line; blank lines and lines starting with # are ignored
    csv    a header row with a "url" column and optionally a "filename" column
           (a path relative to DEST); with no header, the columns are
           url[,filename]
    tsv    the same, tab-separated
    jsonl  one JSON object per line with "url" and optionally "filename"
  The format follows the extension (.csv, .tsv, .jsonl, .ndjson; anything else
  is lines) unless --format says otherwise; stdin (-) is lines by default.
  A row that is not a URL becomes a failed result (InvalidURL), never a crash.

report:
  --report writes one JSON object per URL as it finishes (completion order),
  flushed line by line: url (without user:password), path, status (downloaded,
  skipped or failed), bytes, attempts, elapsed, content_type, error_type,
  error, and source (the argument or FILE:LINE it came from).

exit status:
  0    every URL was downloaded or skipped
  1    at least one URL failed
  2    usage error: bad option, unreadable input file, DEST is not a directory
  130  interrupted by Ctrl-C (143: SIGTERM); a second Ctrl-C exits at once

examples:
  fetchpool -d images https://example.org/a.png https://example.org/b.jpg
  fetchpool -i urls.txt -d images -w 32 --report report.jsonl
  grep -o 'https://[^"]*\\.jpg' page.html | fetchpool -i - -d images
  fetchpool -i photos.csv -d out --retries 5 --timeout 5,60 --max-bytes 50M
  jq -r 'select(.status == "failed").url' report.jsonl | fetchpool -i -"""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``fetchpool`` command."""
    parser = argparse.ArgumentParser(
        prog="fetchpool",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("urls", nargs="*", metavar="URL", help="URLs to download")
    parser.add_argument(
        "-i",
        "--input",
        action="append",
        default=[],
        metavar="FILE",
        help="read URLs from FILE (- for stdin); may be repeated",
    )
    parser.add_argument(
        "--format",
        choices=("auto", "lines", "csv", "tsv", "jsonl"),
        default="auto",
        help="format of the input files (default: from the extension; lines for stdin)",
    )
    parser.add_argument(
        "-d",
        "--dest",
        default=".",
        metavar="DIR",
        help="directory to download into, created if missing (default: the current one)",
    )
    parser.add_argument(
        "-w",
        "--workers",
        type=_workers,
        default=8,
        metavar="N",
        help="concurrent downloads (default: 8)",
    )
    parser.add_argument(
        "--retries",
        type=_count,
        default=None,
        metavar="N",
        help="retries after the first attempt, for errors that can heal (connection "
        "errors, timeouts, 408, 425, 429, 5xx); 0 disables them (default: 3)",
    )
    parser.add_argument(
        "--timeout",
        type=parse_timeout,
        default=(10.0, 30.0),
        metavar="S[,S]",
        help="seconds to wait on the socket: one number, or CONNECT,READ (default: 10,30)",
    )
    parser.add_argument(
        "--deadline",
        type=_seconds,
        default=300.0,
        metavar="S",
        help="most seconds one attempt may take, headers and body (default: 300)",
    )
    parser.add_argument(
        "--max-bytes",
        type=parse_size,
        default=2 * 1024**3,
        metavar="SIZE",
        help="fail files larger than SIZE: bytes or a binary suffix K, M, G, T "
        "(K = 1024), e.g. 500K, 10M, 2G; none lifts the limit (default: 2G)",
    )
    parser.add_argument(
        "--overwrite",
        choices=("skip", "replace", "error"),
        default="skip",
        help="when a file is already there: keep it without a request (skip, the "
        "default), download again (replace), or fail that URL (error)",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="save any body; by default it must start like an image (PNG, JPEG, GIF, "
        "WebP, BMP, TIFF, ICO, AVIF/HEIC, JPEG XL, SVG)",
    )
    parser.add_argument(
        "-H",
        "--header",
        action="append",
        type=parse_header,
        default=[],
        metavar="'NAME: VALUE'",
        help="extra request header; may be repeated",
    )
    parser.add_argument(
        "--content-disposition",
        action="store_true",
        help="name files from the Content-Disposition header when there is one (sanitised)",
    )
    parser.add_argument(
        "--allow-downgrade", action="store_true", help="follow redirects from https to http"
    )
    parser.add_argument(
        "--fsync", action="store_true", help="flush each file to disk before reporting it"
    )
    parser.add_argument(
        "--report",
        metavar="FILE",
        help="write one JSON line per URL as it finishes to FILE (- for stdout)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal and not -q)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="print nothing but errors (no summary)"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log what fetchpool does to stderr (-v: retries and failures, -vv: debug)",
    )
    parser.add_argument("--version", action="version", version=f"fetchpool {__version__}")
    return parser


# --------------------------------------------------------------------------- input


@dataclass(frozen=True)
class Item:
    """One input row: a URL with an optional file name, or why the row is bad."""

    url: str
    filename: str | None
    source: str
    problem: str | None = None


@dataclass
class _Source:
    """An input file, read unbuffered (a blocked read of stdin holds no lock at exit)."""

    name: str
    stream: io.FileIO
    format: Format
    #: Set once the feeder owns it (the feeder then closes it, in its own thread).
    taken: bool = False


def _format_of(path: str, forced: str) -> Format:
    if forced != "auto":
        return forced  # type: ignore[return-value] # argparse restricts the choices
    suffix = os.path.splitext(path)[1].lower()
    return _FORMAT_BY_SUFFIX.get(suffix, "lines")


def _open_sources(paths: Sequence[str], forced: str) -> list[_Source]:
    """Open every input file now, so that an unreadable one is a usage error up front.

    Raises:
        UsageError: a file cannot be opened, or stdin is named twice.
    """
    sources: list[_Source] = []
    try:
        for path in paths:
            if path == "-":
                if any(s.name == "<stdin>" for s in sources):
                    raise UsageError("stdin (-) can be read only once")
                fmt = "lines" if forced == "auto" else _format_of(path, forced)
                stdin = io.FileIO(sys.stdin.fileno(), "rb", closefd=False)
                sources.append(_Source("<stdin>", stdin, fmt))
                continue
            try:
                stream = io.FileIO(path, "rb")
            except OSError as exc:
                raise UsageError(f"cannot read input file {path}: {exc.strerror or exc}") from exc
            sources.append(_Source(path, stream, _format_of(path, forced)))
    except BaseException:
        _close_sources(sources)
        raise
    return sources


def _close_sources(sources: Iterable[_Source]) -> None:
    for source in sources:
        source.stream.close()


def _raw_lines(stream: io.FileIO) -> Iterator[bytes]:
    """The lines of ``stream``, endings kept, each returned as soon as it is complete."""
    buf = bytearray()
    while chunk := stream.read(_READ_SIZE):
        scan = len(buf)  # the part before has no newline: never scan it again
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", scan)) >= 0:
            yield bytes(buf[start : end + 1])
            start = scan = end + 1
        del buf[:start]
    if buf:
        yield bytes(buf)


def _decoded(stream: io.FileIO) -> Iterator[str]:
    """Lines as text, endings kept; bytes that are not UTF-8 become lone surrogates."""
    first = True
    for raw in _raw_lines(stream):
        line = raw.decode("utf-8", "surrogateescape")
        if first:
            line = line.removeprefix("\ufeff")
            first = False
        yield line


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _quote(text: str) -> str:
    shown = text if len(text) <= _QUOTE_LIMIT else text[:_QUOTE_LIMIT] + "..."
    return repr(redact_url(shown))  # repr escapes bytes that were not UTF-8


def _bad(source: str, text: str, why: str) -> Item:
    return Item(url=text[:_QUOTE_LIMIT], filename=None, source=source, problem=why)


def _row(url: object, filename: object, where: str) -> Item:
    """Check one row's cells; anything wrong makes it a bad item."""
    if not isinstance(url, str) or not url.strip():
        return _bad(where, "" if url is None else str(url), "no URL in this row")
    url = url.strip()
    if filename is not None and not isinstance(filename, str):
        return _bad(where, url, f"filename must be a string, not {filename!r}")
    name = filename.strip() if isinstance(filename, str) else ""
    if _not_utf8(url) or _not_utf8(name):
        return _bad(where, url, f"not valid UTF-8: {_quote(url)}")
    return Item(url=url, filename=name or None, source=where)


def _lines_rows(source: _Source) -> Iterator[Item]:
    for number, line in enumerate(_decoded(source.stream), 1):
        text = line.strip()
        if text and not text.startswith("#"):
            yield _row(text, None, f"{source.name}:{number}")


def _jsonl_rows(source: _Source) -> Iterator[Item]:
    for number, line in enumerate(_decoded(source.stream), 1):
        text = line.strip()
        if not text:
            continue
        where = f"{source.name}:{number}"
        try:
            row = json.loads(text)
        except ValueError as exc:
            yield _bad(where, text, f"not valid JSON ({exc}): {_quote(text)}")
            continue
        if isinstance(row, str):
            yield _row(row, None, where)
        elif isinstance(row, dict):
            if "url" not in row:
                yield _bad(where, text, f'no "url" key in {_quote(text)}')
            else:
                yield _row(row["url"], row.get("filename"), where)
        else:
            yield _bad(where, text, f"expected a JSON object, not {_quote(text)}")


def _csv_columns(header: list[str], name: str) -> tuple[int, int | None, bool]:
    """Return the url and filename column indexes and whether ``header`` is a header row.

    Raises:
        UsageError: a header row without a ``url`` column.
    """
    names = [h.strip().lower() for h in header]
    if "url" in names:
        return names.index("url"), names.index("filename") if "filename" in names else None, True
    if header and header[0].strip().lower().startswith(("http://", "https://")):
        return 0, 1 if len(header) > 1 else None, False
    raise UsageError(
        f"{name}: the first row has no 'url' column (found: {', '.join(names) or 'nothing'})"
    )


def _csv_rows(source: _Source) -> Iterator[Item]:
    delimiter = "\t" if source.format == "tsv" else ","
    reader = csv.reader(_decoded(source.stream), delimiter=delimiter, strict=True)
    columns: tuple[int, int | None] | None = None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            where = f"{source.name}:{reader.line_num}"
            yield _bad(where, "", f"malformed CSV row ({exc})")
            continue
        where = f"{source.name}:{reader.line_num}"
        if columns is None:
            url_col, name_col, is_header = _csv_columns(row, source.name)
            columns = (url_col, name_col)
            if is_header:
                continue
        if not any(cell.strip() for cell in row):
            continue
        url_col, name_col = columns
        url = row[url_col] if url_col < len(row) else None
        name = row[name_col] if name_col is not None and name_col < len(row) else None
        yield _row(url, name, where)


_READERS: Final[dict[Format, Callable[[_Source], Iterator[Item]]]] = {
    "lines": _lines_rows,
    "jsonl": _jsonl_rows,
    "csv": _csv_rows,
    "tsv": _csv_rows,
}


def iter_items(urls: Sequence[str], sources: Sequence[_Source]) -> Iterator[Item]:
    """Yield the argument URLs, then the rows of each source, lazily.

    Raises:
        UsageError: a CSV source has no ``url`` column.
        OSError: reading a source failed.
    """
    for number, url in enumerate(urls, 1):
        yield Item(url=url, filename=None, source=f"argument {number}")
    for source in sources:
        yield from _READERS[source.format](source)


# --------------------------------------------------------------------------- output


class Report:
    """The JSON Lines report: one object per finished URL, flushed line by line."""

    def __init__(self, stream: TextIO, *, close: bool) -> None:
        self._stream = stream
        self._close = close

    @classmethod
    def open(cls, path: str) -> Report:
        """Open ``path`` for writing (``-`` is stdout).

        Raises:
            UsageError: the file cannot be created.
        """
        if path == "-":
            return cls(sys.stdout, close=False)
        try:
            stream = open(path, "w", encoding="utf-8", newline="\n")  # noqa: SIM115
        except OSError as exc:
            raise UsageError(f"cannot write report {path}: {exc.strerror or exc}") from exc
        return cls(stream, close=True)

    def write(self, item: Item, result: DownloadResult) -> None:
        """Write and flush the line of one result.

        Raises:
            OSError: the report cannot be written (disk full, closed pipe).
        """
        error = result.error
        record: dict[str, Any] = {
            "url": redact_url(result.url),
            "path": None if result.path is None else str(result.path),
            "status": result.status,
            "bytes": result.bytes,
            "attempts": result.attempts,
            "elapsed": round(result.elapsed, 3),
            "content_type": result.content_type,
            "error_type": None if error is None else type(error).__name__,
            "error": None if error is None else str(error),
            "source": item.source,
        }
        # ASCII with escapes: valid JSON even for input that was not valid UTF-8.
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()

    def abandon(self) -> None:
        """Give up on a report that cannot be written; silence a closed stdout pipe."""
        if not self._close:
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self._stream.fileno())
                os.close(devnull)

    def close(self) -> None:
        """Close the file (stdout is only flushed)."""
        with contextlib.suppress(OSError, ValueError):
            if self._close:
                self._stream.close()
            else:
                self._stream.flush()


class Tally:
    """Counts for the summary, and the first few failures to show."""

    def __init__(self) -> None:
        self.downloaded = 0
        self.skipped = 0
        self.failed = 0
        self.bytes = 0
        self.stopped = 0
        self.failures: list[tuple[Item, DownloadResult]] = []

    def add(self, item: Item, result: DownloadResult, *, stopping: bool = False) -> None:
        """Count one result; with ``stopping``, a cancelled one counts as stopped."""
        if stopping and _was_cancelled(result):
            self.stopped += 1
        elif result.status == "downloaded":
            self.downloaded += 1
            self.bytes += result.bytes
        elif result.status == "skipped":
            self.skipped += 1
        else:
            self.failed += 1
            if len(self.failures) < _SHOWN_FAILURES:
                self.failures.append((item, result))

    def summary(self, elapsed: float) -> Summary:
        """The library's one-line summary of these counts."""
        return Summary(
            total=self.downloaded + self.skipped + self.failed,
            downloaded=self.downloaded,
            skipped=self.skipped,
            failed=self.failed,
            nbytes=self.bytes,
            elapsed=elapsed,
        )

    def lines(self, elapsed: float, interrupted: bool) -> list[str]:
        """The closing lines for stderr: the first failures, then the summary."""
        out = []
        for item, result in self.failures:
            name = type(result.error).__name__ if result.error else "error"
            out.append(f"fetchpool: failed ({item.source}): {name}: {result.error}")
        if self.failed > len(self.failures):
            more = self.failed - len(self.failures)
            out.append(f"fetchpool: ... and {more} more failed (--report FILE lists them all)")
        prefix = "fetchpool: interrupted; " if interrupted else "fetchpool: "
        suffix = f"; {self.stopped} stopped unfinished" if self.stopped else ""
        out.append(prefix + self.summary(elapsed) + suffix)
        return out


def _was_cancelled(result: DownloadResult) -> bool:
    # The library marks a download stopped by close(cancel=True) only by its message.
    error = result.error
    return (
        isinstance(error, TransferError)
        and not error.retryable
        and error.message.endswith(" cancelled")
    )


# --------------------------------------------------------------------------- running


class _End:
    """The feeder has submitted its last item."""


_END: Final = _End()


@dataclass(frozen=True)
class _InputFailed:
    message: str


_Entry = tuple[Item, "Future[DownloadResult] | DownloadResult"] | _End | _InputFailed


class Feeder(threading.Thread):
    """Reads the input and submits it, with at most ``window`` URLs not yet reported.

    It runs in a thread of its own so that a slow input (a pipe) never holds back the
    report; finished downloads arrive on :attr:`done` in completion order.
    """

    def __init__(
        self, downloader: Downloader, urls: Sequence[str], sources: list[_Source], window: int
    ) -> None:
        super().__init__(name="fetchpool-feeder", daemon=True)
        # queue.Queue, not SimpleQueue: its timed get() resumes cleanly after a signal.
        self.done: queue.Queue[_Entry] = queue.Queue()
        self.submitted = 0
        self._downloader = downloader
        self._items = iter_items(urls, sources)
        self._sources = sources
        self._slots = threading.Semaphore(window)
        self._stop = threading.Event()

    def start(self) -> None:
        """Start reading; the input files are the feeder's to close from now on."""
        for source in self._sources:
            source.taken = True
        super().start()

    def run(self) -> None:
        """Feed every item, close the input, then put the end marker."""
        try:
            self._submit_all()
        except Exception as exc:  # noqa: BLE001 - any failure ends the input, reported
            if not self._stop.is_set():  # (after an interrupt, the input closed under us)
                self.done.put(_InputFailed(_input_problem(exc)))
        finally:
            _close_sources(self._sources)
            self.done.put(_END)

    def _submit_all(self) -> None:
        for item in self._items:
            self._slots.acquire()
            if self._stop.is_set():
                return
            self.submitted += 1
            if item.problem is not None:
                error = InvalidURL(item.problem, url=redact_url(item.url))
                result = DownloadResult(url=item.url, path=None, status="failed", error=error)
                self.done.put((item, result))
                continue
            try:
                future = self._downloader.submit(item.url, item.filename)
            except RuntimeError:  # closed by an interrupt meanwhile
                self.submitted -= 1
                return
            future.add_done_callback(partial(self._finished, item))

    def _finished(self, item: Item, future: Future[DownloadResult]) -> None:
        self.done.put((item, future))

    def slot_free(self) -> None:
        """Let one more URL in (its predecessor has been reported)."""
        self._slots.release()

    def stop(self) -> None:
        """Submit nothing more."""
        self._stop.set()
        self._slots.release()


def _input_problem(exc: Exception) -> str:
    if isinstance(exc, UsageError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"cannot read the input: {exc}"
    log.error("internal error while reading the input", exc_info=exc)
    return f"internal error while reading the input: {exc!r}"


def _result_of(item: Item, outcome: Future[DownloadResult] | DownloadResult) -> DownloadResult:
    if isinstance(outcome, DownloadResult):
        return outcome
    try:
        return outcome.result()
    except Exception as exc:  # noqa: BLE001 - failures are results; this would be a bug
        error = FetchError(f"internal error downloading {redact_url(item.url)}: {exc!r}")
        return DownloadResult(url=item.url, path=None, status="failed", error=error)


class _Interrupted(KeyboardInterrupt):
    """The run was asked to stop by SIGINT or SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _StopRequest:
    """Signal handling: the first SIGINT or SIGTERM asks the run to stop, a second exits.

    The handler only records the signal; the main loop looks at it between results.
    Raising from the handler instead would land the ``KeyboardInterrupt`` wherever the
    main thread happens to be, half-way through a report line for instance.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler."""
        if self.signum is not None:
            os.write(2, b"\nfetchpool: interrupted again, exiting now\n")
            os._exit(128 + signum)
        self.signum = signum

    def check(self) -> None:
        """Raise :class:`_Interrupted` if a stop was asked for.

        Raises:
            _Interrupted: a signal arrived.
        """
        if self.signum is not None:
            raise _Interrupted(self.signum)


@contextlib.contextmanager
def _signals() -> Iterator[_StopRequest]:
    """Install the SIGINT and SIGTERM handlers of a run (from the main thread only)."""
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in saved:
        signal.signal(sig, stop.handle)
    try:
        yield stop
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class _TqdmHandler(logging.Handler):
    """Log lines that do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm  # noqa: PLC0415 - optional dependency, present with a bar

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


@contextlib.contextmanager
def _logging(verbose: int, with_bar: bool) -> Iterator[None]:
    """Send the ``fetchpool`` logger to stderr for ``-v`` (INFO) and ``-vv`` (DEBUG)."""
    if not verbose:
        yield
        return
    handler: logging.Handler = _TqdmHandler() if with_bar else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fetchpool: %(levelname)s: %(message)s"))
    saved = (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.INFO if verbose == 1 else logging.DEBUG)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def _make_bar(args: argparse.Namespace, sources: Sequence[_Source]) -> TqdmBar | None:
    wanted = args.progress
    if wanted is None:
        wanted = not args.quiet and sys.stderr.isatty()
    if not wanted:
        return None
    try:
        if sources:
            return TqdmBar(open_ended=True)
        return TqdmBar(total=len(args.urls))
    except ImportError as exc:
        if args.progress:
            print(f"fetchpool: {exc}", file=sys.stderr)
        return None


def _say(lines: Iterable[str]) -> None:
    with contextlib.suppress(OSError, ValueError):
        for line in lines:
            print(line, file=sys.stderr)
        sys.stderr.flush()


class _Relay:
    """The Downloader's progress callback: forwards to the bar, once there is one."""

    def __init__(self) -> None:
        self.bar: TqdmBar | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if self.bar is not None:
            self.bar(event)


class _Run:
    """One invocation: the feeder's output turned into report lines and a tally."""

    def __init__(
        self, feeder: Feeder, report: Report | None, relay: _Relay, stop: _StopRequest
    ) -> None:
        self.feeder = feeder
        self.stop = stop
        self.report = report
        self.relay = relay
        self.tally = Tally()
        self.handled = 0
        self.input_error: str | None = None
        self.report_error: str | None = None
        #: Set after an interrupt: results that arrive now are mostly cancellations.
        self.stopping = False

    def loop(self) -> None:
        """Take entries until every submitted URL is reported (or the report broke).

        Raises:
            _Interrupted: a stop was asked for.
        """
        ended = False
        while not (ended and self.handled == self.feeder.submitted):
            self.stop.check()
            try:
                entry = self.feeder.done.get(timeout=_POLL_INTERVAL)
            except queue.Empty:
                continue
            if isinstance(entry, _End):
                ended = True  # no more submissions: ``submitted`` is final
            elif isinstance(entry, _InputFailed):
                self.input_error = entry.message
            else:
                self.take(*entry)
                if self.report_error is not None:
                    return

    def drain(self) -> None:
        """Take whatever has arrived, without waiting (after an interrupt)."""
        while True:
            try:
                entry = self.feeder.done.get_nowait()
            except queue.Empty:
                return
            if isinstance(entry, tuple):
                self.take(*entry)

    def take(self, item: Item, outcome: Future[DownloadResult] | DownloadResult) -> None:
        """Count and report one finished URL."""
        self.handled += 1
        if isinstance(outcome, Future) and outcome.cancelled():
            return  # never started (an interrupt): not in the report
        result = _result_of(item, outcome)
        if isinstance(outcome, DownloadResult):  # a bad row: the Downloader never saw it
            self.relay(ProgressEvent(url=outcome.url, bytes=0, total=None, state="started"))
            self.relay(ProgressEvent(url=outcome.url, bytes=0, total=None, state="failed"))
        self.tally.add(item, result, stopping=self.stopping)
        if self.report is not None and self.report_error is None:
            try:
                self.report.write(item, result)
            except OSError as exc:
                self.report_error = f"cannot write the report: {exc.strerror or exc}"
                self.report.abandon()
                return
        self.feeder.slot_free()


def _downloader(args: argparse.Namespace, relay: _Relay) -> Downloader:
    """Open the Downloader the options ask for.

    Raises:
        UsageError: ``dest`` is not a directory or cannot be created.
    """
    retry = RetryPolicy() if args.retries is None else RetryPolicy(attempts=args.retries + 1)
    try:
        return Downloader(
            args.dest,
            args.workers,
            retry=retry,
            timeout=args.timeout,
            deadline=args.deadline,
            max_bytes=args.max_bytes,
            overwrite=args.overwrite,
            content_disposition=args.content_disposition,
            allow_downgrade=args.allow_downgrade,
            fsync=args.fsync,
            verify=None if args.no_verify else "image",
            headers=dict(args.header),
            progress=relay,
        )
    except NotADirectoryError:
        raise UsageError(f"the destination {args.dest} is not a directory") from None
    except OSError as exc:
        raise UsageError(f"cannot use the destination {args.dest}: {exc.strerror or exc}") from exc


def _run(
    args: argparse.Namespace, sources: list[_Source], report: Report | None, stop: _StopRequest
) -> int:
    """Download everything; return the exit status.

    Raises:
        UsageError: the destination cannot be used.
    """
    start = time.monotonic()
    relay = _Relay()
    downloader = _downloader(args, relay)
    feeder = Feeder(downloader, args.urls, sources, 2 * args.workers)
    run = _Run(feeder, report, relay, stop)
    interrupted: KeyboardInterrupt | None = None
    relay.bar = _make_bar(args, sources)
    with _logging(args.verbose, relay.bar is not None):
        try:
            feeder.start()
            run.loop()
            if run.report_error is not None:
                feeder.stop()
                downloader.close(cancel=True)
            else:
                downloader.close()
            if stop.signum is not None:  # during the last close(): nothing left to stop
                interrupted = _Interrupted(stop.signum)
        except KeyboardInterrupt as exc:
            interrupted = exc
            run.stopping = True
            feeder.stop()
            downloader.close(cancel=True)
            run.drain()
        finally:
            if relay.bar is not None:
                relay.bar.close()
    elapsed = time.monotonic() - start
    messages = [f"fetchpool: {m}" for m in (run.input_error, run.report_error) if m]
    if not args.quiet:
        messages = run.tally.lines(elapsed, interrupted is not None) + messages
    _say(messages)
    if interrupted is not None:
        return 128 + getattr(interrupted, "signum", signal.SIGINT)
    if run.input_error is not None:
        return EXIT_USAGE
    if run.report_error is not None or run.tally.failed:
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fetchpool`` command with ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 when every URL was downloaded or skipped, 1 when any failed,
        2 for a usage error, 130 when interrupted (143 for SIGTERM).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not args.urls and not args.input:
        parser.print_usage(sys.stderr)
        print(
            "fetchpool: error: no URLs: give them as arguments or with -i FILE (- for stdin)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    with _signals() as stop:
        try:
            sources = _open_sources(args.input, args.format)
            try:
                report = Report.open(args.report) if args.report else None
                try:
                    return _run(args, sources, report, stop)
                finally:
                    if report is not None:
                        report.close()
            finally:
                _close_sources(s for s in sources if not s.taken)
        except UsageError as exc:
            print(f"fetchpool: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt as exc:
            return 128 + getattr(exc, "signum", signal.SIGINT)
