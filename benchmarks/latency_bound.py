"""Latency-bound scenario: fetchpool against the ideal and a hand-written requests pool.

Starts ``fetchpool.testing.ImageServer`` with a per-request latency, then downloads its
images, in one process and on fresh directories, with

- fetchpool's ``download_all``;
- a minimal hand-written ``ThreadPoolExecutor`` + ``requests`` pool (one session per
  thread, streamed to disk): the floor for any requests-based design.

Reports the median of ``--repeat`` runs as ratios: time over the ideal
``ceil(n / workers) * latency`` and fetchpool over the hand-written pool.

    python benchmarks/latency_bound.py --n 500 --workers 32 --latency-ms 100
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import requests

from fetchpool import download_all
from fetchpool.testing import ImageServer


def hand_pool(urls: list[str], dest: str, workers: int) -> int:
    """Download with the simplest correct requests pool; return the number of files."""
    local = threading.local()

    def fetch(index_url: tuple[int, str]) -> None:
        index, url = index_url
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_maxsize=workers)
            session.mount("http://", adapter)
        with session.get(url, stream=True, timeout=(10, 30)) as resp:
            resp.raise_for_status()
            with open(os.path.join(dest, str(index)), "wb") as f:
                for chunk in resp.iter_content(256 * 1024):
                    f.write(chunk)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fetch, enumerate(urls)))
    return len(os.listdir(dest))


def fetchpool_run(urls: list[str], dest: str, workers: int) -> int:
    """Download with fetchpool; return the number of files downloaded."""
    return len(download_all(urls, dest, workers=workers).succeeded)


def timed(fn: Callable[[list[str], str, int], int], urls: list[str], workers: int) -> float:
    with tempfile.TemporaryDirectory(prefix="fetchpool-bench-") as dest:
        start = time.perf_counter()
        count = fn(urls, dest, workers)
        elapsed = time.perf_counter() - start
    if count != len(urls):
        sys.exit(f"{fn.__name__}: {count} of {len(urls)} files")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    latency = args.latency_ms / 1000
    ideal = math.ceil(args.n / args.workers) * latency
    with ImageServer(n_images=args.n, latency=latency) as server:
        urls = server.urls
        timed(fetchpool_run, urls[: args.workers], args.workers)  # warm caches
        hand, fp = [], []
        for _ in range(args.repeat):
            hand.append(timed(hand_pool, urls, args.workers))
            fp.append(timed(fetchpool_run, urls, args.workers))
    h, f = statistics.median(hand), statistics.median(fp)
    print(f"n={args.n} workers={args.workers} latency={args.latency_ms:g}ms ideal={ideal:.3f}s")
    print(f"hand-written pool: {h:.3f}s  ({h / ideal:.2f}x ideal)")
    print(f"fetchpool:         {f:.3f}s  ({f / ideal:.2f}x ideal, {f / h:.3f}x hand pool)")
    print(f"latency_bound fetchpool_vs_ideal={f / ideal:.3f} fetchpool_vs_hand={f / h:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
