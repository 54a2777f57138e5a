"""Subprocess entry point for test_concurrency.py: an ImageServer in a process of its own.

Prints the base URL on one line, then serves until its stdin is closed. Used where the
server's own memory must not be counted (tracemalloc in the test process).
"""

from __future__ import annotations

import sys

from fetchpool.testing import ImageServer


def main() -> int:
    with ImageServer(n_images=0) as server:
        print(server.base_url, flush=True)
        sys.stdin.read()  # returns when the parent closes our stdin
    return 0


if __name__ == "__main__":
    sys.exit(main())
