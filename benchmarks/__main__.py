"""``python -m benchmarks``: run the issue-4 benchmark scenarios and write the report.

    python -m benchmarks                          # every scenario, --repeat 3
    python -m benchmarks --scenario latency-bound --scenario cpu-bound
    python -m benchmarks --quick --repeat 1       # small sizes, for development
    python -m benchmarks --render benchmarks/results/results.json   # the report again

Writes ``results.md``, ``results.json``, ``results.png`` and ``profiles/`` into ``--out``
(default ``benchmarks/results/``) and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks.contestants import ALL_CONTESTANTS, DEFAULT_CONTESTANTS
from benchmarks.harness import ScenarioResult, run_download_scenario, run_peak_rss
from benchmarks.report import chart, machine, markdown
from benchmarks.scenarios import NAMES, scenarios

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument(
        "--scenario", action="append", choices=NAMES, help="run only these (repeatable)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (development)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per contestant (3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument(
        "--contestants",
        help=f"comma-separated subset of: {', '.join(ALL_CONTESTANTS)}",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="run nothing: write results.md again from a results.json (after a report change)",
    )
    parser.add_argument(
        "--profile-only",
        action="store_true",
        help="only write the py-spy profiles of latency-bound and cpu-bound (no report)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.contestants:
        wanted = [c.strip() for c in args.contestants.split(",") if c.strip()]
        unknown = sorted(set(wanted) - set(ALL_CONTESTANTS))
        if unknown:
            parser.error(f"unknown contestants: {', '.join(unknown)}")
        args.contestants = wanted
    else:
        args.contestants = list(DEFAULT_CONTESTANTS)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios, write the outputs, print the markdown."""
    args = parse_args(argv)
    chosen = args.scenario or list(NAMES)
    table = scenarios(args.quick)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    profile_dir = out / "profiles"
    profiles = not args.no_profile and shutil.which("py-spy") is not None
    if not args.no_profile and not profiles:
        print("profiles skipped: py-spy not installed", file=sys.stderr)
    if args.render is not None:
        return render(args.render, out, args.no_chart)
    results: list[ScenarioResult] = []
    started = time.monotonic()
    if args.profile_only:
        if not profiles:
            print("nothing to do: py-spy not installed or --no-profile", file=sys.stderr)
            return 1
        for name in chosen:
            if name in ("latency-bound", "cpu-bound"):
                run_download_scenario(
                    table[name], args.contestants, 1, profile_dir=profile_dir, profile_only=True
                )
        return 0
    for name in chosen:
        scenario = table[name]
        print(f"== {scenario.title}", file=sys.stderr)
        if name == "peak-rss":
            results.append(run_peak_rss(scenario, args.repeat, args.contestants))
        else:
            profile = profiles and name in ("latency-bound", "cpu-bound")
            results.append(
                run_download_scenario(
                    scenario,
                    args.contestants,
                    args.repeat,
                    profile_dir=profile_dir if profile else None,
                )
            )
    info = machine()
    report = markdown(results, info, args.repeat)
    note = None if args.no_chart else chart(results, out / "results.png")
    if note:
        report += f"\n{note}\n"
    elif not args.no_chart:
        report += "\n![benchmark chart](results.png)\n"
    report += f"\nTotal harness time: {time.monotonic() - started:.0f} s.\n"
    (out / "results.md").write_text(report)
    data = {
        "machine": info,
        "repeat": args.repeat,
        "quick": args.quick,
        "scenarios": {r.name: r.to_json() for r in results},
    }
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    print(report)
    return 0


def render(source: Path, out: Path, no_chart: bool) -> int:
    """Write ``results.md`` (and the chart) into ``out`` from a ``results.json``."""
    data = json.loads(source.read_text())
    results = [ScenarioResult.from_json(s) for s in data["scenarios"].values()]
    report = markdown(results, data["machine"], int(data["repeat"]))
    note = None if no_chart else chart(results, out / "results.png")
    if note:
        report += f"\n{note}\n"
    elif not no_chart:
        report += "\n![benchmark chart](results.png)\n"
    report += f"\nRendered again from {source.name} by `python -m benchmarks --render`.\n"
    (out / "results.md").write_text(report)
    if source.resolve() != (out / "results.json").resolve():
        (out / "results.json").write_text(source.read_text())
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
