"""Tune retries with a custom ``RetryPolicy`` and see how many attempts each URL took.

Runs offline against fetchpool's loopback image server, whose ``/fail/`` routes answer an
error status a few times before serving the image. Only what can heal is retried (503,
429, ...); ``Retry-After`` is honoured up to ``retry_after_cap`` and a longer one fails at
once; a 404 is requested once. Waits are kept short so the whole run takes about a second.

    python examples/retry_policy.py [--dest DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fetchpool import HTTPStatusError, RetryPolicy, download_all
from fetchpool.testing import ImageServer

POLICY = RetryPolicy(
    attempts=4,  # the first attempt included
    wait_initial=0.05,  # backoff: 0.05 s, 0.1 s, 0.2 s ... up to wait_max
    wait_max=0.2,
    jitter=0.05,  # plus a random 0..0.05 s
    retry_after_cap=2.0,  # honour Retry-After up to 2 s
    budget=10.0,  # at most 10 s per file, attempts and waits together
)

CASES = {
    "/fail/2/503/twice.png": "503 twice, then the image",
    "/fail/1/429/limited.png?retry_after=1": "429 with Retry-After: 1, then the image",
    "/fail/9/503/down.png": "503 every time: gives up after 4 attempts",
    "/fail/1/503/later.png?retry_after=3600": "Retry-After: 3600 is over the cap",
    "/status/404/gone.png": "404 cannot heal: not retried",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, help="directory (default: a temporary one)")
    args = parser.parse_args()

    with (
        ImageServer(n_images=0) as server,
        tempfile.TemporaryDirectory(prefix="fetchpool-retry-") as tmp,
    ):
        urls = [server.url(path) for path in CASES]
        # overwrite="replace": a rerun into the same --dest downloads (and retries) again.
        results = download_all(urls, args.dest or tmp, retry=POLICY, overwrite="replace")
        print(f"{'what the server does':<42} {'attempts':>8} {'seconds':>8}  outcome")
        for what, result in zip(CASES.values(), results, strict=True):
            if isinstance(result.error, HTTPStatusError):
                outcome = f"{type(result.error).__name__} {result.error.status_code}"
            else:
                outcome = result.status if result.error is None else repr(result.error)
            print(f"{what:<42} {result.attempts:>8} {result.elapsed:>8.2f}  {outcome}")
        print(results.summary())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
