"""Run one Python contestant in this (fresh) process and write its timing as JSON.

``python -m benchmarks.child SPEC_JSON_FILE``. The spec names the contestant, the URL
file, ``dest`` and ``workers``, and where to write the result: the seconds spent in the
download call alone (interpreter start and imports excluded), the CPU time (user and
system, all threads) spent in it, failures reported by the contestant, and this
process's peak RSS (``VmHWM``) and RSS before the call.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.contestants import (
    FETCHPOOL_CONTESTANTS,
    MAP_SUFFIX,
    RUNNERS,
    fetchpool_options,
    floor_buffer,
    map_urls,
    write_floor,
)

#: The module of each fetchpool backend, loaded on first use: imported before the clock.
_BACKEND_MODULES = {"requests": "fetchpool.backends.requests", "curl": "fetchpool.backends.curl"}


def memory_kib(field: str) -> int:
    """Read a ``/proc/self/status`` field such as ``VmHWM`` in KiB (0 if unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds() -> float:
    """This process's CPU time so far, user and system, all threads."""
    times = os.times()
    return times.user + times.system


def run_map(spec: dict[str, Any], dest: Path, contestant: str) -> tuple[float, int]:
    """Drive ``Downloader.map()`` over a URL generator; return (seconds, failures).

    ``contestant`` is the fetchpool contestant whose options the ``Downloader`` gets.
    """
    from fetchpool import Downloader

    failures = 0
    urls = map_urls(spec["base"], spec["collection"], int(spec["count"]), spec["ext"])
    with Downloader(dest, int(spec["workers"]), **fetchpool_options(contestant)) as dl:
        start = time.perf_counter()
        for result in dl.map(urls):
            failures += not result.ok
        seconds = time.perf_counter() - start
    return seconds, failures


def main(argv: list[str]) -> int:
    """Entry point; see the module docstring."""
    spec: dict[str, Any] = json.loads(Path(argv[0]).read_text())
    dest = Path(spec["dest"])
    name = spec["contestant"]
    # Every contestant pays the same imports before the clock starts.
    import requests  # noqa: F401

    import fetchpool  # noqa: F401

    if name == "parfive":
        import parfive  # noqa: F401  (aiohttp's import time is not download time)
    if name == "pycurl-floor":
        import benchmarks.budget  # noqa: F401  (pycurl's and fetchpool's helpers)

    fetchpool_name = name.removesuffix(MAP_SUFFIX)
    if fetchpool_name in FETCHPOOL_CONTESTANTS:
        backend = FETCHPOOL_CONTESTANTS[fetchpool_name].get("backend", "requests")
        if backend == "curl":
            import pycurl  # noqa: F401  (libcurl's load time is not download time)
        # fetchpool loads a backend when a Downloader first uses it.
        importlib.import_module(_BACKEND_MODULES[backend])

    baseline = memory_kib("VmRSS")
    cpu = cpu_seconds()
    if name.endswith(MAP_SUFFIX) and fetchpool_name in FETCHPOOL_CONTESTANTS:
        seconds, failures = run_map(spec, dest, fetchpool_name)
    else:
        urls = Path(spec["urls_file"]).read_text().split()
        buffer = floor_buffer()
        start = time.perf_counter()
        if name == "write-floor":
            failures = write_floor(list(spec["sizes"]), dest, int(spec["workers"]), buffer)
        else:
            failures = RUNNERS[name](urls, dest, int(spec["workers"]))
        seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds() - cpu,
        "failures": failures,
        "vmhwm_kib": memory_kib("VmHWM"),
        "baseline_rss_kib": baseline,
    }
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
