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
with per-request latency, images of realistic sizes, three groups of URLs whose basenames
collide (``/a/cat.jpg`` and ``/b/cat.jpg``, ...) and four that fail once with 503. Every file
is checked against the server's sha256.

    python examples/compare.py [--n 100] [--latency-ms 100] [--workers 16] [--chart out.png]
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
from types import ModuleType

import requests

from fetchpool import RetryPolicy, download_all
from fetchpool.testing import ImageServer

FLAKY = 4  # URLs that answer 503 once, then the image
# Besides the corpus's /a/cat.jpg and /b/cat.jpg: more URLs that share a basename.
COLLIDING = ("/any/2023/photo.png", "/any/2024/photo.png", "/any/icons/logo.gif", "/any/logo.gif")
MISSING_MATPLOTLIB = "--chart needs matplotlib: pip install 'fetchpool[examples]'"


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


def draw_chart(plt: ModuleType, rows: list[Row], ideal: float | None, n: int, out: Path) -> None:
    """Draw the seconds of each approach as bars, labelled with the files it got right."""
    fig, ax = plt.subplots(figsize=(9, 3.5))
    bars = ax.barh([r.approach for r in rows], [r.seconds for r in rows], color="#4c72b0")
    labels = [
        f" {r.seconds:.2f} s" + ("" if r.ok is None else f", {r.ok}/{n} correct") for r in rows
    ]
    white = {"facecolor": "white", "edgecolor": "none", "pad": 1}
    ax.bar_label(bars, labels=labels, fontsize=9, padding=2, bbox=white)
    if ideal:
        label = f"ideal ({ideal:.2f} s)"
        ax.axvline(ideal, color="#c44e52", linestyle="--", linewidth=1, label=label, zorder=0)
        ax.legend(loc="lower right")
    ax.set_xlabel("seconds (lower is better)")
    ax.set_xlim(0, max(r.seconds for r in rows) * 1.35)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"chart written to {out}")


def run(urls: list[str], workers: int, expected: Callable[[str], str] | None) -> list[Row]:
    rows: list[Row] = []
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
    minimum = 8 + FLAKY + len(COLLIDING)  # the corpus has its colliding cats from 8 images
    if args.n < minimum:
        parser.error(f"--n must be at least {minimum}")
    plt = load_pyplot() if args.chart else None
    if args.chart and plt is None:
        # Said up front, before a run of several seconds; the table is printed anyway.
        print(f"compare.py: {MISSING_MATPLOTLIB}", file=sys.stderr)

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
        n_images = args.n - FLAKY - len(COLLIDING)
        with ImageServer(n_images=n_images, latency=latency) as server:
            urls = [
                *server.urls,
                *(server.url(path) for path in COLLIDING),
                *(server.url(f"/fail/1/503/flaky{i}.png?run=") for i in range(FLAKY)),
            ]

            def expected(url: str) -> str:
                return server.expected_sha256(url)

            rows = run(urls, args.workers, expected)
        ideal = math.ceil(len(urls) / args.workers) * latency

    print_table(rows, ideal, len(urls))
    if args.chart and plt is not None:
        draw_chart(plt, rows, ideal, len(urls), args.chart)
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
    if args.chart and plt is None:
        print(f"compare.py: no chart drawn: {MISSING_MATPLOTLIB}", file=sys.stderr)
        return 1
    return 0 if fp.ok in (None, len(urls)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
