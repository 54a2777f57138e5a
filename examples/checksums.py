"""Say what each file must be: ``Item(url, sha256=..., size=...)``, checked while streaming.

Runs offline against fetchpool's loopback image server. A catalogue lists each image's
SHA-256 and size. One server route corrupts its body the first time (the retry heals it),
one entry has a wrong hash (a ``ChecksumError``, nothing saved), and a plain URL string
sits among the items. The second run skips the files that match, hashing them to check.

    python examples/checksums.py [--dest DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fetchpool import ChecksumError, Item, RetryPolicy, download_all
from fetchpool.testing import ImageServer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, help="directory (default: a temporary one)")
    args = parser.parse_args()

    with (
        ImageServer(n_images=0) as server,
        tempfile.TemporaryDirectory(prefix="fetchpool-checksums-") as tmp,
    ):
        dest = args.dest or Path(tmp) / "images"
        good, flaky, wrong = (
            server.url(p) for p in ("/any/a.png", "/corrupt/1/b.jpg", "/any/c.gif")
        )
        catalogue: list[str | Item] = [
            Item(good, sha256=server.expected_sha256(good), size=len(server.expected(good))),
            Item(flaky, sha256=server.expected_sha256(flaky)),  # corrupted once: heals
            Item(wrong, sha256="0" * 64),  # the catalogue is wrong: never saved
            server.url("/any/d.webp"),  # a plain URL: nothing expected
        ]
        quick = RetryPolicy(attempts=3, wait_initial=0.05, jitter=0.05)
        for run in ("first run", "second run"):
            results = download_all(catalogue, dest, workers=4, retry=quick)
            print(f"{run}:")
            for result in results:
                name = result.url.rsplit("/", 1)[-1]
                error = result.error
                if isinstance(error, ChecksumError):
                    what = f"ChecksumError: {error.algorithm} got {str(error.actual)[:12]}..."
                else:
                    what = f"sha256 {result.sha256[:12]}..." if result.sha256 else "no hash asked"
                print(f"  {name:<7} {result.status:<10} attempts={result.attempts}  {what}")
        files = sorted(p.name for p in dest.iterdir())
        print(f"files in dest: {', '.join(files)}")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
