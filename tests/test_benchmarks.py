"""Smoke tests of the benchmark harness (``python -m benchmarks``), tiny sizes only.

No timing is asserted: only that the harness runs, writes its report in the documented
shape, and that fetchpool's files verify against the server's sha256.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quick_cpu_bound_writes_markdown_and_json(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = _quick_run("fetchpool,hand-pool", out)
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
    proc = _run_module(
        "benchmarks", "--render", str(out / "results.json"), "--no-chart", "--out", str(again)
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


def _run_module(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <args>`` in the repository, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _quick_run(contestants: str, out: Path) -> subprocess.CompletedProcess[str]:
    """Run the quick CPU-bound scenario once for ``contestants``, no profile or chart."""
    return _run_module(
        *["benchmarks", "--quick", "--scenario", "cpu-bound", "--repeat", "1"],
        *["--contestants", contestants, "--no-profile", "--no-chart", "--out", str(out)],
    )


def test_curl_backend_runs_or_is_skipped_with_a_note(tmp_path: Path) -> None:
    # Skipped while pycurl is missing or fetchpool refuses backend="curl"; once both
    # are there, it runs and every file must verify.
    out = tmp_path / "results"
    proc = _quick_run("fetchpool-curl,hand-pool", out)
    assert proc.returncode == 0, proc.stderr
    scenario = json.loads((out / "results.json").read_text())["scenarios"]["cpu-bound"]
    runs = {run["contestant"]: run for run in scenario["runs"]}
    markdown = (out / "results.md").read_text()
    if "fetchpool-curl" in scenario["skipped"]:
        assert set(runs) == {"hand-pool"}
        assert f"skipped: fetchpool-curl: {scenario['skipped']['fetchpool-curl']}." in markdown
    else:
        assert set(runs) == {"fetchpool-curl", "hand-pool"}
        assert runs["fetchpool-curl"]["files_ok"] == runs["fetchpool-curl"]["n"] > 0
        assert runs["fetchpool-curl"]["failures"] == 0
        assert "| fetchpool-curl |" in markdown
    assert "CPU µs per file (median CPU s / 200 files" in markdown


def test_curl_backend_is_a_contestant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import child, contestants, harness
    from benchmarks.__main__ import parse_args

    assert contestants.PYTHON_CONTESTANTS[:2] == ("fetchpool", "fetchpool-curl")
    assert set(contestants.RUNNERS) == set(
        contestants.PYTHON_CONTESTANTS + contestants.REFERENCE_CONTESTANTS
    )
    assert set(contestants.DESCRIPTIONS) == set(contestants.ALL_CONTESTANTS)
    assert "backend='requests'" in contestants.DESCRIPTIONS["fetchpool"]
    assert "backend='curl'" in contestants.DESCRIPTIONS["fetchpool-curl"]
    assert contestants.fetchpool_options("fetchpool") == {}
    assert contestants.fetchpool_options("fetchpool-curl") == {"backend": "curl"}
    backends = {
        opts.get("backend", "requests") for opts in contestants.FETCHPOOL_CONTESTANTS.values()
    }
    assert backends <= set(child._BACKEND_MODULES)
    assert {"fetchpool", "fetchpool-curl"} <= set(harness.PROFILED)
    # peak-rss (the big file and map()) runs for every fetchpool backend chosen.
    assert harness.peak_rss_contestants(contestants.ALL_CONTESTANTS) == [
        "fetchpool",
        "fetchpool-curl",
    ]
    assert harness.peak_rss_contestants(["fetchpool-curl", "curl"]) == ["fetchpool-curl"]
    assert harness.peak_rss_contestants(["hand-pool"]) == ["fetchpool"]
    assert "fetchpool-curl" in parse_args([]).contestants
    assert parse_args(["--contestants", "fetchpool-curl"]).contestants == ["fetchpool-curl"]


def test_the_floor_runs_only_when_named_and_only_cpu_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import harness
    from benchmarks.__main__ import parse_args
    from benchmarks.scenarios import scenarios

    assert "pycurl-floor" not in parse_args([]).contestants
    assert parse_args(["--contestants", "pycurl-floor"]).contestants == ["pycurl-floor"]
    table = scenarios(quick=True)
    for name, scenario in table.items():
        result = harness.ScenarioResult(name, scenario.title, 1, 1, 0.0, "", "")
        chosen = harness._available(["pycurl-floor"], scenario, result, io.StringIO())
        if name == "cpu-bound":
            assert chosen == ["pycurl-floor"]
        else:
            assert chosen == []
            assert result.skipped["pycurl-floor"] == "a reference for cpu-bound only"


def test_curl_backend_unavailable_without_pycurl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    import importlib.util

    from benchmarks import contestants

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "pycurl" else real(name)
    )
    assert contestants.unavailable("fetchpool-curl") == "pycurl not installed"
    assert contestants.unavailable("fetchpool") is None


def test_curl_backend_unavailable_while_fetchpool_refuses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    import importlib.util

    from benchmarks import contestants

    import fetchpool

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: object() if name == "pycurl" else real(name)
    )
    seen: list[tuple[int, dict[str, object]]] = []

    class Refusing:
        def __init__(self, dest: str, workers: int, **options: object) -> None:
            seen.append((workers, options))
            raise ValueError("backend must be one of 'requests', not 'curl'")

    monkeypatch.setattr(fetchpool, "Downloader", Refusing)
    assert contestants.unavailable("fetchpool-curl") == (
        "fetchpool refuses backend='curl': ValueError: "
        "backend must be one of 'requests', not 'curl'"
    )
    assert seen == [(1, {"backend": "curl"})]

    class Accepting:
        def __init__(self, dest: str, workers: int, **options: object) -> None:
            assert Path(dest).is_dir()

        def __enter__(self) -> Accepting:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(fetchpool, "Downloader", Accepting)
    assert contestants.unavailable("fetchpool-curl") is None


def _fake_run(name: str, seconds: float, cpu: float, n: int, rss_kib: int = 40 * 1024) -> Any:
    from benchmarks.harness import Run

    return Run(
        contestant=name,
        seconds=seconds,
        wall=seconds,
        files_ok=n,
        n=n,
        peak_rss_kib=rss_kib,
        server_cpu=0.1,
        exit_code=0,
        cpu=cpu,
    )


_FAKE_MACHINE = {
    "cpu": "test CPU",
    "cores": 2,
    "memory": "1.0 GiB",
    "python": "3.11.7",
    "kernel": "6.0",
    "date": "2024-01-01 00:00:00 UTC",
    "fetchpool": "0.1.0 (commit abc1234)",
    "requests": "2.32.0",
    "tools": {"curl": "curl 8.0.0"},
}


def test_report_gives_the_curl_backends_ratios(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.harness import ScenarioResult
    from benchmarks.report import markdown
    from benchmarks.scenarios import scenarios

    table = scenarios(quick=False)
    cpu_bound = ScenarioResult.of(table["cpu-bound"])
    n = cpu_bound.n
    assert n == 2000
    # Two interleaved rounds: (contestant, seconds, CPU seconds).
    for curl_backend in ((1.0, 0.4), (2.0, 0.6)):
        cpu_bound.runs += [
            _fake_run("fetchpool", 4.0, 5.0, n),
            _fake_run("fetchpool-curl", *curl_backend, n),
            _fake_run("hand-pool", 4.0, 4.0, n),
            _fake_run("curl", 0.5, 0.2, n),
        ]
    cpu_bound.skipped["wget2"] = "wget2 not installed"
    cpu_bound.ideal = {"kind": "write floor", "seconds": 0.25}
    many_files = ScenarioResult.of(table["many-files"])
    many_files.runs += [
        _fake_run("fetchpool", 10.0, 8.0, many_files.n),
        _fake_run("hand-pool", 9.0, 7.0, many_files.n),
    ]
    many_files.skipped["fetchpool-curl"] = "pycurl not installed"

    report = markdown([cpu_bound, many_files], _FAKE_MACHINE, 2)
    cpu_section, many_section = report.split("### ")[1:3]
    assert (
        "fetchpool / hand-pool = 1.000 (CPU time: 1.250); "
        "median of the per-round ratios: 1.000 (1.000, 1.000)." in cpu_section
    )
    assert (
        "fetchpool-curl / fetchpool = 0.375 (CPU time: 0.100); "
        "median of the per-round ratios: 0.375 (0.250, 0.500)." in cpu_section
    )
    assert (
        "fetchpool-curl / curl = 3.000 (CPU time: 2.500); "
        "median of the per-round ratios: 3.000 (2.000, 4.000)." in cpu_section
    )
    assert "fetchpool-curl / wget2: n/a (wget2 skipped: wget2 not installed)." in cpu_section
    assert (
        "CPU µs per file (median CPU s / 2,000 files; tools: the whole process): "
        "fetchpool-curl 250, fetchpool 2,500, curl 100, hand-pool 2,000." in cpu_section
    )
    assert "| fetchpool-curl | 1.500 | 0.500 | 2 | 2000/2000 |" in cpu_section
    # The curl backend skipped: a note, no ratio; CPU per file only where CPU-bound.
    assert "skipped: fetchpool-curl: pycurl not installed." in many_section
    assert "fetchpool-curl /" not in many_section
    assert "fetchpool / hand-pool = 1.111" in many_section
    assert "CPU µs per file" not in many_section
    assert "- `fetchpool-curl`: fetchpool.download_all(urls, dest, workers=N, backend='curl')" in (
        report
    )

    # What the report says comes from the JSON alone.
    again = [ScenarioResult.from_json(r.to_json()) for r in (cpu_bound, many_files)]
    assert markdown(again, _FAKE_MACHINE, 2) == report


def test_peak_rss_report_per_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.harness import ScenarioResult
    from benchmarks.report import scenario_markdown
    from benchmarks.scenarios import scenarios

    result = ScenarioResult.of(scenarios(quick=True)["peak-rss"])
    mib = 1024
    result.runs += [
        _fake_run("fetchpool (big file)", 0.5, 0.1, 1, 32 * mib),
        _fake_run("fetchpool-curl (big file)", 0.4, 0.1, 1, 70 * mib),
        _fake_run("fetchpool map() x 200", 0.2, 0.1, 200, 33 * mib),
        _fake_run("fetchpool-curl map() x 200", 0.1, 0.1, 200, 30 * mib),
        _fake_run("fetchpool map() x 2,000", 2.0, 1.0, 2000, 34 * mib),
        _fake_run("fetchpool-curl map() x 2,000", 1.0, 0.5, 2000, 30 * mib),
    ]
    text = scenario_markdown(result)
    assert "\nbig file: max peak RSS 32.0 MiB (target <= 64): met.\n" in text
    assert "\nfetchpool-curl big file: max peak RSS 70.0 MiB (target <= 64): missed.\n" in text
    assert (
        "\nmap(): peak RSS 33.0 MiB at 200 URLs, 34.0 MiB at 2,000 URLs (+1.0 MiB); "
        "2,000 URLs took 2.0 s.\n" in text
    )
    assert (
        "\nfetchpool-curl map(): peak RSS 30.0 MiB at 200 URLs, 30.0 MiB at 2,000 URLs "
        "(+0.0 MiB); 2,000 URLs took 1.0 s.\n" in text
    )

    skipped = ScenarioResult.of(scenarios(quick=True)["peak-rss"])
    skipped.runs += [r for r in result.runs if not r.contestant.startswith("fetchpool-curl")]
    skipped.skipped["fetchpool-curl"] = "pycurl not installed"
    text = scenario_markdown(skipped)
    assert "skipped: fetchpool-curl: pycurl not installed." in text
    assert "fetchpool-curl" not in text.replace("skipped: fetchpool-curl", "")


def test_resumed_big_file_sends_only_the_rest() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = _run_module(
        "benchmarks.resumed", "--size-mib", "4", "--repeat", "1", timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    backends = ["requests", "curl"] if importlib.util.find_spec("pycurl") else ["requests"]
    assert len(lines) == len(backends)
    for line, backend in zip(lines, backends, strict=True):
        assert line.startswith(f"resumed big file ({backend}): 4 MiB body; second run sent ")
        assert "(50.0% of the body)" in line


def _pycurl_or_skip() -> None:
    if importlib.util.find_spec("pycurl") is None:
        pytest.skip("pycurl is not installed")


def test_opcount_counts_bytecodes_per_file() -> None:
    _pycurl_or_skip()
    proc = _run_module("benchmarks.opcount", "--files", "30", "--top", "3", timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    head = lines[0]
    assert head.startswith("curl: ")
    per_file = int(head.split()[1])
    assert per_file > 1000  # a download is thousands of bytecodes, not none
    assert "fetchpool-curl " in head
    assert "MainThread " in head
    assert len(lines) == 4  # the three functions that cost most


def test_versus_compares_two_revisions() -> None:
    _pycurl_or_skip()
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    proc = _run_module(
        "benchmarks.versus", "HEAD", ".", "--repeat", "1", "--files", "40", timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("HEAD: median ")
    assert lines[1].startswith(".: median ")
    assert lines[2].startswith(". / HEAD: median of the per-round ratios ")


def test_budget_and_the_floor_contestant_run() -> None:
    _pycurl_or_skip()
    proc = _run_module("benchmarks.budget", "--repeat", "1", "--files", "40", timeout=300)
    assert proc.returncode == 0, proc.stderr
    runs = [line.split()[0] for line in proc.stdout.splitlines() if " µs CPU a file" in line]
    assert runs == ["bare", "floor", "helpers", "fetchpool-curl"]
    for other in ("bare", "floor", "helpers"):
        assert f"fetchpool-curl / {other}: " in proc.stdout


def test_the_floor_contestant_verifies_its_files(tmp_path: Path) -> None:
    _pycurl_or_skip()
    out = tmp_path / "results"
    proc = _quick_run("pycurl-floor,fetchpool-curl", out)
    assert proc.returncode == 0, proc.stderr
    scenario = json.loads((out / "results.json").read_text())["scenarios"]["cpu-bound"]
    floor = [run for run in scenario["runs"] if run["contestant"] == "pycurl-floor"]
    assert len(floor) == 1
    assert floor[0]["files_ok"] == floor[0]["n"] > 0
    assert "fetchpool-curl / pycurl-floor = " in (out / "results.md").read_text()
