"""The examples run offline and say what they promise."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fetchpool.testing import ImageServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# Blocks matplotlib (None in sys.modules makes its import fail), then runs the script.
WITHOUT_MATPLOTLIB = (
    "import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)
COMPARE_FAST = ("--n", "16", "--latency-ms", "5", "--workers", "8")


def run_process(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # No bytecode, so importing an example under pytest leaves nothing in examples/.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
        env=env,
    )


def run(script: str, *args: str) -> str:
    proc = run_process(str(EXAMPLES / script), *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def machine_line(out: str) -> dict[str, str]:
    last = out.strip().splitlines()[-1]
    assert last.startswith("compare sequential="), out
    return dict(part.split("=", 1) for part in last.split()[1:])


def files_below(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


@pytest.mark.timeout(150)
def test_compare_reports_every_approach_and_a_machine_readable_line() -> None:
    out = run("compare.py", "--n", "16", "--latency-ms", "10", "--workers", "8")
    lines = out.strip().splitlines()
    rows = {
        m["approach"]: m.groupdict()
        for m in re.finditer(
            r"^(?P<approach>\S.*?) +(?P<at_once>\d+) +(?P<seconds>\d+\.\d+) +(?P<ideal>\S+) "
            r"+(?P<x_ideal>\S+) +(?P<correct>\d+/16) +(?P<lost>\d+) +(?P<overwritten>\d+) "
            r"+(?P<corrupt>\d+) +(?P<retries>\d+) +\S+x$",
            out,
            re.M,
        )
    }
    # Every approach at a stated concurrency, the naive code at the same as fetchpool's.
    at_once = {name: int(row["at_once"]) for name, row in rows.items()}
    expected = {
        "sequential": 1,
        "naive threads (no join, as shown)": 16,
        "naive threads (joined)": 16,
        "naive pool (8 threads)": 8,
        "fetchpool (8 workers)": 8,
        "fetchpool (16 workers)": 16,
    }
    if importlib.util.find_spec("pycurl") is not None:
        expected["fetchpool, curl backend (8)"] = 8
    assert at_once == expected, out
    for name, row in rows.items():
        # The ideal of each row is for its own concurrency: ceil(16 / n) rounds of 10 ms.
        assert float(row["ideal"]) == pytest.approx(-(-16 // at_once[name]) * 0.01), name
        naive = not name.startswith("fetchpool")
        assert (row["correct"] == "16/16") is not naive, row  # the naive code gets some wrong
        assert int(row["retries"]) == (0 if naive else 4), row
    assert "fetchpool had the 12 files that needed one request by " in out
    assert re.search(r"What its retries cost: 4 URLs answered a transient error", out), out
    bought = re.search(r"bought: the (\d+) files the naive pool got wrong", out)
    assert bought is not None, out
    # Three pairs share a name, four URLs fail once: at least 7 wrong (a race between two
    # writers of one name may spoil both files of the pair).
    pool_ok = int(rows["naive pool (8 threads)"]["correct"].split("/")[0])
    assert int(bought[1]) == 16 - pool_ok >= 7, out
    last = lines[-1]
    assert last.startswith("compare sequential=")
    fields = dict(part.split("=", 1) for part in last.split()[1:])
    assert set(fields) == {
        "sequential",
        "naive_threads",
        "naive_pool",
        "fetchpool",
        "fetchpool_one_per_url",
        "ideal",
        "fetchpool_vs_ideal",
        "files_ok",
    }
    assert fields["files_ok"] == "16/16"
    assert fields["ideal"] == "0.02"


@pytest.mark.timeout(150)
def test_quickstart() -> None:
    out = run("quickstart.py", "--n", "12", "--latency-ms", "10")
    assert "12/12 files match" in out


@pytest.mark.timeout(60)
def test_stream_as_completed_reports_each_result_and_the_404_as_a_typed_error(
    tmp_path: Path,
) -> None:
    out = run("stream_as_completed.py", "--dest", str(tmp_path))
    lines = [line for line in out.splitlines() if re.match(r"\s*\d+\.\d+s\s+#\d", line)]
    assert sorted(int(re.findall(r"#(\d+)", line)[0]) for line in lines) == list(range(6))
    (failure,) = [line for line in lines if "failed" in line]
    assert "HTTPStatusError 404" in failure
    assert "missing.png" in failure
    assert "Traceback" not in out
    assert out.strip().endswith("5 ok, 1 failed")
    assert files_below(tmp_path) == [f"photo{i}.jpg" for i in range(5)]


@pytest.mark.timeout(60)
def test_mapping_saves_under_the_chosen_names_and_refuses_an_escape(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    out = run("mapping.py", "--dest", str(dest))
    chosen = {
        "cats/tabby.jpg": "/any/thumb.jpg?id=1",
        "cats/siamese.jpg": "/any/thumb.jpg?id=2",
        "dogs/corgi.png": "/any/thumb.png?id=3",
    }
    assert files_below(dest) == sorted(chosen)
    server = ImageServer(n_images=0)  # expected() needs no running server
    for name, path in chosen.items():
        assert (dest / name).read_bytes() == server.expected(path), name
        assert re.search(rf"{re.escape(path.rsplit('/', 1)[-1])}\s+-> {name}\s+downloaded", out)
    assert re.search(r"id=4\s+-> \.\./escape\.png\s+UnsafeFilenameError", out)
    assert files_below(tmp_path) == [f"out/{name}" for name in sorted(chosen)]
    assert "3 downloaded, 0 skipped, 1 failed" in out


@pytest.mark.timeout(60)
def test_checksums_heal_refuse_and_skip_what_matches(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    out = run("checksums.py", "--dest", str(dest))
    first, second = out.split("second run:")
    server = ImageServer(n_images=0)  # expected() needs no running server
    for name, path in (("a.png", "/any/a.png"), ("b.jpg", "/corrupt/1/b.jpg")):
        assert (dest / name).read_bytes() == server.expected(path), name
        digest = server.expected_sha256(path)[:12]
        assert re.search(rf"{name}\s+skipped\s+attempts=0\s+sha256 {digest}", second), second
    assert re.search(r"a\.png\s+downloaded\s+attempts=1", first), first
    assert re.search(r"b\.jpg\s+downloaded\s+attempts=2", first), first  # healed
    assert re.search(r"c\.gif\s+failed\s+attempts=3\s+ChecksumError: sha256", first), first
    assert re.search(r"d\.webp\s+downloaded\s+attempts=1\s+no hash asked", first), first
    assert files_below(dest) == ["a.png", "b.jpg", "d.webp"]


@pytest.mark.timeout(60)
def test_retry_policy_shows_attempts_per_url(tmp_path: Path) -> None:
    out = run("retry_policy.py", "--dest", str(tmp_path))
    rows = {
        m["what"].strip(): (int(m["attempts"]), m["outcome"].strip())
        for m in re.finditer(
            r"^(?P<what>.+?)\s+(?P<attempts>\d+)\s+\d+\.\d+\s+(?P<outcome>\S.*)$", out, re.M
        )
    }
    assert rows == {
        "503 twice, then the image": (3, "downloaded"),
        "429 with Retry-After: 1, then the image": (2, "downloaded"),
        "503 every time: gives up after 4 attempts": (4, "HTTPStatusError 503"),
        "Retry-After: 3600 is over the cap": (1, "HTTPStatusError 503"),
        "404 cannot heal: not retried": (1, "HTTPStatusError 404"),
    }
    assert files_below(tmp_path) == ["limited.png", "twice.png"]


@pytest.mark.timeout(90)
def test_command_line_example_runs_the_command_and_reads_its_report(tmp_path: Path) -> None:
    dest = tmp_path / "images"
    out = run("command_line.py", "--dest", str(dest))
    assert "$ fetchpool -i urls.txt" in out
    assert "exit status 1" in out
    assert re.search(r"urls\.txt:7 +InvalidURL", out), out
    assert re.search(r"urls\.txt:8 +HTTPStatusError +HTTP 404", out), out
    assert out.count(" downloaded ") == 4
    # The second run finds every file and skips it.
    assert out.strip().splitlines()[-1].startswith("fetchpool: 6 URLs: 0 downloaded, 4 skipped")
    assert len(files_below(dest)) == 4


@pytest.mark.timeout(60)
def test_asyncio_front_door_awaits_maps_and_cancels(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    out = run("asyncio_front_door.py", "--dest", str(dest))
    assert out.startswith("download_all: 6 URLs: 5 downloaded, 0 skipped, 1 failed"), out
    assert "failed: missing.png: HTTPStatusError 404" in out
    names = re.findall(r"^  (photo\d\.jpg) +downloaded$", out, re.M)
    assert names == ["photo0.jpg", "photo1.jpg", "photo2.jpg"], out  # input order
    assert "big-photo.png: cancelled by wait_for after 0.5 s" in out
    assert files_below(dest / "map") == names  # nothing of the cancelled one
    ticks = re.search(r"heartbeat: the event loop ticked (\d+) times", out)
    assert ticks is not None
    assert int(ticks[1]) > 10, out
    assert len(files_below(dest / "all")) == 5


def test_the_responses_example_passes_under_pytest() -> None:
    proc = run_process(
        "-m", "pytest", "examples/test_with_responses.py", "-q", "-p", "no:cacheprovider"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\b4 passed\b", proc.stdout), proc.stdout


@pytest.mark.timeout(90)
def test_compare_draws_a_chart(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    chart = tmp_path / "out.png"
    out = run("compare.py", *COMPARE_FAST, "--chart", str(chart))
    assert f"chart written to {chart}" in out
    assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert machine_line(out)["files_ok"] == "16/16"


@pytest.mark.timeout(90)
def test_compare_without_matplotlib_says_so_and_still_prints_the_table(tmp_path: Path) -> None:
    chart = tmp_path / "out.png"
    proc = run_process(
        "-c", WITHOUT_MATPLOTLIB, str(EXAMPLES / "compare.py"), *COMPARE_FAST, "--chart", str(chart)
    )
    assert proc.returncode != 0
    assert "--chart needs matplotlib: pip install 'fetchpool[examples]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    seq = next(line for line in proc.stdout.splitlines() if line.startswith("sequential"))
    # The default corpus: three pairs of URLs share a basename (the later file overwrites
    # the earlier), four answer 503 once (the loop saves the error page as the image).
    assert seq.split()[5:9] == ["9/16", "0", "3", "4"]
    assert "fetchpool (8 workers)" in proc.stdout
    assert machine_line(proc.stdout)["files_ok"] == "16/16"
    assert not chart.exists()
