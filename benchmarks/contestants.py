"""The contestants: Python download loops run in a child process, and external tools.

Every contestant gets the same URL list, the same worker count and a fresh ``dest``, and
saves each URL under its basename (all URLs of a benchmark have distinct basenames), so
one verification pass (sha256 of ``dest/<basename>``) checks them all.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast

import requests

if TYPE_CHECKING:
    from fetchpool.options import DownloadOptions

#: Python contestants, run by :mod:`benchmarks.child` in a process of their own.
PYTHON_CONTESTANTS: Final = (
    "fetchpool",
    "fetchpool-curl",
    "hand-pool",
    "sequential",
    "tutorial-threads",
    "parfive",
)
#: Command-line tools, run directly.
EXTERNAL_CONTESTANTS: Final = ("wget2", "curl", "aria2c")
#: References, not downloaders: run only when named (``--contestants``), in the
#: CPU-bound scenario (``pycurl-floor``: see :func:`benchmarks.budget.floor`).
REFERENCE_CONTESTANTS: Final = ("pycurl-floor",)
#: The scenarios each reference runs in.
REFERENCE_SCENARIOS: Final = {"pycurl-floor": ("cpu-bound",)}
#: What runs when no contestants are named.
DEFAULT_CONTESTANTS: Final = PYTHON_CONTESTANTS + EXTERNAL_CONTESTANTS
ALL_CONTESTANTS: Final = DEFAULT_CONTESTANTS + REFERENCE_CONTESTANTS
#: fetchpool itself, one contestant per transfer backend, and the options each passes
#: (``fetchpool`` passes none: the default backend, requests).
FETCHPOOL_CONTESTANTS: Final[dict[str, dict[str, str]]] = {
    "fetchpool": {},
    "fetchpool-curl": {"backend": "curl"},
}
#: A fetchpool contestant's name + this: ``Downloader.map()`` over a URL generator
#: (the ``peak-rss`` scenario), with that contestant's options.
MAP_SUFFIX: Final = "-map"

DESCRIPTIONS: Final = {
    "fetchpool": "fetchpool.download_all(urls, dest, workers=N), default options "
    "(backend='requests')",
    "fetchpool-curl": "fetchpool.download_all(urls, dest, workers=N, backend='curl') "
    "(pycurl, libcurl's multi interface), default options otherwise",
    "hand-pool": "ThreadPoolExecutor(N), one requests.Session per thread, iter_content(256 KiB)",
    "sequential": "a plain loop, one requests.Session (keep-alive), session.get(url).content",
    "tutorial-threads": "one threading.Thread per URL, requests.get(url).content, joined",
    "parfive": "parfive.Downloader(max_conn=N, max_splits=1) (aiohttp)",
    "wget2": "wget2 --max-threads=N -i urls.txt",
    "curl": "curl --parallel --parallel-immediate --parallel-max N -K config",
    "aria2c": "aria2c -j N -x 1 -s 1 --file-allocation=none -i urls.txt",
    "pycurl-floor": "a reference: one pycurl CurlMulti loop in one thread doing, flatly, the "
    "duties fetchpool has for each file (lock, look, unnamed file, origin xattr, link, "
    "image check, result, future), and no checks (benchmarks/budget.py)",
}

_CHUNK: Final = 256 * 1024
_TIMEOUT: Final = (10.0, 30.0)


def basename(url: str) -> str:
    """Return the file name every contestant saves ``url`` under."""
    return url.split("?", 1)[0].rsplit("/", 1)[-1]


def unavailable(name: str) -> str | None:
    """Return why a contestant cannot run here (``"wget2 not installed"``), or None."""
    if name == "parfive":
        return None if importlib.util.find_spec("parfive") else "parfive not installed"
    if name == "fetchpool-curl":
        if not importlib.util.find_spec("pycurl"):
            return "pycurl not installed"
        return _backend_unavailable(name)
    if name in EXTERNAL_CONTESTANTS:
        return None if shutil.which(name) else f"{name} not installed"
    if name == "pycurl-floor" and not importlib.util.find_spec("pycurl"):
        return "pycurl not installed"
    return None


def fetchpool_options(name: str) -> DownloadOptions:
    """Return the options the fetchpool contestant ``name`` passes to fetchpool."""
    # A cast: the backend names fetchpool's type declares may lag behind the contestants.
    return cast("DownloadOptions", dict(FETCHPOOL_CONTESTANTS[name]))


def _backend_unavailable(name: str) -> str | None:
    """Return why fetchpool refuses the options of ``name`` (its backend), or None.

    Opens (and closes) a ``Downloader`` with them on an empty directory: the backend
    is there when fetchpool accepts the option and the backend starts.
    """
    import fetchpool

    options = fetchpool_options(name)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="fpbench-probe-") as dest,
            fetchpool.Downloader(dest, 1, **options),
        ):
            pass
    except Exception as exc:
        shown = ", ".join(f"{key}={value!r}" for key, value in options.items())
        return f"fetchpool refuses {shown}: {type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------------ Python contestants


def run_fetchpool(urls: list[str], dest: Path, workers: int) -> int:
    """Download with fetchpool's ``download_all``; return the number of failures."""
    from fetchpool import download_all

    results = download_all(urls, dest, workers=workers)
    return len(results.failed)


def run_fetchpool_curl(urls: list[str], dest: Path, workers: int) -> int:
    """Download with ``download_all(..., backend="curl")``; return the number of failures."""
    from fetchpool import download_all

    results = download_all(urls, dest, workers=workers, **fetchpool_options("fetchpool-curl"))
    return len(results.failed)


def run_hand_pool(urls: list[str], dest: Path, workers: int) -> int:
    """Download with the simplest correct requests pool; return the number of failures."""
    local = threading.local()

    def fetch(url: str) -> None:
        session: requests.Session | None = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_maxsize=workers)
            session.mount("http://", adapter)
        with session.get(url, stream=True, timeout=_TIMEOUT) as resp:
            resp.raise_for_status()
            with open(dest / basename(url), "wb") as f:
                for chunk in resp.iter_content(_CHUNK):
                    f.write(chunk)

    failures = 0
    with ThreadPoolExecutor(workers) as pool:
        for fut in [pool.submit(fetch, url) for url in urls]:
            if fut.exception() is not None:
                failures += 1
    return failures


def run_sequential(urls: list[str], dest: Path, workers: int) -> int:
    """Download one URL after another on one keep-alive session (``workers`` unused)."""
    del workers
    failures = 0
    with requests.Session() as session:
        for url in urls:
            try:
                data = session.get(url, timeout=_TIMEOUT).content
            except requests.RequestException:
                failures += 1
                continue
            (dest / basename(url)).write_bytes(data)
    return failures


def run_tutorial_threads(urls: list[str], dest: Path, workers: int) -> int:
    """The tutorial: one thread per URL, ``requests.get(url).content``, joined."""
    del workers
    errors: list[BaseException] = []

    def fetch(url: str) -> None:
        try:
            data = requests.get(url, timeout=_TIMEOUT).content
            name = url.split("/")[-1]  # noqa: PLC0207  (the tutorial's code)
            with open(dest / name, "wb") as f:
                f.write(data)
        except Exception as exc:  # the tutorial's threads would print and forget it
            errors.append(exc)

    threads = [threading.Thread(target=fetch, args=(url,)) for url in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(errors)


def run_parfive(urls: list[str], dest: Path, workers: int) -> int:
    """Download with parfive (asyncio + aiohttp); return the number of failures."""
    import parfive

    downloader = parfive.Downloader(max_conn=workers, max_splits=1, progress=False)
    for url in urls:
        downloader.enqueue_file(url, path=dest, filename=basename(url))
    results = downloader.download()
    return len(results.errors)


def floor_buffer() -> memoryview:
    """Return the random chunk :func:`write_floor` writes (made before the clock starts)."""
    return memoryview(os.urandom(_CHUNK))


def write_floor(sizes: list[int], dest: Path, workers: int, buffer: memoryview) -> int:
    """Write files of these sizes from memory on ``workers`` threads: the I/O floor."""

    def write(index: int) -> None:
        with open(dest / f"{index:06d}", "wb") as f:
            size = sizes[index]
            for start in range(0, size, _CHUNK):
                f.write(buffer[: min(size - start, _CHUNK)])

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(write, range(len(sizes))))
    return 0


def run_pycurl_floor(urls: list[str], dest: Path, workers: int) -> int:
    """The floor of :mod:`benchmarks.budget`; raises where a file fails."""
    from benchmarks.budget import floor

    floor(urls, dest, workers)
    return 0


RUNNERS: Final[dict[str, Callable[[list[str], Path, int], int]]] = {
    "fetchpool": run_fetchpool,
    "fetchpool-curl": run_fetchpool_curl,
    "hand-pool": run_hand_pool,
    "sequential": run_sequential,
    "tutorial-threads": run_tutorial_threads,
    "parfive": run_parfive,
    "pycurl-floor": run_pycurl_floor,
}


def map_urls(base: str, collection: str, count: int, ext: str) -> Iterator[str]:
    """Yield ``count`` URLs of a collection lazily (for the ``map()`` memory test)."""
    for index in range(count):
        yield f"{base}/{collection}/{index:06d}.{ext}"


# --------------------------------------------------------------------- external tools


def external_command(name: str, urls: list[str], dest: Path, workers: int, work: Path) -> list[str]:
    """Build the command line of an external tool; input files go to ``work``."""
    url_file = work / "urls.txt"
    url_file.write_text("".join(f"{url}\n" for url in urls))
    if name == "wget2":
        return [
            "wget2",
            "--quiet",
            "--no-config",
            f"--max-threads={workers}",
            f"--input-file={url_file}",
            f"--directory-prefix={dest}",
        ]
    if name == "curl":
        config = work / "curl.cfg"
        config.write_text(
            "".join(f'url = "{url}"\noutput = "{dest / basename(url)}"\n' for url in urls)
        )
        return [
            "curl",
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            str(min(workers, 300)),
            "--silent",
            "--no-progress-meter",
            "--show-error",
            "--fail",
            "--config",
            str(config),
        ]
    if name == "aria2c":
        return [
            "aria2c",
            f"--input-file={url_file}",
            f"--dir={dest}",
            f"--max-concurrent-downloads={workers}",
            "--max-connection-per-server=1",
            "--split=1",
            "--file-allocation=none",
            "--auto-file-renaming=false",
            "--allow-overwrite=true",
            "--deferred-input=true",
            "--quiet=true",
            "--summary-interval=0",
        ]
    raise ValueError(f"unknown external contestant {name!r}")
