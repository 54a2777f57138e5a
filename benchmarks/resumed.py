"""The big-file scenario, resumed: cut at 50 %, rerun with ``resume=True``.

Starts ``fetchpool.testing.ImageServer`` and, on each backend, with dest on tmpfs:

- downloads ``/big/`` whole (the reference time);
- downloads ``/cut/`` (the same kind of body, its first answer cut at 50 %) with
  ``retry=1, resume=True``: it fails, its partial file stays;
- runs it again with ``resume=True``: only the rest is asked for.

Reports the body bytes the server sent in the second run (exact: counted by the
server) over the body's size, and its time over the full download's (indicative: the
server is Python, and shares the machine).

    python -m benchmarks.resumed --size-mib 128 --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

from fetchpool import download_all
from fetchpool.options import BACKENDS, Backend
from fetchpool.testing import ImageServer

TMPFS = "/dev/shm"


@dataclass(frozen=True)
class Resumed:
    """One backend's figures (times are medians)."""

    backend: str
    size: int
    full_seconds: float
    resumed_seconds: float
    #: Body bytes sent in the second (resumed) run.
    resumed_bytes: int

    @property
    def bytes_ratio(self) -> float:
        return self.resumed_bytes / self.size

    @property
    def time_ratio(self) -> float:
        return self.resumed_seconds / self.full_seconds


def _timed_download(
    url: str, dest: str, backend: Backend, *, retry: int = 4, resume: bool = False
) -> float:
    """Download ``url`` into ``dest``; return the seconds it took (a failure ends the
    program, unless ``retry=1``: the cut run is meant to fail)."""
    start = time.perf_counter()
    result = download_all(
        [url],
        dest,
        backend=backend,
        verify=None,
        retry=retry,
        resume=resume,
    )[0]
    elapsed = time.perf_counter() - start
    if not result.ok and retry != 1:
        sys.exit(f"{backend}: {url}: {result.error}")
    return elapsed


def measure(server: ImageServer, backend: Backend, size: int, repeat: int, run: int) -> Resumed:
    """Measure ``backend`` ``repeat`` times on a body of about ``size`` bytes."""
    full, resumed, sent = [], [], []
    with tempfile.TemporaryDirectory(prefix="fetchpool-bench-", dir=TMPFS) as dest:
        _timed_download(server.url(f"/big/warm-{backend}.png?size=100000"), dest, backend)
    for index in range(repeat):
        big = f"/big/bench.png?size={size}"
        # The same body; a fresh cut for each run (the server counts requests per URL).
        cut = f"/cut/bench.png?size={size}&cuts=1&at=0.5&run={backend}-{run}-{index}"
        with tempfile.TemporaryDirectory(prefix="fetchpool-bench-", dir=TMPFS) as dest:
            full.append(_timed_download(server.url(big), dest, backend))
        with tempfile.TemporaryDirectory(prefix="fetchpool-bench-", dir=TMPFS) as dest:
            _timed_download(server.url(cut), dest, backend, retry=1, resume=True)
            before = server.bytes_served(cut)
            resumed.append(_timed_download(server.url(cut), dest, backend, resume=True))
            sent.append(server.bytes_served(cut) - before)
    body = len(server.expected(f"/big/bench.png?size={size}"))
    return Resumed(backend, body, statistics.median(full), statistics.median(resumed), max(sent))


def main(argv: list[str] | None = None) -> int:
    """Run the resumed big-file scenario on every backend and print the figures."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=128, help="the body (at most 256)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", action="append", choices=BACKENDS)
    args = parser.parse_args(argv)
    size = args.size_mib * 1024 * 1024
    with ImageServer(n_images=0) as server:
        server.expected(f"/big/bench.png?size={size}")  # made once (and cached): not timed
        for run, backend in enumerate(args.backend or BACKENDS):
            figures = measure(server, backend, size, args.repeat, run)
            print(
                f"resumed big file ({backend}): {figures.size / 2**20:.0f} MiB body; "
                f"second run sent {figures.resumed_bytes:,} bytes "
                f"({figures.bytes_ratio:.1%} of the body) in {figures.resumed_seconds:.3f} s "
                f"vs {figures.full_seconds:.3f} s for a full download "
                f"(time ratio {figures.time_ratio:.2f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
