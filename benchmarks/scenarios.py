"""The scenarios of issue 4, at full size and in ``--quick`` (smoke-test) size."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from typing import Final

KIB: Final = 1024
MIB: Final = 1024 * KIB
GIB: Final = 1024 * MIB
TMPFS: Final = "/dev/shm"

NAMES: Final = ("latency-bound", "cpu-bound", "many-files", "big-file", "peak-rss")


@dataclass(frozen=True)
class Scenario:
    """One benchmark: what the server serves, how many workers, where files go."""

    name: str
    title: str
    workers: int
    dest_root: str
    latency: float = 0.0
    #: Images in the collection (0: none); ``distinct`` bodies are cycled through.
    count: int = 0
    distinct: int = 0
    #: A fixed body size, or None for ImageServer-like sizes (20-300 kB).
    size: int | None = None
    #: One image format for every body (fixed URL extension), or None to mix them.
    kind: str | None = None
    #: Size of the single large file (0: none).
    big: int = 0
    #: Contestant -> why it does not run in this scenario.
    skip: dict[str, str] = field(default_factory=dict)
    #: Contestant -> at most this many runs (for the very slow ones).
    max_runs: dict[str, int] = field(default_factory=dict)
    #: For ``peak-rss``: the two URL counts fed to ``Downloader.map()``.
    map_counts: tuple[int, int] = (0, 0)
    note: str = ""

    @property
    def n_urls(self) -> int:
        """Number of URLs each contestant downloads."""
        return 1 if self.big else self.count

    def ideal_latency(self) -> float | None:
        """``ceil(n / workers) * latency``: the bound set by latency alone, if any."""
        if self.latency <= 0:
            return None
        return math.ceil(self.n_urls / self.workers) * self.latency


def disk_root() -> str:
    """A directory on the normal disk for ``dest`` (the system temp dir)."""
    return tempfile.gettempdir()


def scenarios(quick: bool) -> dict[str, Scenario]:
    """Return every scenario by name, at full size or in ``--quick`` size."""
    one_url = {"tutorial-threads": "one URL: identical to sequential"}
    if quick:
        return {
            "latency-bound": Scenario(
                "latency-bound",
                "latency-bound (quick): 48 images, 50 ms latency, 16 workers",
                workers=16,
                dest_root=disk_root(),
                latency=0.05,
                count=48,
                distinct=48,
            ),
            "cpu-bound": Scenario(
                "cpu-bound",
                "CPU-bound (quick): 200 x 16 KiB, tmpfs, 8 workers, 0 latency",
                workers=8,
                dest_root=TMPFS,
                count=200,
                distinct=200,
                size=16 * KIB,
            ),
            "many-files": Scenario(
                "many-files",
                "many files to disk (quick): 300 images, 0 latency, 8 workers",
                workers=8,
                dest_root=disk_root(),
                count=300,
                distinct=100,
            ),
            "big-file": Scenario(
                "big-file",
                "one big file (quick): 64 MiB, dest on tmpfs",
                workers=8,
                dest_root=TMPFS,
                big=64 * MIB,
                skip=one_url,
            ),
            "peak-rss": Scenario(
                "peak-rss",
                "peak RSS (quick): fetchpool on a 64 MiB file; map() over 200 vs 2,000 URLs",
                workers=8,
                dest_root=TMPFS,
                count=2000,
                distinct=64,
                size=4 * KIB,
                kind="png",
                big=64 * MIB,
                map_counts=(200, 2000),
            ),
        }
    return {
        "latency-bound": Scenario(
            "latency-bound",
            "latency-bound: 500 images, 100 ms per-request latency, 32 workers",
            workers=32,
            dest_root=disk_root(),
            latency=0.1,
            count=500,
            distinct=500,
            max_runs={"sequential": 1},
            note="sequential runs once (about 50 s).",
        ),
        "cpu-bound": Scenario(
            "cpu-bound",
            "CPU-bound: 2,000 x 16 KiB files, dest on tmpfs, 16 workers, 0 latency",
            workers=16,
            dest_root=TMPFS,
            count=2000,
            distinct=2000,
            size=16 * KIB,
        ),
        "many-files": Scenario(
            "many-files",
            "many files to disk: 5,000 images, 0 ms latency, 16 workers",
            workers=16,
            dest_root=disk_root(),
            count=5000,
            distinct=1000,
            skip={
                "tutorial-threads": "5,000 threads and 5,000 connections at once; "
                "skipped above 1,000 URLs"
            },
            max_runs={"aria2c": 1},
            note="1,000 distinct bodies cycled over 5,000 URLs (the server's memory); "
            "aria2c runs once (the slowest tool on many small files).",
        ),
        "big-file": Scenario(
            "big-file",
            "one 1 GiB file, dest on tmpfs",
            workers=16,
            dest_root=TMPFS,
            big=GIB,
            skip=one_url,
            note="dest on tmpfs so the disk's write-back does not dominate; "
            "sequential holds the whole body in memory (.content).",
        ),
        "peak-rss": Scenario(
            "peak-rss",
            "peak RSS: fetchpool on a 1 GiB file; Downloader.map() over 10,000 vs 100,000 URLs",
            workers=16,
            dest_root=TMPFS,
            count=100_000,
            distinct=64,
            size=4 * KIB,
            kind="png",
            big=GIB,
            map_counts=(10_000, 100_000),
            # Measured (driver sampling smaps every 10,000 URLs): Python's heap and
            # malloc's committed memory stay constant; only the resident pages of the
            # 132 KiB per-thread heaps rise, ever more slowly, towards that size.
            note="map()'s peak RSS includes glibc's per-thread malloc heaps (about 130 KiB "
            "per worker): their touched pages creep up towards that bound with the URLs, "
            "about +0.2 MiB from 10,000 to 100,000, though nothing is kept per URL "
            "(flat within 4 KiB with MALLOC_ARENA_MAX=1).",
        ),
    }
