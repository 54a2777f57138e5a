"""Waits that hold no worker: 100 URLs that each fail once, with fewer workers than URLs.

Each URL answers 503 once and then the image, so every download waits out one backoff
(the default policy: 0.5 s plus up to 1 s of jitter). If a waiting download held its
worker, 32 workers would run the 100 in about four rounds of waits; if not, they take
about as long as 100 workers do, one round. Reported per backend: the median of
``--repeat`` rounds (interleaved) and the ratio 32 workers / 100 workers per round,
which the issue wants at 1.3 or below.

    python -m benchmarks.flaky_waits [--repeat 3] [--backend requests --backend curl]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time

from fetchpool import download_all
from fetchpool.options import Backend
from fetchpool.testing import ImageServer

_round = itertools.count()


def _run(server: ImageServer, workers: int, backend: Backend, n: int) -> float:
    number = next(_round)
    urls = [server.url(f"/fail/1/503/r{number}-{i}.png") for i in range(n)]
    with tempfile.TemporaryDirectory(prefix="fetchpool-bench-") as dest:
        start = time.perf_counter()
        results = download_all(urls, dest, workers=workers, backend=backend)
        elapsed = time.perf_counter() - start
    if results.failed or any(r.attempts != 2 for r in results):
        raise SystemExit(f"unexpected results: {results.summary()}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--backend", action="append", choices=("requests", "curl"))
    args = parser.parse_args()
    with ImageServer(n_images=0) as server:
        backends: list[Backend] = args.backend or ["requests", "curl"]
        for backend in backends:
            few, many = [], []
            for _ in range(args.repeat):
                few.append(_run(server, 32, backend, args.n))
                many.append(_run(server, args.n, backend, args.n))
            ratios = [a / b for a, b in zip(few, many, strict=True)]
            print(
                f"{backend:8} {args.n} flaky URLs: 32 workers {statistics.median(few):.3f}s, "
                f"{args.n} workers {statistics.median(many):.3f}s, ratio per round "
                f"{statistics.median(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
