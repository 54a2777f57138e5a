"""Per-host limits: what they cost when they bind nothing, and what they keep when they do.

Three measurements, on each backend, against servers started here on 127.0.0.1 (each
``ImageServer`` on its own port is a host of its own):

1. **Cost.** 2,000 small images from one host with 16 workers: ``per_host=1000`` (the
   limits on, binding nothing) against no limits, rounds interleaved. The limits off
   run strictly less code than this, so the ratio bounds what they cost when off.
2. **Shares.** 32 workers, 4 hosts with 20/40/60/80 ms latency and 64 images each,
   interleaved, ``per_host=4``: each host gets 4 workers, so the run can end no sooner
   than the slowest host's share: its 64 URLs alone on 4 workers, measured in the same
   rounds (``ceil(64 / 4) * 80 ms`` plus the time each takes here); the ratio says how
   close the whole run comes to it.
3. **A slow host among fast ones.** 16 workers, 90 % of 400 URLs on a host answering in
   200 ms and 10 % on one answering at once, all of the slow host's first: when the
   fast host's last file arrives, with ``per_host=4`` and without.

    python -m benchmarks.per_host [--repeat 3] [--backend requests --backend curl]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import as_completed
from contextlib import ExitStack
from typing import Any

from fetchpool import Downloader, download_all
from fetchpool.testing import ImageServer


def _timed(urls: list[str], workers: int, **options: Any) -> float:
    with tempfile.TemporaryDirectory(prefix="fetchpool-bench-") as dest:
        start = time.perf_counter()
        results = download_all(urls, dest, workers=workers, **options)
        elapsed = time.perf_counter() - start
    if results.failed:
        raise SystemExit(f"{len(results.failed)} failed: {results.failed[0].error}")
    return elapsed


def _rounds(repeat: int, *runs: Callable[[], float]) -> list[list[float]]:
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeat):
        for i, run in enumerate(runs):
            times[i].append(run())
    return times


def cost(backend: str, repeat: int) -> str:
    """The limits on but binding nothing, against off, rounds interleaved."""
    with ImageServer(n_images=0) as server:
        urls = [server.url(f"/big/{i}.png?size=16384") for i in range(2000)]
        _timed(urls[:200], 16, backend=backend)  # warm up
        off, on = _rounds(
            repeat,
            lambda: _timed(urls, 16, backend=backend),
            lambda: _timed(urls, 16, backend=backend, per_host=1000),
        )
    ratios = [b / a for a, b in zip(off, on, strict=True)]
    return (
        f"cost     {backend:8} off {statistics.median(off):.3f}s  "
        f"on {statistics.median(on):.3f}s  on/off per round {statistics.median(ratios):.3f} "
        f"({', '.join(f'{r:.3f}' for r in ratios)})"
    )


def shares(backend: str, repeat: int) -> str:
    """32 workers on 4 hosts of different latency, per_host=4, against the slowest share.

    The share is measured too: the slowest host's URLs alone with 4 workers, rounds
    interleaved, in this process (its server shares the GIL with the client).
    """
    latencies = (0.02, 0.04, 0.06, 0.08)
    per_host, n = 4, 64
    with ExitStack() as stack:
        servers = [stack.enter_context(ImageServer(n_images=0, latency=lat)) for lat in latencies]
        urls = [s.url(f"/big/{i}.png?size=16384") for i in range(n) for s in servers]
        slowest = [servers[-1].url(f"/big/{i}.png?size=16384") for i in range(n)]
        ideal = max(math.ceil(n / per_host) * lat for lat in latencies)
        times, alone = _rounds(
            repeat,
            lambda: _timed(urls, 32, backend=backend, per_host=per_host),
            lambda: _timed(slowest, per_host, backend=backend),
        )
        peaks = [s.peak_concurrency for s in servers]
    best, share = statistics.median(times), statistics.median(alone)
    ratios = [a / b for a, b in zip(times, alone, strict=True)]
    return (
        f"shares   {backend:8} {best:.3f}s; the slowest host alone with {per_host} workers "
        f"{share:.3f}s (ideal {ideal:.3f}s); all / slowest alone per round "
        f"{statistics.median(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)}); "
        f"peak per host {peaks}"
    )


def _fast_done_at(urls: list[str], fast: set[str], workers: int, **options: Any) -> float:
    with tempfile.TemporaryDirectory(prefix="fetchpool-bench-") as dest:
        start = time.perf_counter()
        left = set(fast)
        with Downloader(dest, workers=workers, **options) as dl:
            futures = [dl.submit(u) for u in urls]
            for future in as_completed(futures):
                left.discard(future.result().url)
                if not left:
                    done = time.perf_counter() - start
                    for f in futures:
                        f.cancel()
                    dl.close(cancel=True)
                    break
    return done


def slow_host(backend: str, repeat: int) -> str:
    """When the fast host's last file is in, with 90 % of the list on a slow host."""
    with ImageServer(n_images=0, latency=0.2) as slow, ImageServer(n_images=0) as fast:
        slow_urls = [slow.url(f"/big/{i}.png?size=16384") for i in range(360)]
        fast_urls = [fast.url(f"/big/{i}.png?size=16384") for i in range(40)]
        urls = slow_urls + fast_urls
        without, limited = _rounds(
            repeat,
            lambda: _fast_done_at(urls, set(fast_urls), 16, backend=backend),
            lambda: _fast_done_at(urls, set(fast_urls), 16, backend=backend, per_host=4),
        )
    a, b = statistics.median(without), statistics.median(limited)
    return (
        f"slowhost {backend:8} fast host done at {a:.3f}s without limits, "
        f"{b:.3f}s with per_host=4 ({a / b:.1f}x sooner)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", action="append", choices=("requests", "curl"))
    args = parser.parse_args()
    for backend in args.backend or ["requests", "curl"]:
        print(cost(backend, args.repeat), flush=True)
        print(shares(backend, args.repeat), flush=True)
        print(slow_host(backend, args.repeat), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
