"""Run contestants against the benchmark server, time them and verify every file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from benchmarks.contestants import (
    ALL_CONTESTANTS,
    EXTERNAL_CONTESTANTS,
    FETCHPOOL_CONTESTANTS,
    MAP_SUFFIX,
    REFERENCE_SCENARIOS,
    basename,
    external_command,
    unavailable,
)
from benchmarks.profiling import summarize_raw
from benchmarks.scenarios import Scenario

ROOT: Final = Path(__file__).resolve().parent.parent
_READ: Final = 1 << 20
#: The contestants profiled under py-spy (when it is installed and they run).
PROFILED: Final = ("fetchpool", "fetchpool-curl", "hand-pool")


@dataclass
class Run:
    """One timed run of one contestant."""

    contestant: str
    seconds: float
    wall: float
    files_ok: int
    n: int
    peak_rss_kib: int
    server_cpu: float
    exit_code: int
    failures: int | None = None
    baseline_rss_kib: int | None = None
    #: The contestant's CPU seconds (user + system): in the download call for Python
    #: contestants, the whole process for external tools. Less sensitive than wall time
    #: to other load on the machine.
    cpu: float = 0.0
    error: str = ""


@dataclass
class ScenarioResult:
    """Every run of one scenario, with what was skipped and why."""

    name: str
    title: str
    n: int
    workers: int
    latency: float
    dest_root: str
    note: str
    runs: list[Run] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    ideal: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, scenario: Scenario) -> ScenarioResult:
        """An empty result for ``scenario``."""
        return cls(
            scenario.name,
            scenario.title,
            scenario.n_urls,
            scenario.workers,
            scenario.latency,
            scenario.dest_root,
            scenario.note,
        )

    def medians(self, cpu: bool = False) -> dict[str, float]:
        """Median seconds (wall, or CPU with ``cpu``) per contestant, in first-run order."""
        by: dict[str, list[float]] = {}
        for run in self.runs:
            by.setdefault(run.contestant, []).append(run.cpu if cpu else run.seconds)
        return {name: statistics.median(times) for name, times in by.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScenarioResult:
        """Rebuild a result from :meth:`to_json`'s output (to render it again)."""
        fields = {k: v for k, v in data.items() if k not in ("medians", "cpu_medians", "runs")}
        return cls(**fields, runs=[Run(**run) for run in data["runs"]])

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict of everything measured."""
        data = asdict(self)
        data["medians"] = self.medians()
        data["cpu_medians"] = self.medians(cpu=True)
        return data


class ServerProcess:
    """The benchmark server in a child process (see :mod:`benchmarks.server`)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.server", json.dumps(config)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError("benchmark server did not start")
        self.manifest: dict[str, Any] = json.loads(line)
        self.base_url = f"http://127.0.0.1:{self.manifest['port']}"

    def stats(self) -> tuple[float, int]:
        """Return the server's CPU seconds and requests served so far."""
        with urllib.request.urlopen(self.base_url + "/_stats", timeout=10) as resp:
            data = json.loads(resp.read())
        return float(data["cpu"]), int(data["requests"])

    def urls(self, collection: str, count: int) -> list[tuple[str, str, int]]:
        """Return ``(url, sha256, size)`` of the first ``count`` URLs of a collection."""
        bodies = self.manifest["collections"][collection]
        out = []
        for index in range(count):
            ext, size, sha = bodies[index % len(bodies)]
            out.append((f"{self.base_url}/{collection}/{index:06d}.{ext}", sha, size))
        return out

    def big_url(self) -> tuple[str, str, int]:
        """Return ``(url, sha256, size)`` of the large body."""
        big = self.manifest["big"]
        return f"{self.base_url}/big/big.png", big["sha256"], big["size"]

    def close(self) -> None:
        """Stop the server (closing its stdin) and wait for it."""
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def server_config(scenario: Scenario, collection: str = "img") -> dict[str, Any]:
    """Return the server configuration a scenario needs."""
    config: dict[str, Any] = {"latency": scenario.latency, "collections": []}
    if scenario.count:
        config["collections"].append(
            {
                "name": collection,
                "count": scenario.count,
                "distinct": scenario.distinct,
                "size": scenario.size,
                "kind": scenario.kind,
                "seed": 0,
            }
        )
    if scenario.big:
        config["big"] = {"size": scenario.big, "dir": scenario.dest_root}
    return config


def sha256_file(path: Path) -> str | None:
    """Return the hex sha256 of a file, or None if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_READ):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def count_ok(dest: Path, expected: dict[str, str]) -> int:
    """Count files ``dest/<name>`` whose sha256 is the expected one."""
    return sum(sha256_file(dest / name) == sha for name, sha in expected.items())


@contextlib.contextmanager
def fresh_dir(root: str, prefix: str) -> Iterator[Path]:
    """Create a fresh directory under ``root`` and remove it afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _vmhwm_kib(pid: int) -> int:
    """Read another process's ``VmHWM`` in KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _spawn(
    command: list[str], log: IO[bytes], timeout: float
) -> tuple[int, float, int, bool, float]:
    """Run ``command``; return (exit code, wall s, sampled peak RSS KiB, timed out, CPU s).

    The peak RSS is ``VmHWM`` sampled every 10 ms: ``wait4``'s ``ru_maxrss`` would count
    the forked copy of this (larger) Python process before ``exec``.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)
    killed = threading.Event()
    done = threading.Event()
    peak = [0]

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not done.wait(0.01):
            peak[0] = max(peak[0], _vmhwm_kib(proc.pid))
            if time.monotonic() > deadline:
                killed.set()
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        done.set()
        watcher.join()
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, peak[0], killed.is_set(), usage.ru_utime + usage.ru_stime


def run_one(
    contestant: str,
    scenario: Scenario,
    server: ServerProcess,
    urls: list[str],
    expected: dict[str, str],
    *,
    sizes: list[int] | None = None,
    map_spec: dict[str, Any] | None = None,
    profile_to: Path | None = None,
    profile_gil: bool = False,
    timeout: float = 900.0,
) -> Run:
    """Run a contestant once on a fresh ``dest``; time it, measure it, verify its files.

    Python contestants time themselves in their child process (imports excluded) and
    report ``VmHWM``; external tools are timed from spawn to exit, with the peak RSS
    ``VmHWM``, sampled. With ``profile_to``, the run goes under ``py-spy record``:
    every thread that is not idle (``profile_gil`` False: where the threads' time
    goes, waits on locks and sockets included) or only the thread holding the GIL
    (``profile_gil`` True: where the interpreter's CPU goes).
    """
    with (
        fresh_dir(scenario.dest_root, f"fpbench-{contestant}-") as dest,
        fresh_dir(tempfile.gettempdir(), "fpbench-work-") as work,
    ):
        result_file = work / "result.json"
        if contestant in EXTERNAL_CONTESTANTS:
            command = external_command(contestant, urls, dest, scenario.workers, work)
        else:
            (work / "urls.txt").write_text("\n".join(urls))
            spec: dict[str, Any] = {
                "contestant": contestant,
                "urls_file": str(work / "urls.txt"),
                "dest": str(dest),
                "workers": scenario.workers,
                "result": str(result_file),
                "sizes": sizes or [],
                **(map_spec or {}),
            }
            (work / "spec.json").write_text(json.dumps(spec))
            command = [sys.executable, "-m", "benchmarks.child", str(work / "spec.json")]
        if profile_to is not None:
            raw = work / "profile.raw"
            command = [
                "py-spy", "record", "--format", "raw", "--rate", "250",
                "--nonblocking", "--output", str(raw),
                *(["--gil"] if profile_gil else []), "--", *command,
            ]  # fmt: skip
        cpu_before, _ = server.stats()
        with open(work / "log.txt", "wb") as log:
            code, wall, peak_kib, timed_out, cpu = _spawn(command, log, timeout)
        cpu_after, _ = server.stats()
        log_text = (work / "log.txt").read_text(errors="replace").strip()
        run = Run(
            contestant=contestant,
            seconds=wall,
            wall=wall,
            files_ok=count_ok(dest, expected) if expected else 0,
            n=len(expected) if expected else len(sizes or []),
            peak_rss_kib=peak_kib,
            server_cpu=cpu_after - cpu_before,
            exit_code=code,
            cpu=cpu,
        )
        if result_file.exists():
            child = json.loads(result_file.read_text())
            run.seconds = float(child["seconds"])
            run.failures = int(child["failures"])
            run.peak_rss_kib = int(child["vmhwm_kib"])
            run.baseline_rss_kib = int(child["baseline_rss_kib"])
            run.cpu = float(child.get("cpu_seconds", cpu))
        elif contestant not in EXTERNAL_CONTESTANTS:
            run.error = "no result from the child"
        if timed_out:
            run.error = f"killed after {timeout:.0f} s"
        elif code != 0 and not run.error:
            run.error = f"exit code {code}"
        if log_text and (run.error or run.files_ok != run.n):
            run.error = (run.error + "; " if run.error else "") + log_text[-300:]
        if profile_to is not None and (work / "profile.raw").exists():
            profile_to.parent.mkdir(parents=True, exist_ok=True)
            what = "GIL holder only" if profile_gil else "all non-idle threads"
            title = f"{scenario.title}: {contestant} (py-spy, 250 Hz, {what})"
            profile_to.write_text(summarize_raw((work / "profile.raw").read_text(), title))
    return run


def _available(
    contestants: Sequence[str], scenario: Scenario, result: ScenarioResult, log: IO[str]
) -> list[str]:
    """The contestants that can run ``scenario``; the others are noted as skipped."""
    chosen = []
    for name in contestants:
        reason = scenario.skip.get(name) or unavailable(name)
        if name in REFERENCE_SCENARIOS and scenario.name not in REFERENCE_SCENARIOS[name]:
            reason = f"a reference for {', '.join(REFERENCE_SCENARIOS[name])} only"
        if reason:
            result.skipped[name] = reason
            print(f"  skipped: {name}: {reason}", file=log)
        else:
            chosen.append(name)
    return chosen


def run_download_scenario(
    scenario: Scenario,
    contestants: list[str],
    repeat: int,
    *,
    profile_dir: Path | None = None,
    profile_only: bool = False,
    log: IO[str] = sys.stderr,
) -> ScenarioResult:
    """Run every available contestant ``repeat`` times (interleaved) on one scenario.

    With ``profile_dir``, fetchpool (each backend) and the hand pool then run twice more
    under py-spy (profiles only, not timed); ``profile_only`` skips the timed runs.
    """
    result = ScenarioResult.of(scenario)
    chosen = _available(contestants, scenario, result, log)
    with ServerProcess(server_config(scenario)) as server:
        if scenario.big:
            url, sha, size = server.big_url()
            entries = [(url, sha, size)]
        else:
            entries = server.urls("img", scenario.count)
        urls = [u for u, _, _ in entries]
        expected = {basename(u): sha for u, sha, _ in entries}
        sizes = [size for _, _, size in entries]
        for round_ in range(0 if profile_only else repeat):
            for name in chosen:
                if round_ >= scenario.max_runs.get(name, repeat):
                    continue
                run = run_one(name, scenario, server, urls, expected)
                result.runs.append(run)
                print(
                    f"  {scenario.name} #{round_ + 1} {name}: {run.seconds:.3f} s, "
                    f"{run.files_ok}/{run.n} ok, server CPU {run.server_cpu:.2f} s"
                    + (f"  [{run.error[:200]}]" if run.error else ""),
                    file=log,
                )
        ideal = scenario.ideal_latency()
        if ideal is not None:
            result.ideal = {"kind": "ceil(n / workers) * latency", "seconds": ideal}
        elif not profile_only:
            floors = [
                run_one("write-floor", scenario, server, urls, {}, sizes=sizes).seconds
                for _ in range(repeat)
            ]
            result.ideal = {
                "kind": "write floor: the same bytes written from memory to fresh files "
                "in dest on the same number of threads, no HTTP",
                "seconds": statistics.median(floors),
                "runs": floors,
            }
        if profile_dir is not None and shutil.which("py-spy"):
            for name in PROFILED:
                if name not in chosen:
                    continue
                for gil in (False, True):
                    suffix = "-gil" if gil else ""
                    target = profile_dir / f"{scenario.name}-{name}{suffix}.txt"
                    run_one(
                        name, scenario, server, urls, expected, profile_to=target, profile_gil=gil
                    )
                    result.profiles[name + suffix] = str(target.relative_to(profile_dir.parent))
                    print(f"  profile of {name} written to {target}", file=log)
    return result


def peak_rss_contestants(contestants: Sequence[str]) -> list[str]:
    """The fetchpool contestants (backends) ``peak-rss`` measures, given the chosen ones.

    Every fetchpool contestant chosen; fetchpool alone when none is (the scenario is
    fetchpool's own).
    """
    return [name for name in FETCHPOOL_CONTESTANTS if name in contestants] or ["fetchpool"]


def run_peak_rss(
    scenario: Scenario,
    repeat: int,
    contestants: Sequence[str] = tuple(FETCHPOOL_CONTESTANTS),
    *,
    log: IO[str] = sys.stderr,
) -> ScenarioResult:
    """Peak RSS of fetchpool on the big file, and of ``map()`` at two URL counts.

    Once per fetchpool backend among ``contestants`` (see :func:`peak_rss_contestants`),
    interleaved; runs are named ``<contestant> (big file)`` and
    ``<contestant> map() x <count>``.
    """
    result = ScenarioResult.of(scenario)
    chosen = _available(peak_rss_contestants(contestants), scenario, result, log)
    with ServerProcess(server_config(scenario, collection="small")) as server:
        url, sha, _ = server.big_url()
        for _ in range(repeat):
            for name in chosen:
                run = run_one(name, scenario, server, [url], {basename(url): sha})
                run.contestant = f"{name} (big file)"
                result.runs.append(run)
                _log_rss_run(log, f"{name} big file: {run.seconds:.2f} s", run)
        ext = server.manifest["collections"]["small"][0][0]
        for count in scenario.map_counts:
            entries = server.urls("small", count)
            expected = {basename(u): sha for u, sha, _ in entries}
            map_spec = {
                "base": server.base_url,
                "collection": "small",
                "count": count,
                "ext": ext,
            }
            for name in chosen:
                run = run_one(
                    name + MAP_SUFFIX,
                    scenario,
                    server,
                    [],
                    expected,
                    map_spec=map_spec,
                    timeout=3600,
                )
                run.contestant = f"{name} map() x {count:,}"
                result.runs.append(run)
                what = f"{name} map() over {count}: {run.seconds:.1f} s, {run.files_ok}/{run.n} ok"
                _log_rss_run(log, what, run)
    return result


def _log_rss_run(log: IO[str], what: str, run: Run) -> None:
    """One progress line of the peak-RSS scenario: what ran, its peak RSS, its error."""
    error = f"  [{run.error[:200]}]" if run.error else ""
    print(f"  {what}, peak RSS {run.peak_rss_kib / 1024:.1f} MiB{error}", file=log)


def known_contestants() -> tuple[str, ...]:
    """All contestant names, for the command line."""
    return ALL_CONTESTANTS
