"""Markdown tables, the JSON dump, the PNG chart and the machine description."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

from benchmarks.contestants import DESCRIPTIONS, FETCHPOOL_CONTESTANTS
from benchmarks.harness import ROOT, ScenarioResult

_MIB = 1024
#: ``(a, b)``: the report gives ``a / b`` (medians, CPU, per-round median) where both ran.
RATIOS: Final = (
    ("fetchpool", "hand-pool"),
    # The curl backend against the requests backend and the fastest tools.
    ("fetchpool-curl", "fetchpool"),
    ("fetchpool-curl", "curl"),
    ("fetchpool-curl", "wget2"),
    # Where asked for: the curl backend against the flat loop doing its duties, and
    # that floor against the requests backend and curl (what no pipeline could beat).
    ("fetchpool-curl", "pycurl-floor"),
    ("pycurl-floor", "fetchpool"),
    ("pycurl-floor", "curl"),
)
#: Scenarios of many small files, bound by the CPU spent per file: the report gives it.
CPU_PER_FILE: Final = ("cpu-bound",)
#: Chart colours of fetchpool's contestants (the others are blue).
_COLORS: Final = {"fetchpool": "#c44e52", "fetchpool-curl": "#dd8452"}


def machine() -> dict[str, Any]:
    """Describe the machine, the software and the commit under test."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    tools = {}
    for tool, flag in (("wget2", "--version"), ("curl", "--version"), ("aria2c", "--version")):
        if shutil.which(tool):
            out = subprocess.run([tool, flag], capture_output=True, text=True, check=False)
            tools[tool] = (out.stdout.splitlines() or ["?"])[0]
    try:
        import parfive

        tools["parfive"] = str(parfive.__version__)
    except ImportError:
        pass
    try:
        import pycurl

        # "PycURL/7.49.0 libcurl/8.23.0 OpenSSL/3.6.5 ...": the first two say enough.
        tools["pycurl"] = " ".join(str(pycurl.version).split()[:2])
    except ImportError:
        pass
    commit = ""
    if shutil.which("git"):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    import requests

    import fetchpool

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "python": sys.version.split()[0],
        "kernel": platform.release(),
        "platform": platform.platform(),
        "fetchpool": f"{fetchpool.__version__} (commit {commit or '?'})",
        "requests": requests.__version__,
        "tools": tools,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _rss(kib: int | None) -> str:
    return "n/a" if not kib else f"{kib / _MIB:.1f}"


def scenario_markdown(result: ScenarioResult) -> str:
    """Return one scenario's markdown section: a table and its notes."""
    lines = [f"### {result.title}", ""]
    if result.name == "peak-rss":
        return "\n".join(lines + _peak_rss_table(result)) + "\n"
    medians = result.medians()
    cpu = result.medians(cpu=True)
    complete = {
        name: seconds
        for name, seconds in medians.items()
        if all(r.files_ok == r.n for r in result.runs if r.contestant == name)
    }
    best = min(complete.values()) if complete else None
    ideal = result.ideal.get("seconds")
    lines += [
        (
            "| contestant | seconds (median) | CPU s (median) | runs | files ok | "
            "peak RSS MiB | server CPU % | ratio to best | ratio to ideal |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, seconds in sorted(medians.items(), key=lambda kv: kv[1]):
        runs = [r for r in result.runs if r.contestant == name]
        ok = min(r.files_ok for r in runs)
        rss = max(r.peak_rss_kib for r in runs)
        busy = sum(r.server_cpu for r in runs) / max(sum(r.wall for r in runs), 1e-9)
        flag = "" if name in complete else " (incomplete)"
        lines.append(
            f"| {name}{flag} | {seconds:.3f} | {cpu[name]:.3f} | {len(runs)} | {ok}/{result.n} | "
            f"{_rss(rss)} | "
            f"{100 * busy:.0f} | {_fmt_ratio(seconds / best if best else None)} | "
            f"{_fmt_ratio(seconds / ideal if ideal else None)} |"
        )
    if ideal is not None:
        lines.append(
            f"| *ideal* | {ideal:.3f} | | | | | | "
            f"{_fmt_ratio(ideal / best if best else None)} | 1.00x |"
        )
    lines += ["", f"ideal = {result.ideal.get('kind', 'n/a')}."]
    for a, b in RATIOS:
        if a in medians and b in medians:
            lines.append(
                f"{a} / {b} = {medians[a] / medians[b]:.3f} "
                f"(CPU time: {cpu[a] / max(cpu[b], 1e-9):.3f}); "
                f"median of the per-round ratios: {paired_ratio(result, a, b)}."
            )
        elif a in medians and b in result.skipped:
            lines.append(f"{a} / {b}: n/a ({b} skipped: {result.skipped[b]}).")
    if result.name in CPU_PER_FILE and result.n:
        lines.append(cpu_per_file(result))
    for name, reason in result.skipped.items():
        lines.append(f"skipped: {name}: {reason}.")
    errors = {r.contestant: r.error for r in result.runs if r.error}
    for name, error in errors.items():
        lines.append(f"{name} reported: `{error[:200].replace(chr(10), ' ')}`")
    if result.note:
        lines.append(f"Note: {result.note}")
    return "\n".join(lines) + "\n"


def cpu_per_file(result: ScenarioResult) -> str:
    """Return the line of median CPU µs per file, fetchpool's contestants first."""
    cpu = result.medians(cpu=True)
    order = sorted(cpu, key=lambda name: (name not in FETCHPOOL_CONTESTANTS, cpu[name]))
    shown = ", ".join(f"{name} {1e6 * cpu[name] / result.n:,.0f}" for name in order)
    return (
        f"CPU µs per file (median CPU s / {result.n:,} files; tools: the whole process): {shown}."
    )


def paired_ratio(result: ScenarioResult, a: str, b: str) -> str:
    """Median over rounds of ``a``'s time over ``b``'s in the same round, formatted.

    Contestants run interleaved, so the two runs of a round share the machine's load of
    the moment: their ratio is steadier than the ratio of medians when the load drifts.
    """
    first = [r.seconds for r in result.runs if r.contestant == a]
    second = [r.seconds for r in result.runs if r.contestant == b]
    ratios = [x / y for x, y in zip(first, second, strict=False) if y > 0]
    if not ratios:
        return "n/a"
    shown = ", ".join(f"{r:.3f}" for r in ratios)
    return f"{statistics.median(ratios):.3f} ({shown})"


def _peak_rss_table(result: ScenarioResult) -> list[str]:
    lines = [
        "| run | URLs | seconds | files ok | RSS before MiB | peak RSS (VmHWM) MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines.extend(
        f"| {run.contestant} | {run.n:,} | {run.seconds:.2f} | {run.files_ok}/{run.n} | "
        f"{_rss(run.baseline_rss_kib)} | {_rss(run.peak_rss_kib)} |"
        for run in result.runs
    )
    lines.append("")
    for name in FETCHPOOL_CONTESTANTS:
        # "fetchpool (big file)", "fetchpool map() x 10,000"; the prefix names the backend.
        label = "" if name == "fetchpool" else f"{name} "
        big = [r.peak_rss_kib for r in result.runs if r.contestant == f"{name} (big file)"]
        maps = [r for r in result.runs if r.contestant.startswith(f"{name} map() x ")]
        if big:
            verdict = "met" if max(big) <= 64 * _MIB else "missed"
            lines.append(
                f"{label}big file: max peak RSS {max(big) / _MIB:.1f} MiB (target <= 64): "
                f"{verdict}."
            )
        if len(maps) == 2:
            small, large = maps
            growth = (large.peak_rss_kib - small.peak_rss_kib) / _MIB
            lines.append(
                f"{label}map(): peak RSS {small.peak_rss_kib / _MIB:.1f} MiB at {small.n:,} "
                f"URLs, {large.peak_rss_kib / _MIB:.1f} MiB at {large.n:,} URLs "
                f"({growth:+.1f} MiB); {large.n:,} URLs took {large.seconds:.1f} s."
            )
    for name, reason in result.skipped.items():
        lines.append(f"skipped: {name}: {reason}.")
    errors = {r.contestant: r.error for r in result.runs if r.error}
    for name, error in errors.items():
        lines.append(f"{name} reported: `{error[:200].replace(chr(10), ' ')}`")
    return lines


def markdown(results: list[ScenarioResult], info: dict[str, Any], repeat: int) -> str:
    """Return the whole markdown report."""
    tools = ", ".join(f"{k}: {v}" for k, v in info["tools"].items()) or "none"
    lines = [
        "# fetchpool benchmarks",
        "",
        (
            f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM; "
            f"Python {info['python']}; kernel {info['kernel']}; {info['date']}."
        ),
        f"fetchpool {info['fetchpool']}, requests {info['requests']}; tools: {tools}.",
        "",
        (
            f"Median of {repeat} runs per contestant, interleaved; each on a fresh `dest`. "
            "Python contestants run in a child process of their own and time the download "
            "call only (imports excluded); external tools are timed from spawn to exit. "
            "`CPU s` is the contestant's user + system CPU time over the same span, "
            "all threads: less sensitive than seconds to other load on the machine. "
            "The server runs in another process; `server CPU %` is its CPU time over the "
            "contestant's wall time. `files ok` = files whose sha256 matches the server's "
            "(worst run). Peak RSS is the contestant process's VmHWM (Python) or "
            "its VmHWM sampled every 10 ms (tools)."
        ),
        "",
    ]
    lines.extend(scenario_markdown(result) for result in results)
    lines += ["Contestants:", ""]
    lines += [f"- `{name}`: {text}" for name, text in DESCRIPTIONS.items()]
    return "\n".join(lines) + "\n"


def chart(results: list[ScenarioResult], out: Path) -> str | None:
    """Draw median seconds per contestant per scenario to a PNG; return a note if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter, ScalarFormatter
    except ImportError:
        return "chart skipped: matplotlib not installed (pip install matplotlib)"
    shown = [r for r in results if r.name != "peak-rss" and r.runs]
    if not shown:
        return "chart skipped: no download scenario ran"
    fig, axes = plt.subplots(len(shown), 1, figsize=(8, 2.4 * len(shown)), squeeze=False)
    for ax, result in zip(axes[:, 0], shown, strict=True):
        medians = sorted(result.medians().items(), key=lambda kv: kv[1])
        names = [name for name, _ in medians]
        colors = [_COLORS.get(n, "#4c72b0") for n in names]
        ax.barh(names, [s for _, s in medians], color=colors)
        ideal = result.ideal.get("seconds")
        if ideal:
            ax.axvline(ideal, color="k", linestyle="--", linewidth=1, label="ideal")
            ax.legend(loc="lower right", fontsize=7)
        ax.set_title(result.title, fontsize=9)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(labelsize=8)
        ax.invert_yaxis()
    axes[-1, 0].set_xlabel("seconds, median (log scale, lower is better)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return None
