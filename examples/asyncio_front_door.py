"""fetchpool from asyncio: ``await`` the downloads, cancel them by cancelling the task.

Runs offline against fetchpool's loopback image server, in three steps:

1. ``await fetchpool.aio.download_all(...)``: every result, a 404 as a typed error;
2. ``async for result in dl.map(...)`` over an async generator, in input order;
3. a download cut short by ``asyncio.wait_for``: the task is cancelled, the transfer
   stops and leaves no file, and the event loop kept running all along (a heartbeat).

    python examples/asyncio_front_door.py [--dest DIR] [--workers 8]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import fetchpool.aio
from fetchpool import HTTPStatusError
from fetchpool.testing import ImageServer


async def heartbeat(ticks: list[int]) -> None:
    """Tick every 10 ms: it would stop if anything blocked the event loop."""
    while True:
        await asyncio.sleep(0.01)
        ticks[0] += 1


async def main_async(server: ImageServer, dest: Path, workers: int) -> int:
    ticks = [0]
    beat = asyncio.create_task(heartbeat(ticks))

    # 1. One call, every result in input order; failures are results, not exceptions.
    urls = [*server.urls[:5], server.url("/status/404/missing.png")]
    results = await fetchpool.aio.download_all(urls, dest / "all", workers=workers)
    print(f"download_all: {results.summary()}")
    for failure in results.failed:
        error = failure.error
        code = error.status_code if isinstance(error, HTTPStatusError) else ""
        print(f"  failed: {failure.url.rsplit('/', 1)[-1]}: {type(error).__name__} {code}")

    # 2. A Downloader fed by an async generator, results in input order as they come.
    async def discovered() -> AsyncIterator[str]:
        for i, delay in enumerate((0.3, 0.0, 0.1)):
            await asyncio.sleep(0)  # as if each URL came from an async source
            yield server.url(f"/slow/photo{i}.jpg?delay={delay}")

    async with fetchpool.aio.Downloader(dest / "map", workers=workers) as dl:
        print("map over an async generator, in input order:")
        async for result in dl.map(discovered()):
            name = result.path.name if result.path is not None else result.url
            print(f"  {name:<12} {result.status}")

        # 3. Cancelling the awaiting task stops its download where it is: leaving the
        # block then has nothing to wait for (the drip would take minutes).
        slow = server.url("/drip/big-photo.png?interval=0.05")
        try:
            await asyncio.wait_for(dl.submit(slow), timeout=0.5)
        except asyncio.TimeoutError:
            print("big-photo.png: cancelled by wait_for after 0.5 s, its transfer stopped")
    left = sorted(p.name for p in (dest / "map").iterdir())
    clean = "big-photo.png" not in left and not any(n.startswith(".fetchpool-") for n in left)
    what = "no big-photo.png, no temporary file" if clean else "NOT CLEAN"
    print(f"files left: {', '.join(left)} ({what})")

    beat.cancel()
    print(f"heartbeat: the event loop ticked {ticks[0]} times meanwhile (every 10 ms)")
    return 0 if clean and len(results.failed) == 1 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, help="directory (default: a temporary one)")
    parser.add_argument("--workers", type=int, default=8, help="threads (default 8)")
    args = parser.parse_args()
    with (
        ImageServer(n_images=5) as server,
        tempfile.TemporaryDirectory(prefix="fetchpool-aio-") as tmp,
    ):
        return asyncio.run(main_async(server, args.dest or Path(tmp), args.workers))


if __name__ == "__main__":
    raise SystemExit(main())
