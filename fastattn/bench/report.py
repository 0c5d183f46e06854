"""The report: its rows (:class:`Result`), JSON, the printed tables, the summary and ``--compare``."""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from typing import Sequence

from fastattn.bench.cases import Case
from fastattn.bench.memory import MIB
from fastattn.bench.registry import BASELINE, OPERATIONS
from fastattn.bench.timing import ceiling_for


# ========================================================================================== rows
@dataclass
class Result:
    """One row: a case run by a provider. ``status`` is "ok", "skipped: why" or "error: what"."""
    case: dict
    case_id: str
    provider: str
    kind: str = "time"            # "time" or "memory"
    status: str = "ok"
    flops: float = 0.0
    median_s: float | None = None
    q1_s: float | None = None
    q3_s: float | None = None
    min_s: float | None = None
    rounds: int = 0
    iterations: int = 0
    flops_per_s: float | None = None
    ceiling_frac: float | None = None
    speedup: float | None = None  # baseline median / this median (same case)
    peak_bytes: int | None = None
    kept_bytes: int | None = None
    bytes_read: float | None = None     # memory-bound operations: bytes one call reads (Operation.bytes_read)
    bytes_per_s: float | None = None    # bytes_read / median
    read_bw: float | None = None        # the read bandwidth (bytes/s) this row is compared with: the probe's
                                        # median in the case's own rounds (ReadProbe), or the run's probe
    bandwidth_frac: float | None = None  # bytes_per_s / read_bw

    @property
    def spread(self) -> float | None:
        if self.median_s is None or self.q1_s is None or not self.median_s:
            return None
        return (self.q3_s - self.q1_s) / self.median_s

    @property
    def extra_bytes(self) -> int | None:
        return None if self.peak_bytes is None else self.peak_bytes - (self.kept_bytes or 0)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ========================================================================================= JSON
# The report's format: 2 since its rows carry ``read_bw`` (the read-bandwidth probe timed beside the case), 1
# before. Both load; a fastattn that reads format 1 only turns a format-2 file away with the error below instead
# of failing on the unknown field.
FORMAT = 2
READABLE_FORMATS = (1, 2)


def save_report(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


def load_report(path: str) -> dict:
    with open(path) as f:
        report = json.load(f)
    if report.get("format") not in READABLE_FORMATS or "results" not in report:
        raise ValueError(f"{path} is not a fastattn bench report (format {' or '.join(map(str, READABLE_FORMATS))})")
    return report


def write_report(report: dict, out: str, json_name: str, md_name: str, header: str,
                 sections: Sequence[str]) -> tuple[str, str]:
    """Saves ``report`` as out/json_name and a markdown page out/md_name: the command, ``header`` in a code
    block, then each of ``sections`` (markdown), separated by blank lines. Returns the two paths."""
    os.makedirs(out, exist_ok=True)
    path, md = os.path.join(out, json_name), os.path.join(out, md_name)
    save_report(report, path)
    with open(md, "w") as f:
        f.write(f"`{report['command']}`\n\n```\n{header}\n```\n\n")
        f.write("\n".join(section + "\n" for section in sections))
    return path, md


def results_of(report: dict) -> list[Result]:
    return [Result(**r) for r in report["results"]]


# ======================================================================================= tables
def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= f:
            return f"{s / f:.3g} {unit}" if s / f < 1000 else f"{s / f:.0f} {unit}"
    return f"{s * 1e9:.0f} ns"


def fmt_rate(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r / 1e12:.1f} T" if r >= 1e12 else f"{r / 1e9:.1f}"


def fmt_mib(b: int | None) -> str:
    return "-" if b is None else f"{b / MIB:.1f}"


def _row_cells(r: Result) -> list[str]:
    c = Case.from_dict(r.case)
    head = [c.op, c.device, c.shape, c.dtype, c.variant, r.provider]
    if not r.ok:
        return head + [r.status] + [""] * 5
    sp = r.spread
    return head + [fmt_time(r.median_s), "-" if sp is None else f"{100 * sp:.1f}%", fmt_rate(r.flops_per_s),
                   "-" if r.ceiling_frac is None else f"{100 * r.ceiling_frac:.0f}%",
                   "-" if r.speedup is None else f"{r.speedup:.2f}x", fmt_mib(r.peak_bytes)]


TIME_COLUMNS = ["op", "dev", "shape", "dtype", "variant", "provider", "median", "IQR", "GFLOP/s", "% mm",
                "x torch", "peak MiB"]


def text_table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    def spans(r, i):  # a skip/error reason runs across the columns after the provider
        return i >= 6 and len(r) > 6 and r[6].startswith(("skipped", "error"))
    widths = [max([len(h)] + [len(r[i]) for r in rows if i < len(r) and not spans(r, i)])
              for i, h in enumerate(header)]
    right = {i for i, h in enumerate(header) if h in ("median", "IQR", "GFLOP/s", "% mm", "x torch", "peak MiB",
                                                      "K+V MiB", "GB/s", "% read bw",
                                                      "old", "new", "change", "peak", "kept", "extra", "time")}

    def fmt(r):
        cells = []
        for i, w in enumerate(widths):
            v = r[i] if i < len(r) else ""
            if spans(r, i):
                cells.append(v)
                break
            cells.append(v.rjust(w) if i in right else v.ljust(w))
        return "  ".join(cells).rstrip()
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def format_table(report: dict, *, markdown: bool = False, show_skipped: bool = False) -> str:
    """The timing table (GFLOP/s are forward+backward FLOPs / time for fwd+bwd rows; "% mm" compares
    them with the matmul ceiling of the same dtype; "x torch" = torch's median / this median)."""
    rows = [r for r in results_of(report)
            if r.kind == "time" and (r.ok or show_skipped or r.status.startswith("error"))]
    return text_table(TIME_COLUMNS, [_row_cells(r) for r in sorted(rows, key=_table_order)], markdown)


def _table_order(r: Result):
    """Group rows by variant, then dtype (f32 first), shape family and length; providers as registered."""
    c = Case.from_dict(r.case)
    op = OPERATIONS.get(c.op)
    names = [p.name for p in op.providers] if op else []
    return (c.op, c.device, c.mode, c.causal, c.mask, c.dtype != "f32", c.dtype, (c.B, c.H, c.E), c.L, c.S,
            names.index(r.provider) if r.provider in names else len(names), r.provider)


BANDWIDTH_COLUMNS = ["op", "dev", "shape", "dtype", "variant", "provider", "median", "K+V MiB", "GB/s", "read bw",
                     "% read bw", "x torch"]


def format_bandwidth_table(report: dict, *, markdown: bool = False) -> str:
    """The memory-bound rows (operations with ``bytes_read``): bytes of K and V read per call, GB/s, the read
    bandwidth they are compared with (GB/s, the probe timed in the case's rounds) and their share of it; "" when
    the report has none."""
    rows = [r for r in results_of(report) if r.kind == "time" and r.ok and r.bytes_read]
    cells = []
    for r in sorted(rows, key=_table_order):
        c = Case.from_dict(r.case)
        cells.append([c.op, c.device, c.shape, c.dtype, c.variant, r.provider, fmt_time(r.median_s),
                      f"{r.bytes_read / MIB:.1f}", "-" if r.bytes_per_s is None else f"{r.bytes_per_s / 1e9:.1f}",
                      "-" if r.read_bw is None else f"{r.read_bw / 1e9:.1f}",
                      "-" if r.bandwidth_frac is None else f"{100 * r.bandwidth_frac:.0f}%",
                      "-" if r.speedup is None else f"{r.speedup:.2f}x"])
    return text_table(BANDWIDTH_COLUMNS, cells, markdown) if cells else ""


MEMORY_COLUMNS = ["op", "dev", "shape", "dtype", "variant", "provider", "time", "peak", "kept", "extra", "limit",
                  "verdict"]


def format_memory_table(report: dict, *, markdown: bool = False, show_skipped: bool = False) -> str:
    """Peak memory above the inputs during one call; kept = the returned tensors (output, or the
    gradients); extra = peak - kept (workspace), compared with the case's limit."""
    rows = []
    for r in results_of(report):
        if r.kind != "memory" or (r.status.startswith("skipped") and not show_skipped):
            continue
        c = Case.from_dict(r.case)
        head = [c.op, c.device, c.shape, c.dtype, c.variant, r.provider]
        if not r.ok:
            rows.append(head + [r.status])
            continue
        extra = r.extra_bytes
        limit = c.mem_limit_mib
        verdict = "-" if limit is None or extra is None else ("ok" if extra < limit * MIB else "OVER")
        rows.append(head + [fmt_time(r.median_s), f"{fmt_mib(r.peak_bytes)} MiB", f"{fmt_mib(r.kept_bytes)} MiB",
                            f"{fmt_mib(extra)} MiB", "-" if limit is None else f"{limit:g} MiB", verdict])
    return text_table(MEMORY_COLUMNS, rows, markdown) if rows else ""


def geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def format_summary(report: dict) -> str:
    """Geometric-mean speedup over torch per (device, shape family, dtype, variant, provider), and the
    mean share of the matmul ceiling: the headline numbers (family "issue2" = the CPU target shapes)."""
    groups: dict[tuple, list[Result]] = {}
    for r in results_of(report):
        if r.kind == "time" and r.ok and r.provider != BASELINE and r.speedup:
            c = Case.from_dict(r.case)
            groups.setdefault((c.op, c.device, c.family, c.dtype, c.variant, r.provider), []).append(r)
    lines = []
    for (op, dev, fam, dt, var, prov), rs in sorted(groups.items()):
        share = [r.ceiling_frac for r in rs if r.ceiling_frac]
        bw = [r.bandwidth_frac for r in rs if r.bandwidth_frac]
        gm = geomean([r.speedup for r in rs])
        lines.append(f"  {op} {dev} {fam:16} {dt:4} {var:18} {prov:16} geomean {gm:5.2f}x torch over {len(rs)} "
                     f"shape(s)" + (f", {100 * statistics.mean(share):.0f}% of matmul" if share else "")
                     + (f", {100 * min(bw):.0f}% of read bandwidth at worst" if bw else ""))
    # Memory-bound families across dtypes (the decode targets mix bf16 and f32): one line each.
    fams: dict[tuple, list[Result]] = {}
    for (op, dev, fam, dt, var, prov), rs in groups.items():
        if any(r.bandwidth_frac for r in rs):
            fams.setdefault((op, dev, fam, prov), []).extend(rs)
    for (op, dev, fam, prov), rs in sorted(fams.items()):
        bw = [r.bandwidth_frac for r in rs if r.bandwidth_frac]
        lines.append(f"  {op} {dev} {fam:16} all dtypes {prov:16} geomean {geomean([r.speedup for r in rs]):5.2f}x "
                     f"torch over {len(rs)} case(s), slowest {min(r.speedup for r in rs):.2f}x; read bandwidth "
                     f"{100 * min(bw):.0f}% at worst, {100 * statistics.mean(bw):.0f}% mean")
    return "\n".join(lines)


def format_header(report: dict) -> str:
    m = report["machine"]
    lines = [f"fastattn {m['fastattn']}  torch {m['torch']}  python {m['python']}",
             f"machine  {m['cpu']}, {m['cores']} cores" + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
             f"threads  torch {m['torch_threads']}" + (f", fastattn cpu {m['fastattn_cpu_threads']}"
                                                        if "fastattn_cpu_threads" in m else "")
             + (f", OMP_NUM_THREADS={m['OMP_NUM_THREADS']}" if m.get("OMP_NUM_THREADS") else ""),
             f"fastattn cpu backend: {m['fastattn_cpu']}"]
    if report.get("ceilings"):
        ceil = report["ceilings"]
        lines.append("matmul ceiling (torch.mm, this run): " + ", ".join(
            f"{k} {fmt_rate(v)}{'FLOP/s' if v >= 1e12 else ' GFLOP/s'}" for k, v in ceil.items()))
        if "cuda/f32" in ceil:
            lines.append("         (cuda/f32 measured with TF32 tensor cores allowed)")
        low = [k for k, v in ceil.items() if ceiling_for(ceil, *k.split("/")) != v]
        if low:
            lines.append(f"         ({', '.join(low)}: % mm uses the f32 ceiling, which is higher here)")
    beside = any(r.get("read_bw") for r in report.get("results", []))
    for dev, bw in (report.get("read_bandwidth") or {}).items():
        if beside:
            lines.append(f"read bandwidth {dev} (torch.sum over 256 MiB float32): best of 5 at the start of the run "
                         f"{bw / 1e9:.1f} GB/s; memory-bound rows are compared with the same probe timed in their "
                         f"case's rounds, beside the providers (its median: the 'read bw' column)")
        else:  # a report from before the probe joined the rounds
            lines.append(f"read bandwidth {dev} (torch.sum over 256 MiB float32, best of 5, this run): "
                         f"{bw / 1e9:.1f} GB/s")
    s = report["settings"]
    lines.append(f"timing   median of {s['min_rounds']}..{s['rounds']} rounds of >= {s['min_round_s'] * 1e3:.0f} ms "
                 f"after {s['warmup_s'] * 1e3:.0f} ms warm-up, providers interleaved; IQR = interquartile range")
    if report.get("skipped_devices"):
        lines.append("not run: cases for " + ", ".join(report["skipped_devices"]) + " (no such device here)")
    return "\n".join(lines)


# ====================================================================================== compare
@dataclass
class Change:
    case_id: str
    provider: str
    kind: str
    old: float
    new: float
    verdict: str   # "regression", "faster", "same", "less memory", "more memory"

    @property
    def ratio(self) -> float:
        return self.new / self.old if self.old else float("inf")


def compare_reports(old: dict, new: dict, threshold: float = 0.10) -> list[Change]:
    """Match rows by (case, provider, kind). Time: slower by more than ``threshold`` and by more than
    both runs' spreads is a regression. Memory: more than ``threshold`` and 1 MiB over is one too."""
    before = {(r.case_id, r.provider, r.kind): r for r in results_of(old) if r.ok}
    out = []
    for r in results_of(new):
        o = before.get((r.case_id, r.provider, r.kind))
        if o is None or not r.ok:
            continue
        if r.kind == "time" and o.median_s and r.median_s:
            noise = max(threshold, (o.spread or 0) + (r.spread or 0))
            ratio = r.median_s / o.median_s
            verdict = "regression" if ratio > 1 + noise else "faster" if ratio < 1 / (1 + noise) else "same"
            out.append(Change(r.case_id, r.provider, "time", o.median_s, r.median_s, verdict))
        if r.peak_bytes is not None and o.peak_bytes is not None:
            d = r.peak_bytes - o.peak_bytes
            big = abs(d) > max(MIB, threshold * max(o.peak_bytes, 1))
            verdict = ("more memory" if d > 0 else "less memory") if big else "same"
            out.append(Change(r.case_id, r.provider, "memory", o.peak_bytes, r.peak_bytes, verdict))
    return out


def format_compare(changes: list[Change], *, all_rows: bool = False) -> str:
    shown = [c for c in changes if all_rows or c.verdict != "same"]
    rows = []
    for c in shown:
        f = fmt_time if c.kind == "time" else (lambda b: f"{b / MIB:.1f} MiB")
        rows.append([c.case_id, c.provider, c.kind, f(c.old), f(c.new), f"{100 * (c.ratio - 1):+.1f}%", c.verdict])
    n_reg = sum(c.verdict in ("regression", "more memory") for c in changes)
    n_fast = sum(c.verdict in ("faster", "less memory") for c in changes)
    head = f"compared {len(changes)} measurements: {n_reg} regression(s), {n_fast} improvement(s)"
    if not rows:
        return head
    return head + "\n" + text_table(["case", "provider", "kind", "old", "new", "change", "verdict"], rows, False)

