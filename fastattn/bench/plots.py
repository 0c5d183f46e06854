"""The plots of a report: ``throughput.png`` and ``speedup.png`` (matplotlib, imported only here)."""
from __future__ import annotations

import math
import os

from fastattn.bench.cases import Case
from fastattn.bench.registry import BASELINE
from fastattn.bench.report import Result, results_of
from fastattn.bench.timing import ceiling_for


def plot(report: dict, out_dir: str) -> list[str]:
    """throughput.png (FLOP/s against sequence length, one line per provider, one panel per shape
    family) and speedup.png (x torch per case). Returns the files written; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = [r for r in results_of(report) if r.kind == "time" and r.ok]
    if not rows:
        return []
    os.makedirs(out_dir, exist_ok=True)
    files = []
    providers = sorted({r.provider for r in rows}, key=lambda p: (p != BASELINE, p))
    colors = {p: f"C{i}" for i, p in enumerate(providers)}

    # Throughput against L: one panel per (op, device, dtype, variant); colour = provider, marker and line
    # style = the other dims (B, H, E), so only points of one shape family are joined.
    panels: dict[tuple, list[Result]] = {}
    for r in rows:
        c = Case.from_dict(r.case)
        panels.setdefault((c.op, c.device, c.dtype, c.variant), []).append(r)
    keys = sorted(panels, key=lambda k: (k[0], k[1], k[3], k[2]))
    ncol = min(3, math.ceil(math.sqrt(len(keys))))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.4 * ncol, 3.9 * nrow), squeeze=False)
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", (0, (5, 1))), ("P", (0, (1, 1)))]
    for ax, key in zip(axes.flat, keys):
        op, dev, dt, var = key
        scale, unit = (1e12, "TFLOP/s") if dev == "cuda" else (1e9, "GFLOP/s")
        fams = sorted({(c.B, c.H, c.E) for c in (Case.from_dict(r.case) for r in panels[key])})
        for p in providers:
            for fi, fam in enumerate(fams):
                pts = sorted((c.L, r.flops_per_s / scale) for r in panels[key] if r.provider == p
                             for c in [Case.from_dict(r.case)] if (c.B, c.H, c.E) == fam)
                if pts:
                    mk, ls = styles[fi % len(styles)]
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker=mk, ls=ls, color=colors[p],
                            label=f"{p}  B{fam[0]} H{fam[1]} E{fam[2]}")
        ceil = ceiling_for(report.get("ceilings", {}), dev, dt)
        if ceil:
            ax.axhline(ceil / scale, color="gray", ls="--", lw=1, label=f"torch.mm {dt} (ceiling)")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{op} {dev} {dt} {var}", fontsize=10)
        ax.set_xlabel("sequence length L = S")
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    m = report["machine"]
    fig.suptitle(f"fastattn bench: throughput ({m['cpu']}, {m['torch_threads']} threads; {report['created'][:10]})",
                 fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)

    # Speedup over torch per case
    sp = [r for r in rows if r.provider != BASELINE and r.speedup]
    if sp:
        cases = list(dict.fromkeys(r.case_id for r in sp))
        provs = [p for p in providers if any(r.provider == p for r in sp)]
        label = {r.case_id: (lambda c: f"{c.shape} {c.dtype} {c.variant}" + (" (cuda)" if c.device == "cuda" else ""))(
            Case.from_dict(r.case)) for r in sp}
        fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(cases) * len(provs) + 2), 4.8))
        w = 0.8 / len(provs)
        for i, p in enumerate(provs):
            xs, ys = [], []
            for j, cid in enumerate(cases):
                for r in sp:
                    if r.case_id == cid and r.provider == p:
                        xs.append(j + (i - (len(provs) - 1) / 2) * w)
                        ys.append(r.speedup)
            ax.bar(xs, ys, width=w, color=colors[p], label=p)
        ax.axhline(1.0, color="black", lw=1)
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([label[c] for c in cases], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speedup over torch SDPA (x, log)")
        ax.set_title("speedup over torch.nn.functional.scaled_dot_product_attention (>1 = faster)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3, which="both")
        fig.tight_layout()
        path = os.path.join(out_dir, "speedup.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files

