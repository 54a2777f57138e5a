"""Handle each download the moment it finishes: ``Downloader.submit`` + ``as_completed``.

Runs offline against fetchpool's loopback image server. The images arrive after different
delays, so they complete out of submission order; one URL answers 404 and arrives as a
failed result carrying a typed error, not as an exception.

    python examples/stream_as_completed.py [--dest DIR] [--workers 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import as_completed
from pathlib import Path

from fetchpool import Downloader, HTTPStatusError
from fetchpool.testing import ImageServer

DELAYS = (0.4, 0.1, 0.3, 0.0, 0.2)  # seconds before each /slow/ image is answered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, help="directory (default: a temporary one)")
    parser.add_argument("--workers", type=int, default=8, help="threads (default 8)")
    args = parser.parse_args()

    with (
        ImageServer(n_images=0) as server,
        tempfile.TemporaryDirectory(prefix="fetchpool-stream-") as tmp,
    ):
        urls = [server.url(f"/slow/photo{i}.jpg?delay={d}") for i, d in enumerate(DELAYS)]
        urls.insert(2, server.url("/status/404/missing.png"))
        start = time.perf_counter()
        with Downloader(args.dest or Path(tmp), workers=args.workers) as dl:
            futures = {dl.submit(url): n for n, url in enumerate(urls)}
            print(f"submitted {len(futures)} URLs; results as they complete:")
            for future in as_completed(futures):
                result = future.result()  # never raises for a failed download
                when = f"{time.perf_counter() - start:5.2f}s  #{futures[future]}"
                if result.ok and result.path is not None:
                    print(f"{when}  {result.status:<10}  {result.path.name}  {result.bytes} B")
                elif isinstance(result.error, HTTPStatusError):
                    name = type(result.error).__name__
                    print(f"{when}  failed      {name} {result.error.status_code}: {result.url}")
                else:
                    print(f"{when}  failed      {result.error!r}")
        failed = sum(1 for f in futures if not f.result().ok)
        print(f"{len(futures) - failed} ok, {failed} failed")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
