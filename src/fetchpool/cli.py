"""The ``fetchpool`` command: download the URLs given as arguments or read from files.

``main()`` parses the arguments and opens the inputs, the report and a :class:`Downloader`.
A feeder thread streams the input rows into :meth:`Downloader.submit`, at most
``2 * workers`` of them not yet reported, so a file of millions of lines starts at once and
a slow pipe never holds back the report. The main thread writes one report line per
finished URL, watches for Ctrl-C, and returns the exit status. See ``fetchpool --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from types import FrameType
from typing import Any, Final, Literal, TextIO

from . import __version__
from .backends import on_done
from .checksums import check_hex, check_size
from .dask import DEFAULT_SHARD_SIZE, ShardPool
from .downloader import Downloader
from .errors import FetchError, InvalidURL, TransferError
from .items import Item
from .naming import redact_url
from .options import Backend
from .progress import TqdmBar
from .results import DownloadResult, ProgressEvent, Summary
from .ssrf import ALLOW_PROXY, AllowEntry, BlockPrivate, parse_allow_host

__all__ = ["main"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

#: The longest input line in bytes: a longer one is a failed row, skipped without being
#: held in memory (no server takes a URL that long; most stop at 8 KiB).
MAX_LINE: Final = 64 * 1024
#: The most seconds ``--timeout`` and ``--deadline`` take: more is a typo, and overflows
#: the socket's timer.
MAX_SECONDS: Final = 86400.0
#: Failures listed on stderr at the end (the report has all of them).
_SHOWN_FAILURES: Final = 10
#: Seconds between two looks at the stop request while waiting for results.
_POLL_INTERVAL: Final = 0.05
_READ_SIZE: Final = 64 * 1024
#: The longest text of a bad input row kept in its report line and quoted in its message.
_QUOTE_LIMIT: Final = 200
_FORMAT_BY_SUFFIX: Final = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}

log = logging.getLogger("fetchpool")


class UsageError(Exception):
    """A problem with the command line or its input files: exit status 2."""


# --------------------------------------------------------------------------- options


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_size(text: str) -> int | None:
    """Parse ``--max-bytes``: ``512K``, ``10M``, ``2G``, ``1.5G``, plain bytes, or ``none``.

    Suffixes are binary (``K`` = 1024); ``KB``, ``KiB`` and a lone ``B`` are allowed.

    Raises:
        argparse.ArgumentTypeError: not a size.
    """
    value = text.strip()
    if value.lower() == "none":
        return None
    match = _SIZE.fullmatch(value)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (expected e.g. 500K, 10M, 2G, 1048576 or none)"
        )
    number, unit = match.groups()
    return int(Decimal(number) * 1024 ** " kmgt".index((unit or " ").lower()))


def _positive(text: str, what: str, maximum: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of {what}: {text!r}") from None
    if not 0 < value <= maximum:  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"must be a number of {what} > 0 and <= {maximum:.0f}, not {text!r}"
        )
    return value


def parse_seconds(text: str) -> float:
    """Parse a number of seconds, more than 0 and at most :data:`MAX_SECONDS`.

    Raises:
        argparse.ArgumentTypeError: not such a number.
    """
    return _positive(text, "seconds", MAX_SECONDS)


def parse_timeout(text: str) -> float | tuple[float, float]:
    """Parse ``--timeout``: ``10`` for both, or ``5,30`` for connect and read.

    Raises:
        argparse.ArgumentTypeError: not one or two numbers of seconds.
    """
    parts = text.split(",")
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"expected SECONDS or CONNECT,READ, not {text!r}")
    values = [parse_seconds(part) for part in parts]
    return values[0] if len(values) == 1 else (values[0], values[1])


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


def parse_rate(text: str) -> float:
    """Parse a number of requests per second, more than 0 and at most a million.

    Raises:
        argparse.ArgumentTypeError: not such a number.
    """
    return _positive(text, "requests per second", 1e6)


def parse_allow_host_arg(text: str) -> AllowEntry:
    """Parse ``--allow-host`` (a host name, ``*.domain``, an address or a network).

    Raises:
        argparse.ArgumentTypeError: none of them.
    """
    try:
        return parse_allow_host(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("allow_hosts: ")) from None


def parse_block_private(text: str) -> BlockPrivate:
    """Parse the optional value of ``--block-private`` (only ``allow-proxy``).

    Raises:
        argparse.ArgumentTypeError: another value.
    """
    if text != ALLOW_PROXY:
        raise argparse.ArgumentTypeError(f"expected {ALLOW_PROXY} or nothing, not {text!r}")
    return ALLOW_PROXY


def _whole(text: str, minimum: int = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
    return value


_DESCRIPTION = """\
Download many files (first of all images) concurrently and safely.

Every file is written to a temporary name and renamed when complete, so nothing
partial ever carries a final name; URLs that share a basename get distinct,
stable names; a file already present is skipped, so running the same command
again resumes an interrupted batch."""

_EPILOG = f"""\
input:
  URLs come from the arguments, then from each -i FILE in order. Files are read
  as the downloads go, so a file of millions of lines starts at once. Formats:
    lines  one URL per line; blank lines and lines starting with # are ignored
    csv    a header row with a "url" column and optionally "filename" (a path
           relative to DIR), "sha256", "md5" and "size" columns; with no
           header, the columns are url[,filename]
    tsv    the same, tab-separated
    jsonl  one JSON object per line with "url" and optionally "filename",
           "sha256", "md5" and "size"
  sha256 and md5 are hex digests, size a number of bytes; an empty one is none.
  A body that does not match them fails with ChecksumError (after retries) and
  is never saved; a file already there is skipped only if it matches them, and
  downloaded again otherwise.
  The format follows the extension (.csv, .tsv, .jsonl, .ndjson; anything else
  is lines) unless --format says otherwise; stdin (-) is lines by default.
  A row that is not a URL, has a malformed sha256, md5 or size, or a line
  longer than {MAX_LINE // 1024} KiB, becomes a failed result, never a crash.

report:
  --report writes one JSON object per URL as it finishes (completion order),
  flushed line by line: url (without user:password), path, status (downloaded,
  skipped or failed), bytes, attempts, elapsed, content_type, error_type,
  error, source (the argument or FILE:LINE it came from), and sha256 and md5
  when that hash was asked for (of the body, or of the file found if skipped).

exit status:
  0    every URL was downloaded or skipped
  1    at least one URL failed, or the report could not be written
  2    usage error: bad option, unreadable input file, a CSV file without a
       url column, DIR is not a directory, the report would overwrite an input
  130  interrupted by Ctrl-C (143: SIGTERM); a second Ctrl-C exits at once

examples:
  fetchpool -d images https://example.org/a.png https://example.org/b.jpg
  fetchpool -i urls.txt -d images -w 32 --report report.jsonl
  grep -o 'https://[^"]*\\.jpg' page.html | fetchpool -i - -d images
  fetchpool -i photos.csv -d out --retries 5 --timeout 5,60 --max-bytes 50M
  fetchpool -i catalogue.csv -d out --report r.jsonl   # url,sha256,size columns
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
        type=partial(_whole, minimum=1),
        default=8,
        metavar="N",
        help="concurrent downloads (default: 8)",
    )
    parser.add_argument(
        "--per-host",
        type=partial(_whole, minimum=1),
        default=None,
        metavar="N",
        help="at most N downloads talking to one host (scheme, host, port) at once; "
        "the other workers go on with other hosts (default: only --workers bounds it)",
    )
    parser.add_argument(
        "--rate",
        type=parse_rate,
        default=None,
        metavar="R",
        help="at most R requests per second started to one host, evenly spaced "
        "(e.g. 2 or 0.5; default: no limit). With --per-host or --rate, a 429 or 503 "
        "with Retry-After pauses that host for every worker",
    )
    parser.add_argument(
        "--retries",
        type=_whole,
        default=3,
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
        type=parse_seconds,
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
        "--resume",
        action="store_true",
        help="keep the data of a failed or interrupted download in a hidden "
        "'.NAME.fetchpool-partial' file beside it, and continue from there next time",
    )
    parser.add_argument(
        "--block-private",
        nargs="?",
        const=True,
        default=False,
        type=parse_block_private,
        metavar=ALLOW_PROXY,
        help="refuse to connect to loopback, private, link-local and other non-public "
        "addresses (for untrusted URLs); refused with a proxy in the environment unless "
        f"given as --block-private={ALLOW_PROXY}",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        type=parse_allow_host_arg,
        default=[],
        metavar="HOST|NET",
        help="a host name (*.domain for its subdomains), address or network (CIDR) that "
        "--block-private lets through; may be repeated",
    )
    parser.add_argument(
        "--report",
        metavar="FILE",
        help="write one JSON line per URL as it finishes to FILE (- for stdout)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
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
    parser.add_argument(
        "--backend",
        choices=("auto", "requests", "curl"),
        default="auto",
        help="the transfer backend: curl (libcurl, HTTP/2; needs fetchpool[curl]) or "
        "requests; auto (default) takes curl when pycurl is installed",
    )
    parser.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="run the downloads on a Dask cluster, in shards: the scheduler's ADDRESS, or "
        "local:N for a local cluster of N worker processes (needs fetchpool[dask]; DIR "
        "must be a directory every worker sees); -w is then the threads per shard",
    )
    parser.add_argument(
        "--shard-size",
        type=partial(_whole, minimum=1),
        default=DEFAULT_SHARD_SIZE,
        metavar="N",
        help=f"with --dask: URLs per shard, one Dask task each (default: {DEFAULT_SHARD_SIZE})",
    )
    parser.add_argument("--version", action="version", version=_version())
    return parser


def resolve_backend(choice: str) -> Backend:
    """Return the backend ``--backend`` names; ``auto`` is curl where pycurl imports."""
    if choice == "requests":
        return "requests"
    if choice == "curl":
        return "curl"
    try:
        import pycurl  # noqa: F401, PLC0415 - only asked whether it is there
    except ImportError:
        return "requests"
    return "curl"


def _backend_text(backend: Backend) -> str:
    if backend == "curl":
        import pycurl  # noqa: PLC0415 - present: resolve_backend found it

        return f"curl ({' '.join(pycurl.version.split()[:2])})"
    import requests  # noqa: PLC0415

    return f"requests {requests.__version__}"


def _version() -> str:
    return f"fetchpool {__version__} (backend auto: {_backend_text(resolve_backend('auto'))})"


# --------------------------------------------------------------------------- input


@dataclass(frozen=True)
class Row:
    """One input row: a URL with an optional file name and expectations, or why the row
    is bad."""

    url: str
    filename: str | None
    source: str
    problem: str | None = None
    #: The file's expected hashes and size, if the row gives them.
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None

    def item(self) -> str | Item:
        """What to submit: the URL, or an :class:`Item` when the row expects something."""
        if self.sha256 is None and self.md5 is None and self.size is None:
            return self.url
        return Item(self.url, sha256=self.sha256, md5=self.md5, size=self.size)


@dataclass(frozen=True)
class _Input:
    """An input file, read unbuffered (a blocked read of stdin holds no lock at exit)."""

    name: str
    stream: io.FileIO
    format: str


def _open_inputs(paths: Sequence[str], forced: str, stack: contextlib.ExitStack) -> list[_Input]:
    """Open every input file now, so that an unreadable one is a usage error up front.

    Raises:
        UsageError: a file cannot be opened, or stdin is named twice.
    """
    if paths.count("-") > 1:
        raise UsageError("stdin (-) can be read only once")
    inputs = []
    for path in paths:
        if path == "-":
            name, stream = "<stdin>", io.FileIO(sys.stdin.fileno(), "rb", closefd=False)
        else:
            try:
                name, stream = path, io.FileIO(path, "rb")
            except OSError as exc:
                raise UsageError(f"cannot read input file {path}: {exc.strerror or exc}") from exc
        stack.callback(stream.close)
        fmt = forced
        if fmt == "auto":
            suffix = "" if path == "-" else os.path.splitext(path)[1].lower()
            fmt = _FORMAT_BY_SUFFIX.get(suffix, "lines")
        inputs.append(_Input(name, stream, fmt))
    return inputs


def _raw_lines(stream: io.FileIO) -> Iterator[bytes | None]:
    """The lines of ``stream``, endings kept, each as soon as it is complete.

    ``None`` stands for a line longer than :data:`MAX_LINE` bytes, dropped as it is read.
    """
    buf = bytearray()
    overlong = False  # the start of the current line was longer than MAX_LINE: dropped
    while chunk := stream.read(_READ_SIZE):
        scan = len(buf)  # the part before has no newline: never scan it again
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", scan)) >= 0:
            yield None if overlong or end - start > MAX_LINE else bytes(buf[start : end + 1])
            overlong = False
            start = scan = end + 1
        del buf[:start]
        if len(buf) > MAX_LINE:
            overlong = True
            buf.clear()
    if overlong:
        yield None
    elif buf:
        yield bytes(buf)


def _lines(stream: io.FileIO) -> Iterator[str | None]:
    """:func:`_raw_lines` as text: bytes that are not UTF-8 become lone surrogates."""
    for number, raw in enumerate(_raw_lines(stream)):
        if raw is None:
            yield None
        else:
            text = raw.decode("utf-8", "surrogateescape")
            yield text.removeprefix("\ufeff") if number == 0 else text


def _bad(source: str, text: str, why: str) -> Row:
    return Row(url=text[:_QUOTE_LIMIT], filename=None, source=source, problem=why)


def _too_long(source: str) -> Row:
    return _bad(source, "", f"line longer than {MAX_LINE} bytes")


def _quote(text: str) -> str:
    shown = text if len(text) <= _QUOTE_LIMIT else text[:_QUOTE_LIMIT] + "..."
    return repr(redact_url(shown))  # repr escapes bytes that were not UTF-8


#: The columns (CSV, TSV) or keys (JSONL) that say what a file must be.
_EXPECTATIONS: Final[tuple[str, ...]] = ("sha256", "md5", "size")


def _empty(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _hash_cell(algorithm: Literal["sha256", "md5"], value: object) -> str | None:
    """Parse a ``sha256`` or ``md5`` cell; empty (or JSON null) is none.

    Raises:
        ValueError, TypeError: a malformed value (the message says why).
    """
    if _empty(value):
        return None
    return check_hex(algorithm, value.strip() if isinstance(value, str) else value)


def _size_cell(value: object) -> int | None:
    """Parse a ``size`` cell: a number of bytes (JSONL: a number or a string of digits).

    Raises:
        ValueError, TypeError: a malformed value (the message says why).
    """
    if _empty(value):
        return None
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()):
            raise ValueError(f"size must be a number of bytes, not {text[:80]!r}")
        return int(text)
    return check_size(value)


def _row(url: object, filename: object, source: str, cells: dict[str, object] | None = None) -> Row:
    """Check one row's cells (``cells``: its sha256, md5, size); anything wrong makes it
    a bad row."""
    if not isinstance(url, str) or not url.strip():
        return _bad(source, "" if url is None else str(url), "no URL in this row")
    url = url.strip()
    if filename is not None and not isinstance(filename, str):
        return _bad(source, url, f"filename must be a string, not {type(filename).__name__}")
    name = (filename or "").strip()
    try:
        (url + name).encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8
        return _bad(source, url, f"not valid UTF-8: {_quote(url)}")
    if not cells:
        return Row(url=url, filename=name or None, source=source)
    try:
        sha256 = _hash_cell("sha256", cells.get("sha256"))
        md5 = _hash_cell("md5", cells.get("md5"))
        size = _size_cell(cells.get("size"))
    except (ValueError, TypeError) as exc:
        return _bad(source, url, f"{exc} (for {_quote(url)})")
    return Row(url, name or None, source, None, sha256, md5, size)


def _text_rows(name: str, lines: Iterator[str | None]) -> Iterator[Row]:
    for number, line in enumerate(lines, 1):
        if line is None:
            yield _too_long(f"{name}:{number}")
        elif (text := line.strip()) and not text.startswith("#"):
            yield _row(text, None, f"{name}:{number}")


def _jsonl_rows(name: str, lines: Iterator[str | None]) -> Iterator[Row]:
    for number, line in enumerate(lines, 1):
        where = f"{name}:{number}"
        if line is None:
            yield _too_long(where)
            continue
        if not (text := line.strip()):
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:
            yield _bad(where, text, f"not valid JSON ({exc}): {_quote(text)}")
            continue
        if isinstance(value, str):
            yield _row(value, None, where)
        elif not isinstance(value, dict):
            yield _bad(where, text, f"expected a JSON object, not {_quote(text)}")
        elif "url" not in value:
            yield _bad(where, text, f'no "url" key in {_quote(text)}')
        else:
            cells = {key: value[key] for key in _EXPECTATIONS if key in value}
            yield _row(value["url"], value.get("filename"), where, cells)


@dataclass(frozen=True)
class _Columns:
    """Where a CSV file's cells are: url, filename, and the expectations' columns."""

    url: int
    filename: int | None
    expectations: dict[str, int]


def _csv_columns(cells: list[str], name: str) -> tuple[_Columns, bool]:
    """Return the columns and whether ``cells`` is a header row.

    Raises:
        UsageError: a header row without a ``url`` column.
    """
    names = [cell.strip().lower() for cell in cells]
    if "url" in names:
        filename = names.index("filename") if "filename" in names else None
        expectations = {key: names.index(key) for key in _EXPECTATIONS if key in names}
        return _Columns(names.index("url"), filename, expectations), True
    if names[0].startswith(("http://", "https://")):
        return _Columns(0, 1 if len(names) > 1 else None, {}), False
    raise UsageError(f"{name}: the first row has no 'url' column (found: {', '.join(names)})")


def _csv_rows(name: str, lines: Iterator[str | None], delimiter: str) -> Iterator[Row]:
    overlong = 0

    def physical() -> Iterator[str]:  # an over-long line becomes an empty one, counted
        nonlocal overlong
        for line in lines:
            overlong += line is None
            yield "\n" if line is None else line

    reader = csv.reader(physical(), delimiter=delimiter, strict=True)
    columns: _Columns | None = None
    while True:
        where, seen = f"{name}:{reader.line_num + 1}", overlong  # a row may span lines
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield _bad(where, "", f"malformed CSV row ({exc})")
            continue
        if overlong != seen:
            if columns is None:
                raise UsageError(f"{name}: the first row is longer than {MAX_LINE} bytes")
            yield _too_long(where)
            continue
        if not any(cell.strip() for cell in cells):
            continue
        if columns is None:
            columns, is_header = _csv_columns(cells, name)
            if is_header:
                continue
        url = cells[columns.url] if columns.url < len(cells) else None
        name_col = columns.filename
        filename = cells[name_col] if name_col is not None and name_col < len(cells) else None
        expected: dict[str, object] = {
            key: cells[col] for key, col in columns.expectations.items() if col < len(cells)
        }
        yield _row(url, filename, where, expected)


def _rows(urls: Sequence[str], inputs: Sequence[_Input]) -> Iterator[Row]:
    """Yield the argument URLs, then the rows of each input, lazily.

    Raises:
        UsageError: an input cannot be read, or a CSV input has no ``url`` column.
    """
    for number, url in enumerate(urls, 1):
        yield _row(url, None, f"argument {number}")
    for source in inputs:
        lines = _lines(source.stream)
        try:
            if source.format == "lines":
                yield from _text_rows(source.name, lines)
            elif source.format == "jsonl":
                yield from _jsonl_rows(source.name, lines)
            else:
                yield from _csv_rows(source.name, lines, "\t" if source.format == "tsv" else ",")
        except OSError as exc:
            raise UsageError(
                f"cannot read input file {source.name}: {exc.strerror or exc}"
            ) from exc


# --------------------------------------------------------------------------- the run


class _Feeder(threading.Thread):
    """Reads the input and submits it, with at most ``window`` URLs not yet reported.

    Each row arrives on :attr:`done` as ``(row, future)`` once its future is done, in
    completion order; ``None`` follows the last submission, and :attr:`submitted` and
    :attr:`error` are final from then on. The feeder closes the inputs.
    """

    def __init__(
        self,
        downloader: Downloader | ShardPool,
        rows: Iterator[Row],
        inputs: Sequence[_Input],
        window: int,
        progress: _Relay,
    ) -> None:
        super().__init__(name="fetchpool-input", daemon=True)  # may block on stdin
        self.done: queue.Queue[tuple[Row, Future[DownloadResult]] | None] = queue.Queue()
        #: Released by the main thread for each row reported.
        self.slots = threading.Semaphore(window)
        self.submitted = 0
        self.error: str | None = None
        self._downloader = downloader
        self._rows = rows
        self._inputs = inputs
        self._progress = progress
        self._stop = threading.Event()

    def run(self) -> None:
        """Submit every row, close the inputs, then put ``None``."""
        try:
            for row in self._rows:
                self.slots.acquire()
                if self._stop.is_set() or (future := self._submit(row)) is None:
                    return
                self.submitted += 1
                on_done(future, partial(self._finished, row))  # a put: quick
        except UsageError as exc:
            self.error = str(exc)
        except Exception as exc:  # a bug: say so, and end the input
            log.exception("internal error while reading the input")
            self.error = f"internal error while reading the input: {exc!r}"
        finally:
            for source in self._inputs:
                source.stream.close()
            self.done.put(None)

    def _finished(self, row: Row, future: Future[DownloadResult]) -> None:
        self.done.put((row, future))

    def _submit(self, row: Row) -> Future[DownloadResult] | None:
        """The future of ``row``'s result; ``None`` if the run is stopping."""
        if row.problem is None:
            try:
                return self._downloader.submit(row.item(), row.filename)
            except Exception as exc:  # the row must still get its result
                if self._stop.is_set():
                    return None  # the Downloader was closed by a stop
                shown = redact_url(row.url)
                log.exception("internal error submitting %s", shown)
                error = FetchError(f"internal error submitting {shown}: {exc!r}", url=shown)
        else:
            error = InvalidURL(row.problem, url=redact_url(row.url))
        # The Downloader never saw this row: the bar must still count it.
        self._progress(ProgressEvent(url=row.url, bytes=0, total=None, state="started"))
        self._progress(ProgressEvent(url=row.url, bytes=0, total=None, state="failed"))
        future: Future[DownloadResult] = Future()
        future.set_result(DownloadResult(url=row.url, path=None, status="failed", error=error))
        return future

    def stop(self) -> None:
        """Submit nothing more."""
        self._stop.set()
        self.slots.release()


class _Relay:
    """The Downloader's progress callback: forwards to the bar, once there is one."""

    bar: TqdmBar | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if self.bar is not None:
            self.bar(event)


class _StopRequest:
    """The first SIGINT or SIGTERM asks the run to stop; a second one exits at once.

    The handler only records the signal and the main loop looks at it between results:
    raising from the handler would land the ``KeyboardInterrupt`` wherever the main
    thread happens to be, half-way through a report line for instance.
    """

    signum: int | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler."""
        if self.signum is not None:
            os.write(2, b"\nfetchpool: interrupted again, exiting now\n")
            os._exit(128 + signum)
        self.signum = signum


@contextlib.contextmanager
def _signals() -> Iterator[_StopRequest]:
    """Install the SIGINT and SIGTERM handlers of a run (from the main thread only)."""
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    saved = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _was_cancelled(result: DownloadResult) -> bool:
    error = result.error
    return isinstance(error, TransferError) and error.cancelled


def _record(row: Row, result: DownloadResult) -> str:
    error = result.error
    record = {
        "url": redact_url(result.url),
        "path": None if result.path is None else str(result.path),
        "status": result.status,
        "bytes": result.bytes,
        "attempts": result.attempts,
        "elapsed": round(result.elapsed, 3),
        "content_type": result.content_type,
        "error_type": None if error is None else type(error).__name__,
        "error": None if error is None else str(error),
        "source": row.source,
    }
    # Only where computed: a run that asks for no hash keeps its lines as they were.
    if result.sha256 is not None:
        record["sha256"] = result.sha256
    if result.md5 is not None:
        record["md5"] = result.md5
    # ASCII with escapes: valid JSON even for input that was not valid UTF-8.
    return json.dumps(record) + "\n"


class _Collector:
    """The main thread's side of a run: finished URLs become report lines and counts."""

    def __init__(self, feeder: _Feeder, report: TextIO | None, bar: TqdmBar | None) -> None:
        self.feeder = feeder
        self.report = report
        self.bar = bar
        self.counts: Counter[str] = Counter()  # statuses, and "stopped"
        self.bytes = 0
        self.failures: list[str] = []
        self.report_error: str | None = None

    def collect(self, stop: _StopRequest) -> bool:
        """Take results until every URL is reported (``True``), a stop is asked for or
        the report cannot be written (``False``)."""
        handled, ended = 0, False
        while not (ended and handled == self.feeder.submitted):
            if stop.signum is not None or self.report_error is not None:
                return False
            try:
                entry = self.feeder.done.get(timeout=_POLL_INTERVAL)
            except queue.Empty:
                continue
            if entry is None:
                ended = True
                if self.bar is not None:
                    self.bar.set_total(self.feeder.submitted)
            else:
                handled += 1
                self.take(*entry)
                self.feeder.slots.release()
        return True

    def drain(self) -> None:
        """Take whatever has arrived, without waiting (the run was stopped)."""
        with contextlib.suppress(queue.Empty):
            while True:
                if (entry := self.feeder.done.get_nowait()) is not None:
                    self.take(*entry, stopping=True)

    def take(self, row: Row, future: Future[DownloadResult], *, stopping: bool = False) -> None:
        """Count and report one finished URL."""
        if future.cancelled():
            return  # never started (the run was stopped): not in the report
        result = future.result()  # a failure is a result, never an exception
        status = "stopped" if stopping and _was_cancelled(result) else result.status
        self.counts[status] += 1
        if status == "downloaded":
            self.bytes += result.bytes
        elif status == "failed" and len(self.failures) < _SHOWN_FAILURES:
            error = result.error
            self.failures.append(
                f"fetchpool: failed ({row.source}): {type(error).__name__}: {error}"
            )
        if self.report is not None:
            try:
                self.report.write(_record(row, result))
                self.report.flush()
            except OSError as exc:
                self.report_error = f"cannot write the report: {exc.strerror or exc}"
                if self.report is sys.stdout:  # no "Exception ignored" for it at exit
                    with contextlib.suppress(OSError, ValueError):
                        devnull = os.open(os.devnull, os.O_WRONLY)
                        os.dup2(devnull, sys.stdout.fileno())
                        os.close(devnull)
                self.report = None

    def lines(self, elapsed: float, interrupted: bool) -> list[str]:
        """The closing lines for stderr: the first failures, then the summary."""
        counts = self.counts
        out = list(self.failures)
        if counts["failed"] > len(self.failures):
            more = counts["failed"] - len(self.failures)
            out.append(f"fetchpool: ... and {more} more failed (--report FILE lists them all)")
        summary = Summary(
            total=counts["downloaded"] + counts["skipped"] + counts["failed"],
            downloaded=counts["downloaded"],
            skipped=counts["skipped"],
            failed=counts["failed"],
            nbytes=self.bytes,
            elapsed=elapsed,
        )
        stopped = f"; {counts['stopped']} stopped unfinished" if counts["stopped"] else ""
        out.append(f"fetchpool: {'interrupted; ' if interrupted else ''}{summary}{stopped}")
        return out


@contextlib.contextmanager
def _logging(verbose: int, with_bar: bool) -> Iterator[None]:
    """Send the ``fetchpool`` logger to stderr for ``-v`` (INFO) and ``-vv`` (DEBUG)."""
    if not verbose:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fetchpool: %(levelname)s: %(message)s"))
    saved = (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.INFO if verbose == 1 else logging.DEBUG)
    log.propagate = False
    redirect: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if with_bar:  # log lines above the bar, not through it
        from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: PLC0415 - optional

        redirect = logging_redirect_tqdm([log])
    try:
        with redirect:
            yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def _make_bar(args: argparse.Namespace) -> TqdmBar | None:
    wanted = args.progress
    if wanted is None:
        wanted = not args.quiet and sys.stderr.isatty()
    if not wanted:
        return None
    try:  # the total is known at once for arguments only, else once the input is read
        return TqdmBar(None if args.input else len(args.urls), open_ended=True)
    except ImportError as exc:
        if args.progress:
            print(f"fetchpool: {exc}", file=sys.stderr)
        return None


def _open(
    args: argparse.Namespace, progress: _Relay
) -> tuple[list[_Input], TextIO | None, Downloader | ShardPool]:
    """Open the inputs, the report and the Downloader, or none of them.

    Raises:
        UsageError: an input cannot be read, the report cannot be written or would
            overwrite an input, or the destination cannot be used.
    """
    with contextlib.ExitStack() as stack:
        inputs = _open_inputs(args.input, args.format, stack)
        report: TextIO | None = None
        if args.report == "-":
            report = sys.stdout
        elif args.report is not None:
            with contextlib.suppress(OSError):
                found = os.stat(args.report)
                for source in inputs:
                    if os.path.samestat(found, os.fstat(source.stream.fileno())):
                        raise UsageError(f"the report {args.report} would overwrite an input")
            try:
                report = stack.enter_context(open(args.report, "w", encoding="utf-8", newline="\n"))
            except OSError as exc:
                raise UsageError(
                    f"cannot write report {args.report}: {exc.strerror or exc}"
                ) from exc
        backend = resolve_backend(args.backend)
        try:
            downloader = (Downloader if args.dask is None else _cluster_pool(args))(
                args.dest,
                args.workers,
                retry=args.retries + 1,
                timeout=args.timeout,
                deadline=args.deadline,
                max_bytes=args.max_bytes,
                overwrite=args.overwrite,
                content_disposition=args.content_disposition,
                allow_downgrade=args.allow_downgrade,
                fsync=args.fsync,
                resume=args.resume,
                verify=None if args.no_verify else "image",
                headers=dict(args.header),
                progress=progress,
                backend=backend,
                per_host=args.per_host,
                rate=args.rate,
                block_private=args.block_private,
                allow_hosts=args.allow_host,
            )
        except (ImportError, ValueError) as exc:
            # ValueError: the options argparse cannot check alone (a proxy in the
            # environment with --block-private, --allow-host without it).
            raise UsageError(str(exc)) from None
        except NotADirectoryError:
            raise UsageError(f"the destination {args.dest} is not a directory") from None
        except OSError as exc:
            raise UsageError(
                f"cannot use the destination {args.dest}: {exc.strerror or exc}"
            ) from exc
        stack.pop_all()
    return inputs, report, downloader


class _ClusterPool(ShardPool):
    """The shards of ``--dask``: closing it closes its client (and local cluster) too."""

    owned: tuple[Any, ...] = ()

    def close(self, cancel: bool = False) -> None:
        """Close the pool, then the client and the cluster it was opened with."""
        try:
            super().close(cancel)
        finally:
            for thing in self.owned:
                with contextlib.suppress(Exception):
                    thing.close()


def _cluster_pool(args: argparse.Namespace) -> Callable[..., _ClusterPool]:
    """Connect to ``--dask`` (or start ``local:N``); return the pool's constructor.

    Raises:
        UsageError: no distributed, a malformed ``local:N``, or no scheduler there.
    """
    try:
        import distributed as dask_distributed  # noqa: PLC0415 - optional, slow to import
    except ImportError:
        raise UsageError("--dask needs distributed: pip install 'fetchpool[dask]'") from None
    # Any: distributed's own annotations leave Client and LocalCluster untyped.
    distributed: Any = dask_distributed
    address: str = args.dask
    owned: list[Any] = []
    try:
        if address.startswith("local:"):
            count = _whole(address.removeprefix("local:"), minimum=1)
            # No worker profiler: see "Running on a cluster" in the README (Python 3.11).
            import dask  # noqa: PLC0415 - present with distributed

            with dask.config.set({"distributed.worker.profile.enabled": False}):
                owned.append(
                    distributed.LocalCluster(
                        n_workers=count,
                        threads_per_worker=1,
                        processes=True,
                        dashboard_address=":0",  # any free port: 8787 may be taken
                        silence_logs=logging.ERROR,
                    )
                )
            client = distributed.Client(owned[0], set_as_default=False)
        else:
            client = distributed.Client(address, timeout=10, set_as_default=False)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"--dask local:N: {exc}") from None
    except (OSError, ValueError) as exc:
        for thing in owned:
            thing.close()
        raise UsageError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    owned.insert(0, client)

    def make(dest: str, workers: int, **options: Any) -> _ClusterPool:
        try:
            pool = _ClusterPool(
                dest, client=client, shard_size=args.shard_size, workers=workers, **options
            )
        except BaseException:
            for thing in owned:
                thing.close()
            raise
        pool.owned = tuple(owned)
        return pool

    return make


def _run(args: argparse.Namespace, stop: _StopRequest) -> int:
    """Download everything; return the exit status.

    Raises:
        UsageError: see :func:`_open`.
    """
    start = time.monotonic()
    relay = _Relay()
    inputs, report, downloader = _open(args, relay)
    window = 2 * args.workers
    if isinstance(downloader, ShardPool):  # the shards that may run, and the one filling
        window = (downloader.window + 1) * downloader.shard_size
    feeder = _Feeder(downloader, _rows(args.urls, inputs), inputs, window, relay)
    relay.bar = _make_bar(args)
    collector = _Collector(feeder, report, relay.bar)
    finished = False
    with _logging(args.verbose, relay.bar is not None):
        log.info("backend: %s", _backend_text(downloader.backend))
        try:
            feeder.start()
            finished = collector.collect(stop)
        finally:
            if finished:
                downloader.close()  # nothing left in flight
            else:
                feeder.stop()
                downloader.close(cancel=True)
                collector.drain()
            if relay.bar is not None:
                relay.bar.close()
            if report is not None:
                with contextlib.suppress(OSError, ValueError):
                    if report is sys.stdout:
                        report.flush()
                    else:
                        report.close()
    messages = [f"fetchpool: error: {m}" for m in (feeder.error, collector.report_error) if m]
    if not args.quiet:
        elapsed = time.monotonic() - start
        messages = collector.lines(elapsed, stop.signum is not None) + messages
    if messages:
        with contextlib.suppress(OSError, ValueError):
            print("\n".join(messages), file=sys.stderr, flush=True)
    if stop.signum is not None:
        return 128 + stop.signum
    if feeder.error is not None:
        return EXIT_USAGE
    return EXIT_FAILED if collector.report_error or collector.counts["failed"] else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fetchpool`` command with ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 when every URL was downloaded or skipped, 1 when any failed,
        2 for a usage error, 130 when interrupted (143 for SIGTERM).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not args.urls and not args.input:
            parser.error("no URLs: give them as arguments or with -i FILE (- for stdin)")
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    with _signals() as stop:
        try:
            return _run(args, stop)
        except UsageError as exc:
            print(f"fetchpool: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
