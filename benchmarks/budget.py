"""The per-file budget of the CPU-bound scenario: where the curl backend's time goes.

Three runs over the same 2,000 x 16 KiB files from the benchmark server, into tmpfs
(``/dev/shm`` where there is one), 16 transfers at once, interleaved for ``--repeat``
rounds:

- ``bare``: a bare ``pycurl.CurlMulti`` loop in one thread, each body into a named file,
  moved to its final name with ``os.replace``: libcurl and the files, nothing else;
- ``floor``: the same loop doing, flatly, what fetchpool must do for each file: its lock
  (a byte lock on a lock file), a look at the final name, an unnamed temporary file
  written, its origin xattr set, linked at the final name, the image signature checked, a
  ``DownloadResult`` and a completed ``Future``. No validation, claims, retries, limits or
  errors: less than fetchpool may do, so a floor (``python -m benchmarks --contestants
  pycurl-floor,...`` runs it in the CPU-bound scenario too);
- ``helpers``: the same loop calling fetchpool's own helpers for those duties and for its
  checks (URL validation, naming and claims, the lock, the head's parsing, the store, the
  result): what fetchpool's pipeline, transport objects and loop cost beyond them;
- ``fetchpool-curl``: ``download_all(urls, dest, workers=16, backend="curl")``.

Reported: the median seconds and CPU µs per file of each, and fetchpool's ratios to both.
What the floor costs over the bare loop is what the duties cost; what the helpers cost over
the floor, fetchpool's checks; what fetchpool costs over the helpers, its layers.

    python -m benchmarks.budget [--repeat 5] [--files 2000]
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pycurl

from fetchpool import DownloadResult, download_all
from fetchpool.backends.curl import _parse_head
from fetchpool.claims import Claims
from fetchpool.naming import name_from_url, origin_url, redact_url, validate_url
from fetchpool.sniff import SNIFF_BYTES, sniff_image
from fetchpool.storage import PathLock, inspect_target, lock_key, store_whole
from fetchpool.transfer import content_length, request_headers

from .harness import ServerProcess

_WORKERS = 16
_ORIGIN_XATTR = "user.xdg.origin.url"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _drive(
    urls: list[str],
    start: Callable[[pycurl.Curl, int, str], None],
    done: Callable[[pycurl.Curl], None],
    workers: int = _WORKERS,
) -> None:
    """Run every URL through one CurlMulti, ``workers`` at once."""
    multi = pycurl.CurlMulti()
    free = [pycurl.Curl() for _ in range(workers)]
    queue = list(enumerate(urls))
    queue.reverse()
    active = 0
    while True:
        while free and queue:
            index, url = queue.pop()
            easy = free.pop()
            start(easy, index, url)
            multi.add_handle(easy)
            active += 1
        if not active:
            break
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        while True:
            queued, ok, failed = multi.info_read()
            for easy in ok:
                multi.remove_handle(easy)
                done(easy)
                free.append(easy)
                active -= 1
            if failed:
                raise SystemExit(f"transfer failed: {failed[0][2]}")
            if not queued:
                break
        if active and not queue:
            multi.select(1.0)
        elif active:
            multi.select(0.0)
    for easy in free:
        easy.close()
    multi.close()


def bare(urls: list[str], dest: Path) -> None:
    """Bodies into named files, then ``os.replace``: libcurl and the files alone."""

    def start(easy: pycurl.Curl, index: int, url: str) -> None:
        part = dest / f".{index}.part"
        file = open(part, "wb")  # noqa: SIM115 - closed in done()
        easy.setopt(pycurl.URL, url)
        easy.setopt(pycurl.WRITEDATA, file)
        easy.job = (file, part, dest / f"{index}.img")

    def done(easy: pycurl.Curl) -> None:
        file, part, final = easy.job
        file.close()
        os.replace(part, final)

    _drive(urls, start, done)


def floor(urls: list[str], dest: Path, workers: int = _WORKERS) -> None:
    """The bare loop with fetchpool's duties for each file, written flat (also the
    ``pycurl-floor`` contestant of ``python -m benchmarks``)."""
    lock_fd = os.open(dest / ".locks", os.O_RDWR | os.O_CREAT, 0o666)
    directory = str(dest)
    futures: list[Future[DownloadResult]] = []

    def start(easy: pycurl.Curl, index: int, url: str) -> None:
        name = url.rsplit("/", 1)[-1]
        path = dest / name
        key = hashlib.sha256(name.encode()).hexdigest()[:20]
        offset = 1 + int(key[:15], 16)
        fcntl.lockf(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        try:
            os.lstat(path)
        except FileNotFoundError:
            pass
        lines: list[bytes] = []
        chunks: list[bytes] = []
        easy.setopt(pycurl.URL, url)
        easy.setopt(pycurl.HTTPHEADER, ["Accept-Encoding: identity"])
        easy.setopt(pycurl.HEADERFUNCTION, lines.append)
        easy.setopt(pycurl.WRITEFUNCTION, chunks.append)
        future: Future[DownloadResult] = Future()
        futures.append(future)
        easy.job = (url, path, offset, lines, chunks, future, time.monotonic())

    def done(easy: pycurl.Curl) -> None:
        url, path, offset, lines, chunks, future, began = easy.job
        body = b"".join(chunks)
        content_type = None
        for line in lines:
            if line[:13].lower() == b"content-type:":
                content_type = line[13:].strip().decode("latin-1")
        if sniff_image(body[:32]) is None:
            raise SystemExit(f"not an image: {url}")
        fd = os.open(directory, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o666)
        os.write(fd, body)
        os.setxattr(fd, _ORIGIN_XATTR, url.encode())
        os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=fd, follow_symlinks=True)
        os.close(fd)
        fcntl.lockf(lock_fd, fcntl.LOCK_UN, 1, offset)
        future.set_result(
            DownloadResult._downloaded(
                url, path, len(body), 1, time.monotonic() - began, content_type
            )
        )

    _drive(urls, start, done, workers)
    os.close(lock_fd)
    if not all(f.result().ok for f in futures):
        raise SystemExit("a result failed")


def helpers(urls: list[str], dest: Path) -> None:
    """The bare loop calling fetchpool's own per-file helpers, flatly: the floor's duties
    done by the code fetchpool runs for them (URL checks, naming and claims, the lock, the
    head's parsing, the express lane's checks, the store, the result), without its
    pipeline, its transport's objects and its loop."""
    claims = Claims(remember=False)
    futures: list[Future[DownloadResult]] = []
    headers = [f"{name}: {value}" for name, value in request_headers({}, False).items()]

    def start(easy: pycurl.Curl, index: int, url: str) -> None:
        valid = validate_url(url)
        origin = origin_url(valid)
        shown = redact_url(valid)
        path = claims.url_name(dest, name_from_url(valid), valid, origin, look=False)
        lock = PathLock(dest, lock_key(path), None, shown)
        if not lock.acquire(blocking=False) or inspect_target(path).kind != "none":
            raise SystemExit(f"busy or taken: {path}")
        lines: list[bytes] = []
        chunks: list[bytes] = []
        easy.setopt(pycurl.URL, url)
        easy.setopt(pycurl.HTTPHEADER, headers)
        easy.setopt(pycurl.HEADERFUNCTION, lines.append)
        easy.setopt(pycurl.WRITEFUNCTION, chunks.append)
        future: Future[DownloadResult] = Future()
        futures.append(future)
        easy.job = (valid, origin, shown, path, lock, lines, chunks, future, time.monotonic())

    def done(easy: pycurl.Curl) -> None:
        valid, origin, shown, path, lock, lines, chunks, future, began = easy.job
        status, _, head = _parse_head(lines[: lines.index(b"\r\n")])
        length = content_length(head, shown)
        body = b"".join(chunks)
        if status != 200 or length != len(body) or sniff_image(body[:SNIFF_BYTES]) is None:
            raise SystemExit(f"not a plain image: {valid}")
        recorded = store_whole(dest, lock.key, shown, body, path, origin)
        lock.release()
        claims.release(path, origin, keep=not recorded)
        future.set_result(
            DownloadResult._downloaded(
                valid, path, len(body), 1, time.monotonic() - began, head.get("Content-Type")
            )
        )

    _drive(urls, start, done)
    if not all(f.result().ok for f in futures):
        raise SystemExit("a result failed")


def fetchpool_curl(urls: list[str], dest: Path) -> None:
    """The curl backend, default options."""
    results = download_all(urls, dest, workers=_WORKERS, backend="curl")
    if results.failed:
        raise SystemExit(f"unexpected results: {results.summary()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--files", type=int, default=2000)
    args = parser.parse_args()
    n = args.files
    config = {
        "latency": 0,
        "collections": [
            {"name": "img", "count": n, "distinct": n, "size": 16384, "kind": None, "seed": 0}
        ],
    }
    runs = {"bare": bare, "floor": floor, "helpers": helpers, "fetchpool-curl": fetchpool_curl}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with ServerProcess(config) as server:
        urls = [url for url, _, _ in server.urls("img", n)]
        with tempfile.TemporaryDirectory(dir=base) as warm:
            fetchpool_curl(urls[:50], Path(warm))
        for _ in range(args.repeat):
            for name, run in runs.items():
                with tempfile.TemporaryDirectory(dir=base, prefix="fetchpool-budget-") as d:
                    c0, t0 = _cpu(), time.perf_counter()
                    run(urls, Path(d))
                    t1, c1 = time.perf_counter(), _cpu()
                    if len(os.listdir(d)) < n:
                        raise SystemExit(f"{name}: files missing")
                seconds[name].append(t1 - t0)
                cpu[name].append(c1 - c0)
    for name in runs:
        print(
            f"{name:15} {statistics.median(seconds[name]):.3f} s, "
            f"{1e6 * statistics.median(cpu[name]) / n:.0f} µs CPU a file"
        )
    for other in ("bare", "floor", "helpers"):
        ratios = [a / b for a, b in zip(seconds["fetchpool-curl"], seconds[other], strict=True)]
        print(
            f"fetchpool-curl / {other}: {statistics.median(ratios):.2f} "
            f"(per round {', '.join(f'{r:.2f}' for r in ratios)})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
