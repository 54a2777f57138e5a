"""fetchpool.dask against one process: the CPU-bound small-file scenario on a LocalCluster.

The benchmark server (``benchmarks.server``, a process of its own) serves the CPU-bound
scenario's 2,000 x 16 KiB files; ``dest`` is on tmpfs. Each round, interleaved, on a fresh
``dest``:

- ``one process``: ``fetchpool.download_all(urls, workers=W)`` in this process;
- ``dask, 2 processes``: ``fetchpool.dask.download_all`` on a ``LocalCluster`` of 2 worker
  processes (one Dask thread each), each shard's Downloader with ``W / 2`` workers: the
  same total;
- ``dask, 1 process``: the same on a cluster of 1 worker process, shards with ``W``
  workers: its excess over ``one process``, per URL, is the shard overhead (scheduling,
  a Downloader per shard, the drain at each shard's end, results sent back).

Prints the medians, the ratio ``dask, 2 processes / one process`` (target: at most 0.6 on
2 cores), and the overhead per URL.

    python -m benchmarks.dask_scale [--quick] [--repeat 3] [--backend requests|curl]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import dask
import distributed

import fetchpool
import fetchpool.dask
from benchmarks.harness import ServerProcess, count_ok, fresh_dir, server_config
from benchmarks.scenarios import scenarios


def _cluster(processes: int) -> tuple[Any, Any]:
    # No worker profiler: see "Running on a cluster" in the README (Python 3.11).
    with dask.config.set({"distributed.worker.profile.enabled": False}):
        cluster = distributed.LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=processes,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        )
    return cluster, distributed.Client(cluster, set_as_default=False)  # type: ignore[no-untyped-call]


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the figures."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 files instead of 2,000")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (3)")
    parser.add_argument("--backend", choices=("requests", "curl"), default="requests")
    parser.add_argument("--shard-size", type=int, default=0, help="default: n / 8")
    args = parser.parse_args(argv)
    scenario = scenarios(args.quick)["cpu-bound"]
    workers, n = scenario.workers, scenario.count
    shard_size = args.shard_size or max(1, n // 8)
    opts: dict[str, Any] = {"backend": args.backend}

    with ServerProcess(server_config(scenario)) as server:
        listed = server.urls("img", n)
        urls = [url for url, _, _ in listed]
        expected = {url.rsplit("/", 1)[-1]: sha for url, sha, _ in listed}
        clusters = {p: _cluster(p) for p in (1, 2)}
        try:

            def one() -> int:
                with fresh_dir(scenario.dest_root, "fp-dask-one-") as dest:
                    fetchpool.download_all(urls, dest, workers=workers, **opts)
                    return count_ok(dest, expected)

            def on(processes: int) -> Callable[[], int]:
                client = clusters[processes][1]

                def run() -> int:
                    with fresh_dir(scenario.dest_root, "fp-dask-") as dest:
                        fetchpool.dask.download_all(
                            urls,
                            dest,
                            client=client,
                            shard_size=shard_size,
                            workers=workers // processes,
                            **opts,
                        )
                        return count_ok(dest, expected)

                return run

            runs: dict[str, Callable[[], int]] = {
                "one process": one,
                "dask, 1 process": on(1),
                "dask, 2 processes": on(2),
            }
            for run in runs.values():  # warm-up: imports on the workers, caches
                run()
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.repeat):
                for name, run in runs.items():
                    start = time.perf_counter()
                    ok = run()
                    times[name].append(time.perf_counter() - start)
                    if ok != n:
                        sys.exit(f"{name}: {ok} of {n} files ok")
        finally:
            for cluster, client in clusters.values():
                client.close()
                cluster.close()

    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["one process"]
    print(f"{scenario.title}; backend {args.backend}; shards of {shard_size}")
    print(f"fetchpool {fetchpool.__version__}, distributed {metadata.version('distributed')}")
    for name, seconds in med.items():
        rounds = ", ".join(f"{t:.3f}" for t in times[name])
        print(f"{name:>18}: {seconds:.3f} s median ({rounds}); {seconds / base:.2f}x one process")
    overhead = (med["dask, 1 process"] - base) / n
    print(
        f"dask_scale ratio={med['dask, 2 processes'] / base:.3f} "
        f"shard_overhead_per_url_ms={overhead * 1000:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
