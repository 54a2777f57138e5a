"""fetchpool.aio: the asyncio front door over the thread-pool Downloader.

Each test runs its coroutine with ``asyncio.run`` against the loopback ImageServer, on
each backend. The loop must never block (a heartbeat keeps ticking while downloads
wait), and cancelling an awaiting task must cancel the downloads it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import fetchpool.aio
from _support import held_locks, listing, temp_files
from fetchpool import DownloadResult, Item, ProgressEvent, TransferError, download_all
from fetchpool.testing import ImageServer

pytestmark = pytest.mark.usefixtures("each_backend")

T = TypeVar("T")


@pytest.fixture
def server() -> Iterator[ImageServer]:
    with ImageServer(n_images=12) as s:
        yield s


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Wait, without blocking the loop, until ``predicate()`` holds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


class Heartbeat:
    """A coroutine that ticks every 10 ms while it runs: it stops if the loop blocks."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self.ticks += 1

    async def __aenter__(self) -> Heartbeat:
        self._task = asyncio.create_task(self._beat())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def flowing_progress() -> tuple[asyncio.Event, Callable[[ProgressEvent], None]]:
    """An event set once a body flows, and the progress callback that sets it.

    The callback slows each block a little: an endless body stays a small file.
    """
    loop = asyncio.get_running_loop()
    flowing = asyncio.Event()

    def progress(event: ProgressEvent) -> None:
        if event.state == "progress":
            if not flowing.is_set():
                loop.call_soon_threadsafe(flowing.set)
            time.sleep(0.002)

    return flowing, progress


async def cancel_mid_body(task: asyncio.Task[Any], flowing: asyncio.Event, dest: Path) -> None:
    """Cancel ``task`` once a body flows into a temporary file; it ends cancelled."""
    await asyncio.wait_for(flowing.wait(), 20)
    await until(lambda: len(temp_files(dest)) > 0, "a temporary file")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def shape(results: list[DownloadResult], dest: Path) -> list[tuple[object, ...]]:
    """What a result says, with paths relative to ``dest`` (to compare two runs)."""
    return [
        (
            r.url,
            r.status,
            None if r.path is None else r.path.relative_to(dest).as_posix(),
            r.bytes,
            r.attempts,
            type(r.error).__name__ if r.error is not None else None,
        )
        for r in results
    ]


# ----------------------------------------------------------------- the same as sync


def test_download_all_gives_what_the_sync_api_gives(server: ImageServer, tmp_path: Path) -> None:
    urls: list[str | Item] = [
        *server.urls[:4],
        server.urls[0],  # a repeat: shares the first's result
        Item(server.urls[1], "other.png"),  # a repeat asking for another name: failed
        server.url("/status/404/missing.png"),
        "ftp://example.org/x.png",
        Item(server.url("/any/checked.png"), sha256=server.expected_sha256("/any/checked.png")),
    ]
    got = run(fetchpool.aio.download_all(urls, tmp_path / "aio", workers=3))
    want = download_all(urls, tmp_path / "sync", workers=3)
    assert shape(list(got), tmp_path / "aio") == shape(list(want), tmp_path / "sync")
    assert [r.status for r in got].count("downloaded") == 6  # the repeat too
    assert got[0] is got[4]
    assert got[-1].sha256 == server.expected_sha256("/any/checked.png")
    assert len(got) == len(urls)


def test_bad_arguments_raise_as_in_the_sync_api(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")

    async def main() -> None:
        with pytest.raises(TypeError, match="single string"):
            await fetchpool.aio.download_all("http://127.0.0.1/a.png", tmp_path)
        with pytest.raises(ValueError, match="workers"):
            await fetchpool.aio.download_all([], tmp_path, workers=0)
        with pytest.raises(NotADirectoryError):
            await fetchpool.aio.download_all([], a_file)
        # Checked when the Downloader is made, before any thread or directory exists.
        with pytest.raises(ValueError, match="workers"):
            fetchpool.aio.Downloader(tmp_path / "new", workers=0)
        with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
            fetchpool.aio.Downloader(tmp_path / "new", colour="red")  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="overwrite"):
            fetchpool.aio.Downloader(tmp_path / "new", overwrite="never")  # type: ignore[arg-type]
        assert not (tmp_path / "new").exists()
        dl = fetchpool.aio.Downloader(tmp_path / "new")
        with pytest.raises(RuntimeError, match="async with"):
            await dl.submit("http://127.0.0.1/a.png")
        with pytest.raises(NotADirectoryError):
            async with fetchpool.aio.Downloader(a_file):
                pass
        async with fetchpool.aio.Downloader(tmp_path / "new") as dl:
            with pytest.raises(TypeError, match="single string"):
                dl.map("http://127.0.0.1/a.png")
            with pytest.raises(TypeError, match="filename"):
                await dl.submit("http://127.0.0.1/a.png", filename=3)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="closed"):
            await dl.submit("http://127.0.0.1/a.png")

    run(main())


def test_import_fetchpool_does_not_import_aio() -> None:
    code = "import sys, fetchpool; print('fetchpool.aio' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- never blocks the loop


@pytest.mark.timeout(60)
def test_the_loop_keeps_running_while_downloads_wait(server: ImageServer, dest: Path) -> None:
    slow = [server.url(f"/slow/beat{i}.png?delay=0.6") for i in range(3)]

    async def main() -> list[int]:
        ticks = []
        async with Heartbeat() as beat:
            await fetchpool.aio.download_all(slow[:1], dest / "all")
            ticks.append(beat.ticks)
            async with fetchpool.aio.Downloader(dest / "dl", workers=2) as dl:
                ticks.append(beat.ticks)
                await dl.submit(slow[1])
                ticks.append(beat.ticks)
                # Leaving the block waits for this one, off the loop.
                pending = asyncio.create_task(dl.submit(slow[2]))
                await until(lambda: server.hits(slow[2]) == 1, "the request sent")
                ticks.append(beat.ticks)
            ticks.append(beat.ticks)
            assert (await pending).status == "downloaded"
        return ticks

    ticks = run(main())
    # Each wait of 0.6 s lets the 10 ms heartbeat tick many times; a blocked loop, none.
    gains = [b - a for a, b in zip([0, *ticks], ticks, strict=False)]
    assert gains[0] >= 10, ticks  # download_all
    assert gains[2] >= 10, ticks  # submit
    assert gains[4] >= 10, ticks  # leaving the block while a download runs


# ------------------------------------------------------------------------------- map


@pytest.mark.timeout(60)
def test_map_yields_in_input_order_lazily_from_sync_and_async_iterables(
    server: ImageServer, dest: Path
) -> None:
    delays = [0.3, 0.0, 0.2, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0]
    urls = [server.url(f"/slow/m{i}.png?delay={d}") for i, d in enumerate(delays)]
    consumed: list[int] = []

    def counted() -> Iterator[str]:
        for n, url in enumerate(urls):
            consumed.append(n)
            yield url

    async def acounted() -> AsyncIterator[str]:
        for url in counted():
            await asyncio.sleep(0)
            yield url

    async def main() -> tuple[list[DownloadResult], list[DownloadResult], list[int]]:
        first_seen: list[int] = []
        async with fetchpool.aio.Downloader(dest / "sync", workers=2) as dl:
            got: list[DownloadResult] = []
            async for result in dl.map(counted()):
                if not got:
                    first_seen.append(len(consumed))
                got.append(result)
        consumed.clear()
        async with fetchpool.aio.Downloader(dest / "async", workers=2) as dl:
            agot: list[DownloadResult] = []
            async for result in dl.map(acounted()):
                if not agot:
                    first_seen.append(len(consumed))
                agot.append(result)
        return got, agot, first_seen

    got, agot, first_seen = run(main())
    assert [r.url for r in got] == urls
    assert [r.url for r in agot] == urls
    assert all(r.status == "downloaded" for r in [*got, *agot])
    # Lazy and bounded: 2 * workers in flight or buffered when the first result comes.
    assert first_seen == [4, 4]


@pytest.mark.timeout(60)
def test_leaving_map_early_stops_what_it_started(server: ImageServer, dest: Path) -> None:
    slow = server.url("/slow/left.png?delay=60")
    later = [server.url(f"/any/later/{i}.png") for i in range(5)]

    async def main() -> None:
        async with fetchpool.aio.Downloader(dest, workers=1) as dl:
            async with contextlib.aclosing(dl.map([server.urls[0], slow, *later])) as results:
                async for result in results:
                    assert result.status == "downloaded"
                    await until(lambda: server.hits(slow) == 1, "the slow one in flight")
                    break
            # The slow download stopped: its lock is free at once, not in 60 s.
            assert held_locks(dest) == 0

    run(main())
    assert [server.hits(u) for u in later] == [0] * 5
    assert sorted(os.listdir(dest)) == [server.urls[0].rsplit("/", 1)[-1]]


# ----------------------------------------------------------------------- cancellation


@pytest.mark.timeout(60)
def test_cancelling_download_all_stops_in_flight_and_never_starts_pending(
    server: ImageServer, dest: Path
) -> None:
    endless = [server.url(f"/huge-length/cancel{i}.png") for i in range(2)]
    pending = [server.url(f"/any/pending/{i}.png") for i in range(4)]

    async def main() -> None:
        flowing, progress = flowing_progress()
        task = asyncio.create_task(
            fetchpool.aio.download_all(
                [*endless, *pending], dest, workers=2, max_bytes=None, progress=progress
            )
        )
        await cancel_mid_body(task, flowing, dest)
        # Once the CancelledError arrives, everything is cleaned up already.
        assert listing(dest) == []

    run(main())
    assert [server.hits(u) for u in pending] == [0] * 4


@pytest.mark.timeout(60)
def test_cancelling_a_submit_stops_that_download_alone(server: ImageServer, dest: Path) -> None:
    endless = server.url("/huge-length/alone.png")
    other = server.url("/slow/other.png?delay=0.5")

    async def main() -> tuple[DownloadResult, DownloadResult]:
        flowing, progress = flowing_progress()
        async with fetchpool.aio.Downloader(
            dest, workers=2, max_bytes=None, progress=progress
        ) as dl:
            task = asyncio.create_task(dl.submit(endless))
            neighbour = asyncio.create_task(dl.submit(other))
            await cancel_mid_body(task, flowing, dest)
            # Stopped, not left running: no temporary file, no lock held but the other's.
            assert temp_files(dest) == []
            assert "alone.png" not in os.listdir(dest)
            # The Downloader goes on: the neighbour ends well, a new download too.
            again = await dl.submit(server.urls[2])
            return await neighbour, again

    neighbour, again = run(main())
    assert neighbour.status == "downloaded"
    assert again.status == "downloaded"
    assert sorted(os.listdir(dest)) == sorted(["other.png", server.urls[2].rsplit("/", 1)[-1]])


@pytest.mark.timeout(60)
def test_cancelling_a_submit_before_it_starts_means_it_never_starts(
    server: ImageServer, dest: Path
) -> None:
    busy = server.url("/slow/busy.png?delay=0.5")
    queued = server.url("/any/queued/never.png")

    async def main() -> DownloadResult:
        async with fetchpool.aio.Downloader(dest, workers=1) as dl:
            first = asyncio.create_task(dl.submit(busy))
            second = asyncio.create_task(dl.submit(queued))
            await until(lambda: server.hits(busy) == 1, "the first in flight")
            second.cancel()
            with pytest.raises(asyncio.CancelledError):
                await second
            return await first

    assert run(main()).status == "downloaded"
    assert server.hits(queued) == 0
    assert os.listdir(dest) == ["busy.png"]


@pytest.mark.timeout(60)
def test_an_exception_in_the_block_cancels_pending_and_stops_in_flight(
    server: ImageServer, dest: Path
) -> None:
    endless = server.url("/huge-length/block.png")
    pending = [server.url(f"/any/block/{i}.png") for i in range(3)]
    tasks: list[asyncio.Task[DownloadResult]] = []

    async def main() -> None:
        flowing, progress = flowing_progress()
        async with fetchpool.aio.Downloader(
            dest, workers=1, max_bytes=None, progress=progress
        ) as dl:
            tasks.extend(asyncio.create_task(dl.submit(u)) for u in [endless, *pending])
            await asyncio.wait_for(flowing.wait(), 20)
            raise RuntimeError("boom")

    async def outer() -> list[object]:
        with pytest.raises(RuntimeError, match="boom"):
            await main()
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    first, *rest = run(outer())
    # The one in flight stopped with a cancelled TransferError result; the pending ones
    # were cancelled before they started (as their sync futures are).
    assert isinstance(first, DownloadResult)
    assert isinstance(first.error, TransferError)
    assert first.error.cancelled
    assert all(isinstance(r, asyncio.CancelledError) for r in rest), rest
    assert [server.hits(u) for u in pending] == [0] * 3
    assert listing(dest) == []


@pytest.mark.timeout(60)
def test_aclose_cancel_and_a_cancelled_aclose_stop_the_downloads(
    server: ImageServer, dest: Path
) -> None:
    async def main(cancel_the_wait: bool) -> DownloadResult:
        target = dest / str(cancel_the_wait)
        dl = fetchpool.aio.Downloader(target, workers=1)
        await dl.__aenter__()
        slow = asyncio.create_task(dl.submit(server.url(f"/slow/c{cancel_the_wait}.png?delay=60")))
        await until(lambda: held_locks(target) == 1, "the download in flight")
        if cancel_the_wait:
            closing = asyncio.create_task(dl.aclose())
            await asyncio.sleep(0.1)
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
        else:
            await dl.aclose(cancel=True)
        assert listing(target) == []
        return await slow

    for cancel_the_wait in (False, True):
        result = run(main(cancel_the_wait))
        assert isinstance(result.error, TransferError)
        assert result.error.cancelled
