"""Download a batch of images from a local test server and print the summary.

Runs offline: it starts fetchpool's own loopback image server (``fetchpool.testing``)
with 100 ms of latency per request, downloads its images with ``download_all`` and
checks every file against the server's sha256.

    python examples/quickstart.py [--n 100] [--workers 16] [--latency-ms 100]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

from fetchpool import download_all
from fetchpool.testing import ImageServer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="number of images (default 100)")
    parser.add_argument("--workers", type=int, default=16, help="threads (default 16)")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="per request (100)")
    parser.add_argument("--dest", type=Path, help="directory (default: a temporary one)")
    args = parser.parse_args()

    with (
        ImageServer(n_images=args.n, latency=args.latency_ms / 1000) as server,
        tempfile.TemporaryDirectory(prefix="fetchpool-quickstart-") as tmp,
    ):
        dest = args.dest or Path(tmp)
        results = download_all(server.urls, dest, workers=args.workers)
        correct = sum(
            1
            for r in results
            if r.path is not None
            and hashlib.sha256(r.path.read_bytes()).hexdigest() == server.expected_sha256(r.url)
        )
        print(results.summary())
        for failure in results.failed:
            print(f"  failed: {failure.url}: {failure.error}")
        print(f"{correct}/{len(results)} files match the server's sha256")
        return 0 if correct == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
