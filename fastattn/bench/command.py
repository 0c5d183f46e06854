"""``fastattn bench``: its options (:func:`add_arguments`, wired in fastattn/cli.py) and :func:`main`, which
runs the selection and prints, saves, plots and compares the report."""
from __future__ import annotations

import os
import sys

from fastattn.bench import timing
from fastattn.bench.cases import DTYPES, Case
from fastattn.bench.memory import MIB
from fastattn.bench.plots import plot
from fastattn.bench.registry import OPERATIONS, has_module, select_cases
from fastattn.bench.report import (compare_reports, format_bandwidth_table, format_compare, format_header,
                                   format_memory_table, format_summary, format_table, load_report, results_of, write_report)
from fastattn.bench.run import run


def add_arguments(p) -> None:
    """The options of ``fastattn bench`` (wired in fastattn/cli.py)."""
    p.add_argument("--full", action="store_true", help="every case (~10 min on 2 cores), incl. --memory")
    p.add_argument("--memory", action="store_true",
                   help="add the long-sequence peak-memory check (B1 H4 L16384 E64 causal, subprocess per call)")
    default = [n for n, op in OPERATIONS.items() if op.in_default_run]
    others = [n for n in OPERATIONS if n not in default]
    p.add_argument("--op", action="append", help=f"operation(s) to run (default: {', '.join(default)}"
                   + (f"; also: {', '.join(others)}" if others else "") + ")")
    p.add_argument("--provider", action="append", help="provider(s) to run (default all available)")
    p.add_argument("--device", choices=["cpu", "cuda"], action="append", help="device(s) (default: all present)")
    p.add_argument("--dtype", choices=sorted(DTYPES), action="append", help="dtype(s)")
    p.add_argument("--mode", choices=["fwd", "fwd+bwd"], action="append", help="fwd and/or fwd+bwd")
    p.add_argument("--filter", help="only cases whose id contains this (e.g. L512, bf16, causal)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument("--out", default=os.path.join("bench", "results"),
                   help="output folder for results.json, table.md and the PNG plots (default bench/results)")
    p.add_argument("--compare", metavar="FILE", help="a saved results.json to compare with (shows regressions)")
    p.add_argument("--threshold", type=float, default=0.10, help="relative change that counts (default 0.10)")
    p.add_argument("--fail-on-regression", action="store_true", help="exit 1 when --compare finds a regression")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-memory-column", action="store_true", help="skip the per-row peak-memory call")
    p.add_argument("--show-skipped", action="store_true", help="list skipped providers and why")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--contend", type=int, metavar="N",
                   help="time each CPU case quietly, then with N processes spinning on cores (fastattn/bench/contend.py)")


def main(a) -> int:
    """``fastattn bench``: run, print, save, plot, compare."""
    suites = ["quick", "full", "memory"] if a.full else ["quick"] + (["memory"] if a.memory else [])
    cases = select_cases(a.op, suites, devices=a.device, dtypes=a.dtype, modes=a.mode, contains=a.filter)
    known = {p.name for op in OPERATIONS.values() for p in op.providers}
    if a.provider and not set(a.provider) <= known:
        print(f"unknown provider(s) {sorted(set(a.provider) - known)}; known: {sorted(known)}", file=sys.stderr)
        return 2
    if a.list:
        for c in cases:
            print(f"{c.id:60} {','.join(c.suites)}")
        print(f"{len(cases)} case(s)")
        return 0
    if not cases:
        print("no case matches the selection", file=sys.stderr)
        return 2
    if a.contend is not None:
        from fastattn.bench import contend
        return contend.main(a, cases)
    if a.compare:
        baseline = load_report(a.compare)  # fail before measuring, not after
    settings = timing.FULL if a.full else timing.QUICK
    report = run(cases, a.provider, settings, threads=a.threads, measure_memory=not a.no_memory_column,
                 command=" ".join(["fastattn", "bench"] + sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None)
    print(format_header(report))
    print()
    print(format_table(report, show_skipped=a.show_skipped))
    bw = format_bandwidth_table(report)
    if bw:
        print("\nMemory-bound rows: bytes of K and V read per call, and their rate against the read bandwidth:")
        print(bw)
    mem = format_memory_table(report, show_skipped=a.show_skipped)
    if mem:
        print("\nPeak memory above the inputs (one call, fresh process; RSS high-water mark on CPU):")
        print(mem)
    summary = format_summary(report)
    if summary:
        print("\nSummary (geometric mean over shapes):")
        print(summary)
    skipped = sorted({(r.provider, r.status) for r in results_of(report) if r.status.startswith("skipped")})
    if skipped and not a.show_skipped:
        print("\nSkipped providers (--show-skipped for every row): "
              + "; ".join(f"{p} ({s[len('skipped: '):]})" for p, s in dict(skipped).items()))
    sections = [format_table(report, markdown=True)]
    if bw:
        sections.append(format_bandwidth_table(report, markdown=True))
    if mem:
        sections.append(format_memory_table(report, markdown=True))
    if summary:
        sections.append(f"```\n{summary}\n```")
    written = list(write_report(report, a.out, "results.json", "table.md", format_header(report), sections))
    if not a.no_plot:
        pngs = plot(report, a.out)
        if not pngs and not has_module("matplotlib"):
            print("\n(plots skipped: matplotlib is not installed; pip install matplotlib)")
        written += pngs
    print(f"\nwrote {', '.join(written)}  ({report['seconds']:.0f} s)")
    status = 0
    if a.compare:
        changes = compare_reports(baseline, report, a.threshold)
        print(f"\nAgainst {a.compare} ({baseline.get('created', '?')}):")
        print(format_compare(changes))
        if a.fail_on_regression and any(c.verdict in ("regression", "more memory") for c in changes):
            status = 1
    bad = [r for r in results_of(report) if r.kind == "memory" and r.ok and r.provider.startswith("fastattn")
           and Case.from_dict(r.case).mem_limit_mib is not None
           and r.extra_bytes is not None and r.extra_bytes >= Case.from_dict(r.case).mem_limit_mib * MIB]
    if bad:
        print(f"\nmemory limit exceeded: {', '.join(r.case_id + ' ' + r.provider for r in bad)}")
        status = 1
    return status

