"""Summarize py-spy's raw (collapsed-stack) output into top functions."""

from __future__ import annotations

from collections import Counter
from typing import Final

#: Stacks of the interpreter starting up or importing are not download time.
_STARTUP: Final = ("_find_and_load", "<module> (<frozen")
#: Frames that sit under nearly everything and say nothing.
_PLUMBING: Final = (
    "Thread._bootstrap (threading.py)",
    "Thread._bootstrap_inner (threading.py)",
    "Thread.run (threading.py)",
    "_WorkItem.run (concurrent/futures/thread.py)",
    "_worker (concurrent/futures/thread.py)",
    "main (benchmarks/child.py)",
    "<module> (benchmarks/child.py)",
    "_run_module_as_main (<frozen runpy>)",
    "_run_code (<frozen runpy>)",
)


def _function(frame: str) -> str:
    """Drop the line number: ``f (file.py:12)`` becomes ``f (file.py)``."""
    name, _, where = frame.rpartition(" (")
    if not name:
        return frame
    return f"{name} ({where.rsplit(':', 1)[0].rstrip(')')})"


def _package(function: str) -> str:
    """Group a function by where it lives: ``fetchpool/storage.py``, ``urllib3``, ..."""
    where = function.rpartition(" (")[2].rstrip(")")
    if where.startswith(("fetchpool/", "benchmarks/")):
        return where
    if where.startswith("<frozen") or "/" not in where:
        return f"stdlib {where}"
    return where.split("/", 1)[0]


def summarize_raw(raw: str, title: str, top: int = 25) -> str:
    """Return a text report of the most frequent functions, self and inclusive."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    total = 0
    startup = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if any(marker in stack for marker in _STARTUP):
            startup += count
            continue
        frames = [_function(f) for f in stack.split(";")]
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            total_counts[frame] += count
    lines = [
        title,
        f"{total} active samples ({startup} more in start-up/imports, left out)",
        "",
        f"top {top} by self time (the frame on top of the stack):",
    ]
    for frame, count in self_counts.most_common(top):
        lines.append(f"  {100 * count / max(total, 1):5.1f}%  {frame}")
    packages: Counter[str] = Counter()
    for frame, count in self_counts.items():
        packages[_package(frame)] += count
    lines += ["", "self time by module or package:"]
    lines.extend(
        f"  {100 * count / max(total, 1):5.1f}%  {name}" for name, count in packages.most_common(15)
    )
    lines += ["", f"top {top} by inclusive time (anywhere on the stack):"]
    shown = 0
    for frame, count in total_counts.most_common():
        if frame in _PLUMBING:
            continue
        lines.append(f"  {100 * count / max(total, 1):5.1f}%  {frame}")
        shown += 1
        if shown >= top:
            break
    return "\n".join(lines) + "\n"
