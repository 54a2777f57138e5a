"""Subprocess entry point for test_concurrency.py: run ``download_all`` in a child process.

Usage: ``python _proc_fetch.py CONFIG.json`` where the JSON object holds

- ``urls`` (list of str), ``dest`` (str), ``workers`` (int);
- ``out`` (str or null): where to write the results as JSON (written atomically);
- ``ready`` (str or null): a file created once fetchpool is imported;
- ``named_temp_files`` (bool): use named ``.part`` files, not ``O_TMPFILE``;
- ``go`` (str or null): a file to wait for (at most ``go_timeout`` seconds) before starting;
- ``retry`` (int, default 4) and ``resume`` (bool, default false): those options.

On ``KeyboardInterrupt`` the child writes ``{"interrupted": true}`` to ``out`` and lets the
interrupt go on, so it exits the way an interrupted Python program does.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def main(config_path: str) -> int:
    # A child started from a shell job may inherit SIGINT ignored: restore Python's handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    from fetchpool import download_all  # imported here: "ready" means imported

    if config.get("named_temp_files"):
        import fetchpool.storage

        fetchpool.storage.UNNAMED = False

    out: str | None = config.get("out")
    if config.get("ready"):
        Path(config["ready"]).touch()
    go: str | None = config.get("go")
    if go:
        deadline = time.monotonic() + float(config.get("go_timeout", 30.0))
        while not os.path.exists(go):
            if time.monotonic() > deadline:
                print("timed out waiting for the go file", file=sys.stderr)
                return 3
            threading.Event().wait(0.005)
    started = time.time()
    try:
        results = download_all(
            config["urls"],
            config["dest"],
            workers=int(config["workers"]),
            backend=config.get("backend", "requests"),
            retry=int(config.get("retry", 4)),
            resume=bool(config.get("resume", False)),
        )
    except KeyboardInterrupt:
        if out:
            _write_json(out, {"interrupted": True})
        raise
    if out:
        # When the batch ran, in wall-clock time that other processes can compare.
        _write_json(out + ".span", [started, time.time()])
        _write_json(
            out,
            [
                {
                    "url": r.url,
                    "path": None if r.path is None else str(r.path),
                    "status": r.status,
                    "error": None if r.error is None else repr(r.error),
                }
                for r in results
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
