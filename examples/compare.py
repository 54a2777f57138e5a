"""Sequential vs threaded downloads, done honestly: the classic tutorial comparison, offline.

The tutorial downloads images in a plain loop, then with one ``threading.Thread`` per URL
(``requests.get(url).content`` saved as ``url.split('/')[-1]``), and reports the speed-up.
But it times the threads without joining them, names collide silently, and a failed
transfer is saved as if it were the image. This script runs, in one process and each on a
fresh directory:

1. the sequential loop;
2. the tutorial's threads, timed the tutorial's way (no join) and correctly;
3. ``fetchpool.download_all``.

It starts ``fetchpool.testing.ImageServer`` itself (real HTTP on 127.0.0.1, no internet),
with per-request latency, images of realistic sizes, URLs whose basenames collide and a few
that fail once with 503. Every file is checked against the server's sha256.

    python examples/compare.py [--n 100] [--latency-ms 100] [--workers 16]
    python examples/compare.py --urls urls.txt     # real URLs: same table, no verification
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

from fetchpool import RetryPolicy, download_all
from fetchpool.testing import ImageServer

FLAKY = 4  # URLs that answer 503 once, then the image


@dataclass
class Row:
    approach: str
    seconds: float
    ok: int | None = None
    lost: int | None = None
    overwritten: int | None = None
    corrupt: int | None = None


def tutorial_name(url: str) -> str:
    return url.rsplit("/", maxsplit=1)[-1]


def sequential(urls: list[str], dest: Path) -> dict[str, Path]:
    """The tutorial's loop: one request after another."""
    paths = {}
    for url in urls:
        data = requests.get(url, timeout=30).content
        path = dest / tutorial_name(url)
        path.write_bytes(data)
        paths[url] = path
    return paths


def naive_threads(urls: list[str], dest: Path) -> tuple[float, float, dict[str, Path]]:
    """The tutorial's threads; returns (seconds without join, seconds with join, paths)."""

    def fetch(url: str) -> None:
        data = requests.get(url, timeout=30).content
        (dest / tutorial_name(url)).write_bytes(data)

    start = time.perf_counter()
    threads = [threading.Thread(target=fetch, args=(url,)) for url in urls]
    for t in threads:
        t.start()
    unjoined = time.perf_counter() - start  # what the tutorial prints
    for t in threads:
        t.join()
    joined = time.perf_counter() - start
    return unjoined, joined, {url: dest / tutorial_name(url) for url in urls}


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


def print_table(rows: list[Row], ideal: float | None, n: int) -> None:
    base = next(r.seconds for r in rows if r.approach == "sequential")
    print(
        f"{'approach':<34} {'seconds':>8} {'correct':>8} {'lost':>5} {'overwr.':>8} "
        f"{'corrupt':>8} {'speed-up':>9} {'x ideal':>8}"
    )
    for r in rows:
        over = f"{r.seconds / ideal:.2f}" if ideal else "n/a"
        correct = "n/a" if r.ok is None else f"{r.ok}/{n}"
        print(
            f"{r.approach:<34} {r.seconds:>8.3f} {correct:>8} {fmt(r.lost):>5} "
            f"{fmt(r.overwritten):>8} {fmt(r.corrupt):>8} {base / r.seconds:>8.1f}x {over:>8}"
        )


def draw_chart(rows: list[Row], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--chart needs matplotlib: pip install 'fetchpool[examples]'")
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh([r.approach for r in rows], [r.seconds for r in rows], color="#4c72b0")
    ax.set_xlabel("seconds (lower is better)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"chart written to {out}")


def run(urls: list[str], workers: int, expected: Callable[[str], str] | None) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fetchpool-compare-") as tmp:
        root = Path(tmp)

        def fresh(name: str, variant: str) -> tuple[Path, list[str]]:
            # /fail/ routes fail once per distinct URL: give each approach its own.
            d = root / name
            d.mkdir()
            return d, [u.replace("?run=", f"?run={variant}") if "?run=" in u else u for u in urls]

        d, u = fresh("sequential", "seq")
        start = time.perf_counter()
        paths: dict[str, Path | None] = dict(sequential(u, d))
        rows.append(Row("sequential", time.perf_counter() - start))
        if expected:
            verify(rows[-1], paths, expected)

        d, u = fresh("threads", "thr")
        unjoined, joined, tpaths = naive_threads(u, d)
        rows.append(Row("naive threads (no join, as shown)", unjoined))
        rows.append(Row("naive threads (joined)", joined))
        if expected:
            verify(rows[-1], dict(tpaths), expected)
            for key in ("ok", "lost", "overwritten", "corrupt"):
                setattr(rows[-2], key, getattr(rows[-1], key))

        d, u = fresh("fetchpool", "fp")
        start = time.perf_counter()
        # A short backoff: the flaky URLs heal at once, and waiting 0.5-1.5 s would
        # mostly measure the default policy's patience.
        policy = RetryPolicy(wait_initial=0.1, jitter=0.1)
        results = download_all(u, d, workers=workers, retry=policy)
        rows.append(Row(f"fetchpool ({workers} workers)", time.perf_counter() - start))
        if expected:
            verify(rows[-1], {r.url: r.path for r in results}, expected)
        for failure in results.failed:
            print(f"fetchpool failure: {failure.url}: {failure.error}", file=sys.stderr)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="number of images (default 100)")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="per request (100)")
    parser.add_argument("--workers", type=int, default=16, help="fetchpool threads (16)")
    parser.add_argument("--urls", type=Path, help="a file of real URLs, one per line")
    parser.add_argument("--chart", type=Path, help="draw the comparison to this PNG")
    args = parser.parse_args()
    if args.n < 8:
        parser.error("--n must be at least 8")

    if args.urls:
        urls = [
            line.strip()
            for line in args.urls.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        rows = run(urls, args.workers, None)
        ideal = None
    else:
        latency = args.latency_ms / 1000
        with ImageServer(n_images=args.n - FLAKY, latency=latency) as server:
            urls = list(server.urls) + [
                server.url(f"/fail/1/503/flaky{i}.png?run=") for i in range(FLAKY)
            ]

            def expected(url: str) -> str:
                return server.expected_sha256(url)

            rows = run(urls, args.workers, expected)
        ideal = math.ceil(len(urls) / args.workers) * latency

    print_table(rows, ideal, len(urls))
    if args.chart:
        draw_chart(rows, args.chart)
    by = {r.approach: r for r in rows}
    seq, thr = by["sequential"], by["naive threads (joined)"]
    fp = rows[-1]
    ok = f"{fp.ok}/{len(urls)}" if fp.ok is not None else "n/a"
    ratio = f"{fp.seconds / ideal:.3f}" if ideal else "n/a"
    print(
        f"compare sequential={seq.seconds:.3f} naive_threads={thr.seconds:.3f} "
        f"fetchpool={fp.seconds:.3f} ideal={ideal if ideal is None else round(ideal, 3)} "
        f"fetchpool_vs_ideal={ratio} files_ok={ok}"
    )
    return 0 if fp.ok in (None, len(urls)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
