"""fetchpool.dask: shards of a URL list on a LocalCluster of worker processes (issue 12).

One cluster (two worker processes, one thread each) serves the whole module: starting one
takes seconds. Tests that kill a worker wait for the nanny to bring it back.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import fetchpool.dask
import fetchpool.storage
import test_concurrency
from _support import listing
from fetchpool import (
    Item,
    ProgressEvent,
    ShardError,
    StorageError,
    TransferError,
    UnsafeFilenameError,
)
from fetchpool.cli import main
from fetchpool.testing import ImageServer
from test_concurrency import StallServer

distributed = pytest.importorskip(
    "distributed", reason="fetchpool.dask needs distributed (pip install 'fetchpool[dask]')"
)
import dask.config  # noqa: E402 - present with distributed

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """A client of a LocalCluster of 2 worker processes; not the default client."""
    with (
        # Python 3.11 can deadlock a worker whose profiler (sys._current_frames) runs
        # while a collection frees a thread-local: no profiler here.
        dask.config.set({"distributed.worker.profile.enabled": False}),
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # any free port: 8787 may be taken
            silence_logs=50,  # CRITICAL: a killed worker is what some tests want
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as dask_client,
    ):
        yield dask_client


#: A server of big images whose bodies stall until released (test_concurrency's fixture).
stall = test_concurrency.stall


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer(n_images=0) as srv:
        yield srv


@pytest.fixture
def healthy(client: Any) -> Iterator[Any]:
    """The client, with both workers back and idle after the test (it kills one)."""
    yield client
    client.wait_for_workers(2, timeout=60)
    _wait_for(lambda: not _our_tasks(client), 30, "the cluster to forget the test's shards")


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _our_tasks(client: Any) -> list[str]:
    """The keys of fetchpool shards the scheduler still knows."""

    def keys(dask_scheduler: Any) -> list[str]:
        return [str(k) for k in dask_scheduler.tasks if str(k).startswith("fetchpool-shard-")]

    found: list[str] = client.run_on_scheduler(keys)
    return found


def _part_files_of(pid: int, dest: Path) -> list[str]:
    """The named temporary files in ``dest`` that process ``pid`` has open."""
    found = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(str(dest)) and target.endswith(".part"):
                    found.append(target)
    return found


def _set_named_temps(named: bool) -> None:
    """On a worker: named ``.part`` temporary files (those a dead writer leaves)."""
    fetchpool.storage.UNNAMED = not named and bool(os.O_TMPFILE)


def _names(urls: list[str]) -> list[str]:
    return sorted({u.rsplit("/", 1)[-1] for u in urls})


# --------------------------------------------------------------------------- basics


def test_results_in_input_order_one_per_item_and_repeats_downloaded_once(
    client: Any, server: ImageServer, dest: Path
) -> None:
    urls = [server.url(f"/any/order/img{i}.png") for i in range(30)]
    # Repeats inside a shard (settled by its download_all) and across shards (rule 2).
    given: list[object] = [*urls[:5], urls[0], *urls[5:], urls[1], urls[29], None, "ftp://x/y.png"]
    results = fetchpool.dask.download_all(given, dest, client=client, shard_size=7, workers=3)

    assert len(results) == len(given)
    assert [r.url for r in results[:-2]] == given[:-2]
    assert results[-2].url == "None"
    assert all(r.ok for r in results[:-2]), [r.error for r in results if not r.ok]
    assert [type(r.error).__name__ for r in results[-2:]] == ["InvalidURL", "InvalidURL"]
    for url in urls:
        assert server.hits(url.split("/", 3)[3]) == 1, url  # never downloaded twice
    for result in results[:-2]:
        assert result.path is not None
        assert result.path.read_bytes() == server.expected(result.url)
    assert listing(dest) == _names(urls)


def test_mappings_and_items_keep_their_names_across_shards(
    client: Any, server: ImageServer, dest: Path
) -> None:
    urls = [server.url(f"/any/map/pic{i}.png") for i in range(9)]
    mapping = {url: f"sub/n{i}.png" for i, url in enumerate(urls)}
    mapping[server.url("/any/map/other.png")] = "sub/n1.png"  # another URL, a name taken
    results = fetchpool.dask.download_all(mapping, dest, client=client, shard_size=4)

    assert [r.url for r in results] == list(mapping)
    assert [r.status for r in results[:-1]] == ["downloaded"] * 9
    assert isinstance(results[-1].error, UnsafeFilenameError)
    assert sorted(os.listdir(dest / "sub")) == sorted(f"n{i}.png" for i in range(9))

    sha = server.expected_sha256(urls[0])
    items = [Item(urls[0], "item.png", sha256=sha), Item(urls[1], sha256="0" * 64)]
    checked = fetchpool.dask.download_all(items, dest, client=client, shard_size=1, retry=1)
    assert checked[0].status == "downloaded"
    assert checked[0].sha256 == sha
    assert type(checked[1].error).__name__ == "ChecksumError"


def test_progress_stays_on_the_client_fed_per_shard(
    client: Any, server: ImageServer, dest: Path
) -> None:
    events: list[ProgressEvent] = []
    urls = [server.url(f"/any/prog/p{i}.png") for i in range(10)] + ["not a url"]
    results = fetchpool.dask.download_all(
        urls, dest, client=client, shard_size=3, progress=events.append
    )
    by_url: dict[str, list[str]] = {}
    for event in events:
        by_url.setdefault(event.url, []).append(event.state)
    assert set(by_url) == set(urls)
    for url, states in by_url.items():
        end = "failed" if url == "not a url" else "done"
        assert states[0] == "started"
        assert states[-1] == end
    done_bytes = sum(e.bytes for e in events if e.state == "done")
    assert done_bytes == sum(r.bytes for r in results if r.ok)


def test_map_reads_its_input_lazily_and_a_stop_cancels_the_rest(
    client: Any, server: ImageServer, dest: Path
) -> None:
    read = 0

    def endless() -> Iterator[str]:
        nonlocal read
        for i in range(100_000):
            read += 1
            yield server.url(f"/any/lazy/l{i}.png")

    it = fetchpool.dask.map(endless(), dest, client=client, shard_size=5, window=2)
    first = [next(it) for _ in range(7)]
    assert all(r.ok for r in first)
    assert read <= len(first) + (2 + 1) * 5 + 1  # (window + 1) shards unconsumed
    it.close()  # type: ignore[attr-defined]
    _wait_for(lambda: not _our_tasks(client), 30, "the shards to be forgotten")
    assert len(os.listdir(dest)) <= read


def test_without_a_client_the_error_says_what_to_do(dest: Path) -> None:
    with pytest.raises(RuntimeError, match="needs a Dask client"):
        fetchpool.dask.download_all(["http://127.0.0.1:1/x.png"], dest)


def test_arguments_are_checked_on_the_client_at_once(client: Any, dest: Path) -> None:
    with pytest.raises(TypeError, match="single string"):
        fetchpool.dask.map("http://h/x.png", dest, client=client)
    with pytest.raises(ValueError, match="shard_size"):
        fetchpool.dask.map([], dest, client=client, shard_size=0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        fetchpool.dask.map([], dest, client=client, colour="red")  # type: ignore[call-arg]
    assert list(fetchpool.dask.map([], dest, client=client)) == []


def test_a_worker_that_cannot_use_dest_fails_every_url_clearly(
    client: Any, server: ImageServer, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    dest = blocker / "dest"  # cannot be created: a file is in the way
    urls = [server.url(f"/any/blind/b{i}.png") for i in range(5)]
    results = fetchpool.dask.download_all(urls, dest, client=client, shard_size=2)

    assert [r.url for r in results] == urls
    assert all(isinstance(r.error, StorageError) for r in results)
    message = str(results[0].error)
    assert "Dask worker" in message
    assert str(dest) in message
    assert "Not a directory" in message
    assert all(server.hits(u.split("/", 3)[3]) == 0 for u in urls)


# --------------------------------------------------------------------------- faults


def test_a_worker_killed_mid_shard_loses_nothing_and_doubles_nothing(
    healthy: Any, server: ImageServer, stall: StallServer, dest: Path
) -> None:
    client = healthy
    client.run(_set_named_temps, True)  # a dead writer's temporary files stay behind
    fast = [server.url(f"/any/kill/k{i}.png") for i in range(4)]
    big = [stall.url(f"/big/kbig{i}.png") for i in range(2)]
    others = [server.url(f"/any/kill/o{i}.png") for i in range(6)]
    urls = fast + big + others  # shard 0: fast + big; shard 1: others
    pids: dict[str, int] = client.run(os.getpid)

    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(
            fetchpool.dask.download_all, urls, dest, client=client, shard_size=6, workers=6
        )
        holder: list[int] = []

        def mid_shard() -> bool:
            holder[:] = [pid for pid in pids.values() if len(_part_files_of(pid, dest)) == 2]
            return bool(holder) and all((dest / n).exists() for n in _names(fast))

        _wait_for(mid_shard, 60, "a worker with 4 files done and 2 in flight")
        leftovers = _part_files_of(holder[0], dest)
        os.kill(holder[0], signal.SIGKILL)
        _wait_for(lambda: not any(os.path.exists(p) for p in leftovers), 60, "the sweep")
        stall.release()
        results = run.result(timeout=90)

    assert [r.url for r in results] == urls
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert [r.status for r in results[:4]] == ["skipped"] * 4  # its finished files
    assert [r.status for r in results[4:6]] == ["downloaded"] * 2
    for url in fast + others:
        assert server.hits(url.split("/", 3)[3]) == 1, url
    for result in results[4:6]:
        assert result.path is not None
        assert result.path.read_bytes() == stall.expected(result.url)
    assert listing(dest) == _names(urls)  # no temporary file, no lock file
    client.run(_set_named_temps, False)


def test_a_shard_whose_worker_dies_too_often_fails_its_urls_with_shard_error(
    healthy: Any, server: ImageServer, stall: StallServer, dest: Path
) -> None:
    client = healthy

    def allow(dask_scheduler: Any, failures: int) -> int:
        before: int = dask_scheduler.allowed_failures
        dask_scheduler.allowed_failures = failures
        return before

    before = client.run_on_scheduler(allow, failures=0)
    try:
        held = [stall.url(f"/hold/doomed{i}.png") for i in range(3)]
        fine = [server.url(f"/any/doom/f{i}.png") for i in range(3)]
        pids: dict[str, int] = client.run(os.getpid)
        with ThreadPoolExecutor(1) as pool:
            run = pool.submit(
                fetchpool.dask.download_all, held + fine, dest, client=client, shard_size=3
            )

            def busy_pid() -> list[int]:
                processing = client.processing()
                return [
                    pids[addr]
                    for addr, keys in processing.items()
                    if addr in pids and any(str(k).endswith("-0") for k in keys)
                ]

            _wait_for(lambda: bool(busy_pid()), 60, "the held shard to run")
            time.sleep(0.2)  # its requests sent
            os.kill(busy_pid()[0], signal.SIGKILL)
            results = run.result(timeout=60)
    finally:
        client.run_on_scheduler(allow, failures=before)
        stall.release()

    assert [r.url for r in results] == held + fine
    for result in results[:3]:
        assert isinstance(result.error, ShardError), result.error
        assert "KilledWorker" in str(result.error)
        assert result.url in str(result.error)
    assert all(r.ok for r in results[3:])


@pytest.mark.timeout(60)
def test_ctrl_c_on_the_client_cancels_the_outstanding_shards(
    healthy: Any, stall: StallServer, dest: Path
) -> None:
    client = healthy
    urls = [stall.url(f"/hold/ctrlc{i}.png") for i in range(40)]
    main = threading.main_thread().ident
    assert main is not None

    def when_running() -> None:
        with contextlib.suppress(AssertionError):
            _wait_for(lambda: len(_our_tasks(client)) >= 2, 20, "shards on the cluster")
        signal.pthread_kill(main, signal.SIGINT)

    timer = threading.Thread(target=when_running)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt) as interrupted:
            fetchpool.dask.download_all(urls, dest, client=client, shard_size=4, window=2)
        # While the interrupted call's frames (and any futures they hold) still live:
        # the scheduler forgets every shard, the running ones included.
        _wait_for(lambda: not _our_tasks(client), 10, "the shards to be cancelled")
        assert interrupted.traceback is not None
    finally:
        timer.join()
        stall.release()


def test_a_transfer_cancelled_by_a_stop_is_a_cancelled_transfer_error(
    client: Any, stall: StallServer, dest: Path
) -> None:
    pool = fetchpool.dask.ShardPool(dest, client=client, shard_size=2, window=1)
    # Two in the shard sent, one in the next, which waits for room.
    futures = [pool.submit(stall.url(f"/hold/stop{i}.png")) for i in range(3)]
    _wait_for(lambda: len(_our_tasks(client)) == 1, 20, "the first shard on the cluster")
    pool.close(cancel=True)
    stall.release()
    first = [f.result(timeout=10) for f in futures[:2]]
    assert all(isinstance(r.error, TransferError) and r.error.cancelled for r in first)
    assert futures[2].cancelled()  # never sent


# --------------------------------------------------------------------------- the command


def test_the_command_runs_on_a_cluster_by_address(
    client: Any, server: ImageServer, dest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    urls = [server.url(f"/any/cli/c{i}.png") for i in range(7)] + ["nonsense"]
    report = tmp_path / "report.jsonl"
    address = client.scheduler_info()["address"]
    argv = ["--dask", address, "--shard-size", "3", "-w", "2", "-d", str(dest), "-q"]
    status = main([*argv, "--report", str(report), *urls])

    assert status == 1, capsys.readouterr().err  # "nonsense" failed
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(line["url"] for line in lines) == sorted(urls)
    assert [line["status"] for line in lines if line["url"] == "nonsense"] == ["failed"]
    assert listing(dest) == _names(urls[:-1])


def test_the_command_starts_a_local_cluster(
    server: ImageServer, dest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    urls = [server.url(f"/any/cli/local{i}.png") for i in range(3)]
    assert main(["--dask", "local:1", "-d", str(dest), *urls]) == 0, capsys.readouterr().err
    assert "3 downloaded" in capsys.readouterr().err
    assert listing(dest) == _names(urls)


def test_the_command_refuses_a_malformed_local_cluster(
    dest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--dask", "local:none", "-d", str(dest), "http://127.0.0.1:1/x.png"]) == 2
    assert "--dask local:N" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_shards_that_cannot_be_sent_fail_their_items_saying_why(client: Any, dest: Path) -> None:
    other = distributed.Client(client.scheduler_info()["address"], set_as_default=False)
    pool = fetchpool.dask.ShardPool(dest, client=other, shard_size=2, window=1)
    other.close()
    futures = [pool.submit(f"http://127.0.0.1:1/gone{i}.png") for i in range(3)]
    pool.close()
    results = [f.result(timeout=10) for f in futures]
    assert all(isinstance(r.error, ShardError) for r in results), [r.error for r in results]
