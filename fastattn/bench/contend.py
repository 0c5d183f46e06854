"""Speed on a shared machine: ``fastattn bench --contend N``.

CPU inference rarely has the cores to itself: a tokenizer, a web server or another job holds some of them.
``spinners(n)`` starts ``n`` processes that each keep one core busy (a pure-Python loop) and stops them on
exit; ``run_contended`` times every case quietly and then again with the spinners running, the providers
interleaved round by round as in ``fastattn bench``, and reports each slowdown.

The ideal slowdown: ``T`` kernel threads and ``n`` spinners share ``C`` cores, so the call gets
``min(T, C * T / (T + n))`` cores instead of ``min(T, C)``; with T = C = 2 that is 1.5x for one spinner and
2x for two.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import subprocess
import sys
import time
from typing import Iterator, Sequence

import torch

from fastattn.bench import timing
from fastattn.bench.cases import Case
from fastattn.bench.report import Result, fmt_time, format_header, geomean, text_table, write_report
from fastattn.bench.run import Progress, machine_info, run_case

# The spinner: a bare Python loop (no site, no imports beyond os, so it starts at once). Every few milliseconds
# it checks that its parent is still the one that started it, so it also ends when the benchmark is killed.
_SPIN_SOURCE = (
    "import os, sys\n"
    "parent = os.getppid()\n"
    "sys.stdout.write('1')\n"
    "sys.stdout.flush()\n"
    "while os.getppid() == parent:\n"
    "    for _ in range(100000):\n"
    "        pass\n"
)


def _stop(procs: Sequence[subprocess.Popen], timeout: float) -> None:
    """Terminate, wait up to ``timeout`` seconds in all, then kill what is left and reap it."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(OSError):
                p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                p.kill()
            p.wait()
    for p in procs:
        if p.stdout is not None:
            p.stdout.close()


@contextlib.contextmanager
def spinners(n: int, *, start_timeout: float = 10.0, stop_timeout: float = 5.0) -> Iterator[list[int]]:
    """Run ``n`` processes that each spin on a core while the block runs; yields their pids.

    Returns only once every spinner is running (each reports in on its stdout); on exit, normal or by an
    exception, they are terminated (killed after ``stop_timeout`` s) and reaped, so none is left behind.
    """
    if n < 0:
        raise ValueError(f"the number of spinners must be >= 0, got {n}")
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-I", "-S", "-c", _SPIN_SOURCE], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + start_timeout
        for p in procs:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([p.stdout], [], [], max(0.0, left))
            if not ready or p.stdout.read(1) != b"1":
                raise RuntimeError(f"spinner {p.pid} did not start within {start_timeout:.0f} s")
        yield [p.pid for p in procs]
    finally:
        _stop(procs, stop_timeout)


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ideal_slowdown(threads: int, spinners_: int, cores_: int) -> float:
    """How much slower a call gets when ``spinners_`` busy processes share the cores fairly with its threads."""
    t, c = max(1, threads), max(1, cores_)
    return min(t, c) / min(t, c * t / (t + spinners_))


@dataclasses.dataclass
class Row:
    """One case and provider, quiet then contended."""
    op: str
    case_id: str
    shape: str
    dtype: str
    variant: str
    provider: str
    quiet_s: float | None = None
    quiet_iqr: float | None = None
    busy_s: float | None = None
    busy_iqr: float | None = None
    status: str = "ok"

    @property
    def slowdown(self) -> float | None:
        return self.busy_s / self.quiet_s if self.quiet_s and self.busy_s else None


def run_contended(cases: Sequence[Case], n: int, providers: Sequence[str] | None = None,
                  settings: timing.Settings = timing.QUICK, *, threads: int | None = None, progress: bool = True,
                  command: str | None = None) -> dict:
    """Every CPU timing case quietly, then every case again with ``n`` spinners running (started once, after
    the quiet runs, stopped after the last contended one); returns a JSON-able report.

    The quiet runs all come first: a case run right after a contended one could still find the kernels on
    the threads they chose under contention (csrc/parallel.h keeps that choice for a while)."""
    if threads:
        torch.set_num_threads(threads)
    cases = [c for c in cases if c.device == "cpu" and "memory" not in c.suites]
    providers = list(providers) if providers else ["torch", "fastattn-cpu"]
    t_start = time.perf_counter()
    load_before = _loadavg()
    bar = Progress(2 * len(cases), desc=f"contend {n}", enabled=progress)
    quiet: list[dict[str, Result]] = []
    busy: list[dict[str, Result]] = []
    try:
        for c in cases:
            bar.step(f"quiet {c.op} {c.shape} {c.dtype} {c.variant}")
            quiet.append({r.provider: r for r in run_case(c, providers, settings, measure_memory=False)})
            bar.advance()
        with spinners(n):
            for c in cases:
                bar.step(f"{n} spinner(s) {c.op} {c.shape} {c.dtype} {c.variant}")
                busy.append({r.provider: r for r in run_case(c, providers, settings, measure_memory=False)})
                bar.advance()
    finally:
        bar.close()
    rows: list[Row] = []
    for c, qs, bs in zip(cases, quiet, busy):
        for name, q in qs.items():
            b = bs.get(name)
            row = Row(c.op, c.id, c.shape, c.dtype, c.variant, name)
            if not q.ok or b is None or not b.ok:
                row.status = q.status if not q.ok else (b.status if b is not None else "missing")
            else:
                row.quiet_s, row.quiet_iqr = q.median_s, q.spread
                row.busy_s, row.busy_iqr = b.median_s, b.spread
            rows.append(row)
    nt = torch.get_num_threads()
    return {
        "format": 1,
        "kind": "contend",
        "command": command or " ".join(["fastattn"] + sys.argv[1:]),
        "machine": machine_info(),
        "settings": dataclasses.asdict(settings),
        "spinners": n,
        "cores": cores(),
        "ideal_slowdown": ideal_slowdown(nt, n, cores()),
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "seconds": time.perf_counter() - t_start,
        "rows": [dataclasses.asdict(r) for r in rows],
    }


def _loadavg() -> str | None:
    with contextlib.suppress(OSError):
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    return None


def _rows(report: dict) -> list[Row]:
    return [Row(**r) for r in report["rows"]]


def format_contend_table(report: dict, *, markdown: bool = False) -> str:
    n = report["spinners"]
    header = ["op", "dev", "shape", "dtype", "variant", "provider", "quiet", "IQR",
              f"{n} spinner" + ("s" if n != 1 else ""), "IQR", "slowdown"]
    lines = []
    for r in _rows(report):
        head = [r.op, "cpu", r.shape, r.dtype, r.variant, r.provider]
        if r.status.startswith("skipped"):
            continue
        if r.status != "ok":
            lines.append(head + [r.status])
            continue
        lines.append(head + [fmt_time(r.quiet_s), f"{100 * r.quiet_iqr:.1f}%", fmt_time(r.busy_s),
                             f"{100 * r.busy_iqr:.1f}%", f"{r.slowdown:.2f}x"])
    return text_table(header, lines, markdown)


def format_contend_summary(report: dict) -> str:
    """Per provider: the worst and the geometric-mean slowdown, against the ideal."""
    by: dict[str, list[Row]] = {}
    for r in _rows(report):
        if r.slowdown:
            by.setdefault(r.provider, []).append(r)
    out = [f"  ideal slowdown {report['ideal_slowdown']:.2f}x ({report['spinners']} spinner(s), "
           f"{report['machine']['torch_threads']} threads, {report['cores']} cores)"]
    for prov, rs in sorted(by.items()):
        worst = max(rs, key=lambda r: r.slowdown)
        out.append(f"  {prov:14} geomean {geomean([r.slowdown for r in rs]):.2f}x, worst {worst.slowdown:.2f}x "
                   f"({worst.shape} {worst.dtype} {worst.variant}) over {len(rs)} case(s)")
    return "\n".join(out)


def main(a, cases: Sequence[Case]) -> int:
    """``fastattn bench --contend N``: print the table and save it (``contend.json`` / ``contend.md``)."""
    if a.contend < 0:
        print(f"--contend needs a number of spinners >= 0, got {a.contend}", file=sys.stderr)
        return 2
    cases = [c for c in cases if c.device == "cpu" and "memory" not in c.suites]
    if not cases:
        print("no CPU timing case matches the selection", file=sys.stderr)
        return 2
    settings = timing.FULL if a.full else timing.QUICK
    command = " ".join(["fastattn", "bench"] + sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None
    report = run_contended(cases, a.contend, a.provider, settings, threads=a.threads, command=command)
    header = format_header({**report, "ceilings": {}})
    load = f"load average {report['loadavg_before']} before, {report['loadavg_after']} after"
    table, summary = format_contend_table(report), format_contend_summary(report)
    print(header)
    print(f"contend  {a.contend} spinner process(es); every case quiet, then every case with the spinners; {load}")
    print()
    print(table)
    print("\nSlowdown (contended median / quiet median):")
    print(summary)
    path, md = write_report(report, a.out, "contend.json", "contend.md", f"{header}\n{load}",
                            [format_contend_table(report, markdown=True), f"```\n{summary}\n```"])
    print(f"\nwrote {path}, {md}  ({report['seconds']:.0f} s)")
    return 0
