"""Sequential vs threaded downloads, done honestly: the classic tutorial comparison, offline.

The tutorial downloads images in a plain loop, then with one ``threading.Thread`` per URL
(``requests.get(url).content`` saved as ``url.split('/')[-1]``), and reports the speed-up.
But it times the threads without joining them, names collide silently, and a failed
transfer is saved as if it were the image. This script runs, in one process and each on a
fresh directory, every approach at a stated concurrency, next to the ideal for that
concurrency (every request one latency, ``ceil(n / concurrency)`` rounds):

1. the sequential loop (1);
2. the tutorial's threads, one per URL (n), timed the tutorial's way (no join) and correctly;
3. the tutorial's download function on a pool of ``--workers`` threads;
4. ``fetchpool.download_all`` with ``--workers`` workers, and with one per URL (n);
5. the same on the curl backend (``--workers``), when pycurl is installed.

It starts ``fetchpool.testing.ImageServer`` itself (real HTTP on 127.0.0.1, no internet),
with per-request latency, images of realistic sizes, three groups of URLs whose basenames
collide (``/a/cat.jpg`` and ``/b/cat.jpg``, ...) and four, spread through the list, that
fail once with 503. Every file is checked against the server's sha256; below the table,
what fetchpool's retries cost (the time of those URLs) and what they bought.

    python examples/compare.py [--n 100] [--latency-ms 100] [--workers 16] [--chart out.png]
    python examples/compare.py --urls urls.txt     # real URLs: same table, no verification
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

import requests

from fetchpool import ProgressEvent, Results, RetryPolicy, download_all
from fetchpool.testing import ImageServer

FLAKY = 4  # URLs that answer 503 once, then the image
# Besides the corpus's /a/cat.jpg and /b/cat.jpg: more URLs that share a basename.
COLLIDING = ("/any/2023/photo.png", "/any/2024/photo.png", "/any/icons/logo.gif", "/any/logo.gif")
MISSING_MATPLOTLIB = "--chart needs matplotlib: pip install 'fetchpool[examples]'"
# A short backoff: the flaky URLs heal at once, and waiting 0.5-1.5 s would mostly
# measure the default policy's patience.
POLICY = RetryPolicy(wait_initial=0.1, jitter=0.1)


@dataclass
class Row:
    approach: str
    concurrency: int
    seconds: float
    ok: int | None = None
    lost: int | None = None
    overwritten: int | None = None
    corrupt: int | None = None
    #: Requests made again (fetchpool's retries); the naive code never retries.
    retries: int = 0
    #: fetchpool's results, for what its retries cost.
    results: Results | None = None
    #: Seconds until every URL that needed one request only was done (fetchpool).
    first_try_done: float | None = None


def tutorial_name(url: str) -> str:
    return url.rsplit("/", maxsplit=1)[-1]


def sequential(urls: list[str], dest: Path) -> dict[str, Path]:
    """The tutorial's loop: one request after another."""
    for url in urls:
        tutorial_fetch(url, dest)
    return {url: dest / tutorial_name(url) for url in urls}


def tutorial_fetch(url: str, dest: Path) -> None:
    """The tutorial's download of one URL."""
    data = requests.get(url, timeout=30).content
    (dest / tutorial_name(url)).write_bytes(data)


def naive_threads(urls: list[str], dest: Path) -> tuple[float, float, dict[str, Path]]:
    """The tutorial's threads; returns (seconds without join, seconds with join, paths)."""

    def fetch(url: str) -> None:
        tutorial_fetch(url, dest)

    start = time.perf_counter()
    threads = [threading.Thread(target=fetch, args=(url,)) for url in urls]
    for t in threads:
        t.start()
    unjoined = time.perf_counter() - start  # what the tutorial prints
    for t in threads:
        t.join()
    joined = time.perf_counter() - start
    return unjoined, joined, {url: dest / tutorial_name(url) for url in urls}


def naive_pool(urls: list[str], dest: Path, workers: int) -> dict[str, Path]:
    """The tutorial's download function on a pool of ``workers`` threads (joined)."""
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda url: tutorial_fetch(url, dest), urls))
    return {url: dest / tutorial_name(url) for url in urls}


def verify(row: Row, paths: dict[str, Path | None], expected: Callable[[str], str]) -> Row:
    """Count files correct, lost (no file), overwritten (another URL's bytes), corrupt."""
    digests = {url: expected(url) for url in paths}
    known = set(digests.values())
    row.ok = row.lost = row.overwritten = row.corrupt = 0
    for url, path in paths.items():
        if path is None or not path.exists():
            row.lost += 1
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest == digests[url]:
            row.ok += 1
        elif digest in known:
            row.overwritten += 1
        else:
            row.corrupt += 1
    return row


def fmt(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def ideal_of(row: Row, n: int, latency: float | None) -> float | None:
    """The least time ``n`` requests of one latency each take at the row's concurrency."""
    return None if latency is None else math.ceil(n / row.concurrency) * latency


def print_table(rows: list[Row], n: int, latency: float | None) -> None:
    base = next(r.seconds for r in rows if r.approach == "sequential")
    print(
        f"{'approach':<33} {'at once':>7} {'seconds':>7} {'ideal':>5} {'x ideal':>7} "
        f"{'correct':>7} {'lost':>4} {'overwr.':>7} {'corrupt':>7} {'retries':>7} {'speed-up':>8}"
    )
    for r in rows:
        ideal = ideal_of(r, n, latency)
        shown_ideal = "n/a" if ideal is None else f"{ideal:.2f}"
        over = "n/a" if ideal is None else f"{r.seconds / ideal:.2f}"
        correct = "n/a" if r.ok is None else f"{r.ok}/{n}"
        print(
            f"{r.approach:<33} {r.concurrency:>7} {r.seconds:>7.3f} {shown_ideal:>5} {over:>7} "
            f"{correct:>7} {fmt(r.lost):>4} {fmt(r.overwritten):>7} {fmt(r.corrupt):>7} "
            f"{r.retries:>7} {base / r.seconds:>7.1f}x"
        )


def print_summary(rows: list[Row], workers: int, n: int) -> None:
    """Say, from the figures above, how the rows at the same concurrency compare and what
    fetchpool's retries cost and bought."""
    pool = next(r for r in rows if r.approach.startswith("naive pool"))
    fp = next(r for r in rows if r.approach == f"fetchpool ({workers} workers)")
    assert fp.results is not None
    retried = [r for r in fp.results if r.attempts > 1]
    once = sum(1 for r in fp.results if r.attempts == 1)
    right = "" if pool.ok is None else f", {pool.ok}/{n} files right"
    print(f"\nAt {workers} at once: the naive pool took {pool.seconds:.2f} s{right}.")
    first = "" if fp.first_try_done is None else f" by {fp.first_try_done:.2f} s"
    fp_right = "" if fp.ok is None else f", {fp.ok}/{n} right,"
    print(
        f"fetchpool had the {once} files that needed one request{first}, "
        f"all {n}{fp_right} by {fp.seconds:.2f} s."
    )
    if retried:
        took = [r.elapsed for r in retried]
        others = statistics.median(r.elapsed for r in fp.results if r.attempts == 1)
        backoff = f"{POLICY.wait_initial:.1f}-{POLICY.wait_initial + POLICY.jitter:.1f} s"
        print(
            f"What its retries cost: {len(retried)} URLs answered a transient error, waited "
            f"a {backoff} backoff\nand asked again: {min(took):.2f}-{max(took):.2f} s each, "
            f"the others {others:.2f} s."
        )
    if fp.ok is not None and pool.ok is not None:
        print(
            f"What retries and distinct names bought: the {fp.ok - pool.ok} files the naive "
            f"pool got wrong:\n{pool.overwritten} holding another URL's image, {pool.corrupt} "
            "matching no image (an error page, or two writers in one file)."
        )


def load_pyplot() -> ModuleType | None:
    """Return ``matplotlib.pyplot`` on a file-only backend, or None if it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # Typed whether or not matplotlib (and so its type information) is installed.
    pyplot: ModuleType = plt
    return pyplot


def draw_chart(plt: ModuleType, rows: list[Row], n: int, latency: float | None, out: Path) -> None:
    """Draw the seconds of each approach as bars, labelled with the files it got right,
    with the ideal for its concurrency as a mark."""
    fig, ax = plt.subplots(figsize=(9, 4))
    names = [f"{r.approach} [{r.concurrency}]" for r in rows]
    bars = ax.barh(names, [r.seconds for r in rows], color="#4c72b0")
    labels = [
        f" {r.seconds:.2f} s" + ("" if r.ok is None else f", {r.ok}/{n} correct") for r in rows
    ]
    white = {"facecolor": "white", "edgecolor": "none", "pad": 1}
    ax.bar_label(bars, labels=labels, fontsize=9, padding=2, bbox=white)
    ideals = [ideal_of(r, n, latency) for r in rows]
    if latency is not None:
        ax.scatter(
            ideals,
            range(len(rows)),
            marker="|",
            s=400,
            color="#c44e52",
            zorder=3,
            label="ideal at that concurrency",
        )
        ax.legend(loc="lower right")
    ax.set_xlabel("seconds (lower is better); [n] = downloads at once")
    ax.set_xlim(0, max(r.seconds for r in rows) * 1.45)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"chart written to {out}")


def run(urls: list[str], workers: int, expected: Callable[[str], str] | None) -> list[Row]:
    rows: list[Row] = []
    n = len(urls)
    with tempfile.TemporaryDirectory(prefix="fetchpool-compare-") as tmp:
        root = Path(tmp)

        def fresh(name: str) -> tuple[Path, list[str]]:
            # /fail/ routes fail once per distinct URL: give each approach its own.
            d = root / name
            d.mkdir()
            return d, [u.replace("?run=", f"?run={name}") if "?run=" in u else u for u in urls]

        def check(row: Row, paths: dict[str, Path | None]) -> None:
            rows.append(row)
            if expected:
                verify(row, paths, expected)

        d, u = fresh("seq")
        start = time.perf_counter()
        paths: dict[str, Path | None] = dict(sequential(u, d))
        check(Row("sequential", 1, time.perf_counter() - start), paths)

        d, u = fresh("thr")
        unjoined, joined, tpaths = naive_threads(u, d)
        rows.append(Row("naive threads (no join, as shown)", n, unjoined))
        check(Row("naive threads (joined)", n, joined), dict(tpaths))
        for key in ("ok", "lost", "overwritten", "corrupt"):
            setattr(rows[-2], key, getattr(rows[-1], key))

        d, u = fresh("pool")
        start = time.perf_counter()
        ppaths = naive_pool(u, d, workers)
        check(
            Row(f"naive pool ({workers} threads)", workers, time.perf_counter() - start),
            dict(ppaths),
        )

        backends: list[tuple[Literal["requests", "curl"], int]] = [
            ("requests", workers),
            ("requests", n),
        ]
        if importlib.util.find_spec("pycurl") is not None:
            backends.append(("curl", workers))
        for backend, count in backends:
            d, u = fresh(f"fp-{backend}-{count}")
            done_at: dict[str, float] = {}

            def progress(event: ProgressEvent, done_at: dict[str, float] = done_at) -> None:
                if event.state in ("done", "failed"):
                    done_at[event.url] = time.perf_counter()

            start = time.perf_counter()
            results = download_all(
                u, d, workers=count, retry=POLICY, backend=backend, progress=progress
            )
            name = (
                f"fetchpool ({count} workers)"
                if backend == "requests"
                else (f"fetchpool, curl backend ({count})")
            )
            row = Row(name, count, time.perf_counter() - start, results=results)
            row.retries = sum(max(0, r.attempts - 1) for r in results)
            first_try = [done_at.get(r.url, start) for r in results if r.attempts == 1]
            row.first_try_done = max(first_try, default=start) - start
            check(row, {r.url: r.path for r in results})
            for failure in results.failed:
                print(f"fetchpool failure: {failure.url}: {failure.error}", file=sys.stderr)
    return rows


def spread(urls: list[str], extra: list[str]) -> list[str]:
    """``urls`` with ``extra`` inserted at evenly spaced places (faults come anywhere)."""
    out = list(urls)
    step = (len(urls) + len(extra)) / len(extra)
    for i, url in enumerate(extra):
        out.insert(int(step * i + step / 2), url)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="number of images (default 100)")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="per request (100)")
    parser.add_argument("--workers", type=int, default=16, help="pool threads (16)")
    parser.add_argument("--urls", type=Path, help="a file of real URLs, one per line")
    parser.add_argument("--chart", type=Path, help="draw the comparison to this PNG")
    args = parser.parse_args()
    minimum = 8 + FLAKY + len(COLLIDING)  # the corpus has its colliding cats from 8 images
    if args.n < minimum:
        parser.error(f"--n must be at least {minimum}")
    plt = load_pyplot() if args.chart else None
    if args.chart and plt is None:
        # Said up front, before a run of several seconds; the table is printed anyway.
        print(f"compare.py: {MISSING_MATPLOTLIB}", file=sys.stderr)

    latency: float | None
    if args.urls:
        urls = [
            line.strip()
            for line in args.urls.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        rows = run(urls, args.workers, None)
        latency = None
    else:
        latency = args.latency_ms / 1000
        n_images = args.n - FLAKY - len(COLLIDING)
        with ImageServer(n_images=n_images, latency=latency) as server:
            urls = spread(
                [*server.urls, *(server.url(path) for path in COLLIDING)],
                [server.url(f"/fail/1/503/flaky{i}.png?run=") for i in range(FLAKY)],
            )

            def expected(url: str) -> str:
                return server.expected_sha256(url)

            rows = run(urls, args.workers, expected)

    n = len(urls)
    print_table(rows, n, latency)
    print_summary(rows, args.workers, n)
    if args.chart and plt is not None:
        draw_chart(plt, rows, n, latency, args.chart)
    by = {r.approach: r for r in rows}
    seq, thr = by["sequential"], by["naive threads (joined)"]
    pool, fp = by[f"naive pool ({args.workers} threads)"], by[f"fetchpool ({args.workers} workers)"]
    fp_n = by[f"fetchpool ({n} workers)"]
    ideal = ideal_of(fp, n, latency)
    ok = f"{fp.ok}/{n}" if fp.ok is not None else "n/a"
    ratio = f"{fp.seconds / ideal:.3f}" if ideal else "n/a"
    print(
        f"compare sequential={seq.seconds:.3f} naive_threads={thr.seconds:.3f} "
        f"naive_pool={pool.seconds:.3f} fetchpool={fp.seconds:.3f} "
        f"fetchpool_one_per_url={fp_n.seconds:.3f} "
        f"ideal={ideal if ideal is None else round(ideal, 3)} "
        f"fetchpool_vs_ideal={ratio} files_ok={ok}"
    )
    if args.chart and plt is None:
        print(f"compare.py: no chart drawn: {MISSING_MATPLOTLIB}", file=sys.stderr)
        return 1
    every_fetchpool_ok = all(r.ok in (None, n) for r in rows if r.results is not None)
    return 0 if every_fetchpool_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
