"""The ``fetchpool`` command in a shell script's shoes: a URL list in, files and a report out.

Runs offline against fetchpool's loopback image server. It writes ``urls.txt`` (with a
comment, a blank line, a bad line and a 404), runs the same command a shell user would
type, then reads the JSON Lines report and runs the command again to show that finished
files are skipped. The command it runs is printed first, so you can copy it.

    python examples/command_line.py [--dest DIR]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from fetchpool.testing import ImageServer


def fetchpool(options: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the command (``python -m fetchpool`` is the console script, found without PATH)."""
    command = [sys.executable, "-m", "fetchpool", *options]
    return subprocess.run(command, capture_output=True, text=True, check=False, cwd=cwd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, help="directory (default: a temporary one)")
    args = parser.parse_args()

    with (
        ImageServer(n_images=6) as server,
        tempfile.TemporaryDirectory(prefix="fetchpool-cli-") as tmp,
    ):
        work = Path(tmp)
        dest = args.dest.resolve() if args.dest else Path("images")  # relative to work
        lines = ["# product photos", *server.urls[:4], "", "not a url"]
        lines.append(server.url("/status/404/gone.png"))
        (work / "urls.txt").write_text("\n".join(lines) + "\n")

        options = ["-i", "urls.txt", "-d", str(dest), "-w", "4", "--report", "report.jsonl"]
        print("$", shlex.join(["fetchpool", *options]))
        first = fetchpool(options, cwd=work)
        print(first.stderr, end="")
        print(f"exit status {first.returncode} (1: some URLs failed)\n")

        print("report.jsonl:")
        for line in (work / "report.jsonl").read_text().splitlines():
            row = json.loads(line)
            outcome = row["error_type"] or row["status"]
            print(f"  {row['source']:<14} {outcome:<16} {row['path'] or row['error']}")

        again = fetchpool(options, cwd=work)
        print("\nthe same command again:")
        print(again.stderr.splitlines()[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
