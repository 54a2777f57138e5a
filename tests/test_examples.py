"""The examples run offline and say what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.timeout(150)
def test_compare_reports_every_approach_and_a_machine_readable_line() -> None:
    out = run("compare.py", "--n", "16", "--latency-ms", "10", "--workers", "8")
    lines = out.strip().splitlines()
    assert "sequential" in out
    assert "naive threads (no join, as shown)" in out
    assert "naive threads (joined)" in out
    last = lines[-1]
    assert last.startswith("compare sequential=")
    fields = dict(part.split("=", 1) for part in last.split()[1:])
    assert set(fields) == {
        "sequential",
        "naive_threads",
        "fetchpool",
        "ideal",
        "fetchpool_vs_ideal",
        "files_ok",
    }
    assert fields["files_ok"] == "16/16"
    naive = next(line for line in lines if line.startswith("naive threads (joined)"))
    assert "16/16" not in naive  # the tutorial's threads lose or corrupt files


@pytest.mark.timeout(150)
def test_quickstart() -> None:
    out = run("quickstart.py", "--n", "12", "--latency-ms", "10")
    assert "12/12 files match" in out
