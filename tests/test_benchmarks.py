"""Smoke tests of the benchmark harness (``python -m benchmarks``), tiny sizes only.

No timing is asserted: only that the harness runs, writes its report in the documented
shape, and that fetchpool's files verify against the server's sha256.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quick_cpu_bound_writes_markdown_and_json(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--scenario",
            "cpu-bound",
            "--repeat",
            "1",
            "--contestants",
            "fetchpool,hand-pool",
            "--no-profile",
            "--no-chart",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "results.json").read_text())
    assert {"cpu", "cores", "python", "kernel"} <= set(data["machine"])
    scenario = data["scenarios"]["cpu-bound"]
    runs = {run["contestant"]: run for run in scenario["runs"]}
    assert set(runs) == {"fetchpool", "hand-pool"}
    fetchpool_run = runs["fetchpool"]
    assert fetchpool_run["n"] == scenario["n"] > 0
    assert fetchpool_run["files_ok"] == fetchpool_run["n"]
    assert fetchpool_run["failures"] == 0
    assert fetchpool_run["seconds"] > 0
    assert fetchpool_run["peak_rss_kib"] > 0
    assert 0 < fetchpool_run["cpu"] < 60
    assert set(scenario["medians"]) == {"fetchpool", "hand-pool"}
    assert set(scenario["cpu_medians"]) == {"fetchpool", "hand-pool"}
    assert scenario["ideal"]["seconds"] > 0
    markdown = (out / "results.md").read_text()
    assert markdown == proc.stdout.rstrip("\n") + "\n"
    assert "| contestant | seconds (median) | CPU s (median) | runs | files ok |" in markdown
    assert "fetchpool / hand-pool = " in markdown
    assert "(CPU time: " in markdown
    assert "median of the per-round ratios: " in markdown
    assert "ratio to ideal" in markdown
    assert "| fetchpool |" in markdown
    assert not (out / "results.png").exists()

    # The same report, rendered again from the JSON alone.
    again = tmp_path / "again"
    again.mkdir()
    command = [sys.executable, "-m", "benchmarks", "--render", str(out / "results.json")]
    proc = subprocess.run(
        [*command, "--no-chart", "--out", str(again)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rendered = (again / "results.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert table
    assert [line for line in rendered.splitlines() if line.startswith("|")] == table
    assert json.loads((again / "results.json").read_text()) == data


def test_missing_tools_are_skipped_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import contestants

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert contestants.unavailable("wget2") == "wget2 not installed"
    assert contestants.unavailable("fetchpool") is None


def test_profile_summary_leaves_out_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.profiling import summarize_raw

    raw = (
        "_find_and_load (<frozen importlib._bootstrap>:1176);f (a.py:1) 7\n"
        "Thread.run (threading.py:975);work (fetchpool/x.py:3);send (http/client.py:9) 3\n"
        "Thread.run (threading.py:975);work (fetchpool/x.py:4) 1\n"
    )
    text = summarize_raw(raw, "title")
    assert "4 active samples (7 more in start-up/imports, left out)" in text
    assert " 75.0%  send (http/client.py)" in text
    assert "100.0%  work (fetchpool/x.py)" in text
    assert "Thread.run" not in text
