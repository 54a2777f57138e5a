"""Two revisions of fetchpool on the CPU-bound scenario, interleaved in one session.

On a noisy machine only ratios measured side by side mean much: this runs the curl
backend's ``download_all`` of small files from one benchmark server into tmpfs, 16 at
once, alternating between two revisions for ``--repeat`` rounds, each download in a
fresh child process (imports excluded from its time), and reports the medians and the
per-round ratios of the second to the first.

    python -m benchmarks.versus REV_A REV_B [--repeat 9] [--files 2000] [--backend curl]

A revision is anything ``git archive`` takes (``HEAD~3``, a commit), or ``.`` for the
working tree's ``src``.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .harness import ROOT, ServerProcess
from .scenarios import TMPFS

_CHILD = r"""
import json, resource, shutil, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
import importlib
import fetchpool
backend = sys.argv[4]
if backend == "curl":
    importlib.import_module("fetchpool.backends.curl")
urls = open(sys.argv[2]).read().split()
dest = tempfile.mkdtemp(prefix="fpbench-versus-", dir=sys.argv[3] or None)
usage = resource.getrusage(resource.RUSAGE_SELF)
cpu = usage.ru_utime + usage.ru_stime
start = time.perf_counter()
results = fetchpool.download_all(urls, dest, workers=16, backend=backend)
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
shutil.rmtree(dest)
if len(results.succeeded) != len(urls):
    raise SystemExit(results.summary())
print(json.dumps([seconds, usage.ru_utime + usage.ru_stime - cpu]))
"""


def _source(revision: str, into: Path) -> str:
    """The ``src`` directory of ``revision`` (extracted under ``into``), or the tree's."""
    if revision == ".":
        return str(ROOT / "src")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision, "src"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    target = into / revision.replace("/", "_")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # 3.10.12 and later
            tar.extractall(target, filter="data")
        else:  # pragma: no cover - our own repository's archive
            tar.extractall(target)
    return str(target / "src")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the rounds and print the medians and the per-round ratios."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.versus", description=__doc__)
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--backend", default="curl", choices=("curl", "requests"))
    args = parser.parse_args(argv)
    config = {
        "latency": 0,
        "collections": [
            {"name": "img", "count": args.files, "distinct": args.files, "size": 16384}
            | {"kind": None, "seed": 0}
        ],
    }
    root = TMPFS if Path(TMPFS).is_dir() else ""
    runs: dict[str, list[tuple[float, float]]] = {args.first: [], args.second: []}
    with (
        tempfile.TemporaryDirectory(prefix="fpbench-versus-") as work,
        ServerProcess(config) as server,
    ):
        sources = {rev: _source(rev, Path(work)) for rev in runs}
        url_file = Path(work) / "urls.txt"
        url_file.write_text("\n".join(url for url, _, _ in server.urls("img", args.files)))
        for _ in range(args.repeat):
            for rev, src in sources.items():
                child = subprocess.run(
                    [sys.executable, "-c", _CHILD, src, str(url_file), root, args.backend],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if child.returncode:
                    raise SystemExit(f"{rev}: {child.stderr.strip()[-2000:]}")
                seconds, cpu = json.loads(child.stdout)
                runs[rev].append((seconds, cpu))
    for rev, got in runs.items():
        print(
            f"{rev}: median {statistics.median(s for s, _ in got):.3f} s, "
            f"{1e6 * statistics.median(c for _, c in got) / args.files:.0f} µs CPU a file; "
            f"rounds {[round(s, 3) for s, _ in got]}"
        )
    ratios = [b[0] / a[0] for a, b in zip(runs[args.first], runs[args.second], strict=True)]
    print(
        f"{args.second} / {args.first}: median of the per-round ratios "
        f"{statistics.median(ratios):.3f} {[round(r, 3) for r in ratios]}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
