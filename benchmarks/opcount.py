"""A deterministic cost proxy: fetchpool's Python bytecodes and calls per file.

Wall-clock and CPU times on a shared VM vary by a third from one round to the next; the
number of bytecodes a download runs does not. This counts them, with ``sys.settrace``
(opcode events), over ``download_all`` of small files from the benchmark server into
tmpfs, by thread (the caller's, the curl loop's, workers') and by function, so that a
trim of the per-file work can be judged before any timing.

    python -m benchmarks.opcount [--backend curl] [--files 300] [--top 40] [--src DIR]

``--src`` counts the fetchpool found in ``DIR`` (a checkout's ``src``) instead of the one
installed: two revisions can be compared in one session. Where creating a file is slow
(a busy disk), the curl backend sends downloads through its steps; the count takes the
express lane regardless, as on tmpfs.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from .harness import ServerProcess
from .scenarios import TMPFS

_WARM_UP = 20


class _Counter:
    """Counts opcode events and calls by thread and by function while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.ops: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.by_function: collections.Counter[str] = collections.Counter()

    def trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        if not self.on:
            return None
        thread = threading.current_thread().name.split("_")[0]
        self.calls[thread] += 1
        frame.f_trace_opcodes = True
        code = frame.f_code
        key = f"{thread[:14]:14} {Path(code.co_filename).name}:{code.co_name}"
        ops, by_function = self.ops, self.by_function

        def local(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "opcode":
                ops[thread] += 1
                by_function[key] += 1
            return local

        return local


def count(backend: str, files: int, src: str | None) -> tuple[_Counter, int]:
    """Download ``files`` small files under the tracer; return the counts and the files."""
    if src is not None:
        sys.path.insert(0, src)
    fetchpool = importlib.import_module("fetchpool")
    if src is not None and not str(fetchpool.__file__).startswith(src):
        raise SystemExit(f"fetchpool was imported from {fetchpool.__file__}, not {src}")
    pipeline: Any = importlib.import_module("fetchpool.pipeline")
    pipeline.slow_to_create = lambda directory: False
    config = {
        "latency": 0,
        "collections": [
            {
                "name": "img",
                "count": files,
                "distinct": files,
                "size": 16384,
                "kind": None,
                "seed": 0,
            }
        ],
    }
    counter = _Counter()
    root = TMPFS if Path(TMPFS).is_dir() else None
    with ServerProcess(config) as server:
        urls = [url for url, _, _ in server.urls("img", files)]
        for warm in (True, False):
            dest = tempfile.mkdtemp(prefix="fpbench-opcount-", dir=root)
            try:
                if warm:  # imports, the first connections, the directory's checks
                    fetchpool.download_all(urls[:_WARM_UP], dest, workers=16, backend=backend)
                    continue
                threading.settrace(counter.trace)
                sys.settrace(counter.trace)
                counter.on = True
                try:
                    results = fetchpool.download_all(urls, dest, workers=16, backend=backend)
                finally:
                    counter.on = False
                    sys.settrace(None)
                    threading.settrace(None)
                if len(results.succeeded) != files:
                    raise SystemExit(f"not every download succeeded: {results.summary()}")
            finally:
                shutil.rmtree(dest, ignore_errors=True)
    return counter, files


def main(argv: list[str] | None = None) -> int:
    """Entry point: print bytecodes and calls per file, by thread, then by function."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.opcount", description=__doc__)
    parser.add_argument("--backend", default="curl", choices=("curl", "requests"))
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--top", type=int, default=40, help="functions listed (0: none)")
    parser.add_argument("--src", help="count the fetchpool in this directory")
    args = parser.parse_args(argv)
    counter, files = count(args.backend, args.files, args.src)
    total = sum(counter.ops.values())
    threads = ", ".join(f"{name} {n / files:.0f}" for name, n in counter.ops.most_common())
    print(
        f"{args.backend}: {total / files:.0f} bytecodes a file, "
        f"{sum(counter.calls.values()) / files:.1f} Python calls a file ({threads})"
    )
    for key, n in counter.by_function.most_common(args.top):
        print(f"{n / files:8.1f}  {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
