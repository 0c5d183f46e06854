"""The run: each case side by side on its providers (:func:`run_case`), the memory check
(:func:`run_memory_case`), and :func:`run`, which measures a selection and returns the report."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import os
import platform
import sys
import time
from typing import Any, Callable, Sequence

import torch

from fastattn.bench.cases import Case
from fastattn.bench.memory import cpu_memory_supported, memory_in_subprocess, peak_memory
from fastattn.bench.registry import BASELINE, OPERATIONS, has_module
from fastattn.bench.report import FORMAT, Result
from fastattn.bench.timing import (QUICK, ReadProbe, Settings, ceiling_for, make_call, matmul_ceiling,
                                   time_interleaved)


def machine_info() -> dict:
    """What the numbers were measured on, threads included."""
    from fastattn import __version__, _launchers
    info: dict[str, Any] = {
        "fastattn": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    ok, why = _launchers.cpu_available()
    info["fastattn_cpu"] = "unavailable: " + why if not ok else "available"
    if ok:
        from fastattn import _cpu
        with contextlib.suppress(Exception):
            info["fastattn_cpu"] = f"available, ISA {_cpu.isa_name()}"
        for attr in ("num_threads", "get_num_threads"):
            if hasattr(_cpu, attr):
                with contextlib.suppress(Exception):
                    info["fastattn_cpu_threads"] = int(getattr(_cpu, attr)())
                break
    info["triton"] = (importlib.import_module("triton").__version__ if has_module("triton") else None)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info



_PROBE = "read bandwidth probe"  # the probe's entry among a case's interleaved calls


def run_case(case: Case, providers: Sequence[str] | None = None, settings: Settings = QUICK,
             ceilings: dict[str, float] | None = None, measure_memory: bool = True,
             bandwidths: dict[str, float] | None = None,
             probes: dict[str, ReadProbe] | None = None) -> list[Result]:
    """Time one case on each provider that can run it (skips carry the reason), side by side. Memory-bound
    operations' rows are compared with the read bandwidth: with a ``probes`` entry for the case's device, the
    probe is timed in the case's own rounds, interleaved with the providers, and each row is compared with
    its median there; otherwise with ``bandwidths`` (bytes/s per device, measured before)."""
    op = OPERATIONS[case.op]
    flops = op.flops(case)
    nbytes = op.bytes_read(case) if op.bytes_read is not None else None
    rows: dict[str, Result] = {}
    calls: dict[str, Callable[[], Any]] = {}
    inputs = {}
    for p in op.providers_for(case, providers):
        row = Result(case.to_dict(), case.id, p.name, flops=flops)
        rows[p.name] = row
        why = p.why_not(case)
        if why is not None:
            row.status = f"skipped: {why}"
            continue
        try:
            if not inputs:
                inputs = op.inputs(case, case.mode != "fwd")
            calls[p.name] = make_call(op, p, case, inputs)
            calls[p.name]()  # fail here, per provider, rather than inside the interleaved rounds
        except Exception as e:  # noqa: BLE001 - a provider failing is reported in its row
            row.status = f"error: {type(e).__name__}: {e}".splitlines()[0][:200]
            calls.pop(p.name, None)
    probe = (probes or {}).get(case.device) if nbytes else None
    if calls and probe is not None:
        calls[_PROBE] = probe.call
    if calls:
        try:
            timings = time_interleaved(calls, settings, case.device, called=True)
        except Exception as e:  # noqa: BLE001
            for name in rows.keys() & calls.keys():
                rows[name].status = f"error: {type(e).__name__}: {e}".splitlines()[0][:200]
            timings = {}
        calls.pop(_PROBE, None)
        bw = (bandwidths or {}).get(case.device)
        if _PROBE in timings:
            t = timings.pop(_PROBE)
            bw = probe.nbytes / t.median if t.median > 0 else None
        for name, t in timings.items():
            row = rows[name]
            row.median_s, row.q1_s, row.q3_s, row.min_s = t.median, t.q1, t.q3, t.min
            row.rounds, row.iterations = t.rounds, t.iterations
            row.flops_per_s = flops / t.median if t.median > 0 else None
            ceil = ceiling_for(ceilings or {}, case.device, case.dtype)
            if ceil and row.flops_per_s:
                row.ceiling_frac = row.flops_per_s / ceil
            if nbytes and t.median > 0:
                row.bytes_read, row.bytes_per_s = nbytes, nbytes / t.median
                if bw:
                    row.read_bw, row.bandwidth_frac = bw, row.bytes_per_s / bw
            if measure_memory:
                row.peak_bytes, row.kept_bytes = peak_memory(calls[name], case.device)
    base = rows.get(BASELINE)
    for row in rows.values():
        if row.ok and base is not None and base.ok and base.median_s and row.median_s:
            row.speedup = base.median_s / row.median_s
    return list(rows.values())


def run_memory_case(case: Case, providers: Sequence[str] | None = None, threads: int | None = None) -> list[Result]:
    """The memory check: one call per provider, each in a fresh process (CPU) or in this one (CUDA)."""
    op = OPERATIONS[case.op]
    out = []
    for p in op.providers_for(case, providers):
        row = Result(case.to_dict(), case.id, p.name, kind="memory", flops=op.flops(case))
        out.append(row)
        why = p.why_not(case)
        if why is None and case.device == "cpu":
            why = cpu_memory_supported()
        if why is not None:
            row.status = f"skipped: {why}"
            continue
        try:
            if case.device == "cpu":
                m = memory_in_subprocess(case, p.name, threads)
            else:
                inputs = op.inputs(case, case.mode != "fwd")
                call = make_call(op, p, case, inputs)
                call()
                t0 = time.perf_counter()
                peak, kept = peak_memory(call, case.device)
                m = {"peak": peak, "kept": kept, "seconds": time.perf_counter() - t0}
                del inputs, call
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            row.status = f"error: {type(e).__name__}: {e}".splitlines()[0][:200]
            continue
        row.peak_bytes, row.kept_bytes = m["peak"], m["kept"]
        row.median_s = row.min_s = m["seconds"]
        row.rounds, row.iterations = 1, 1
        row.flops_per_s = row.flops / m["seconds"] if m["seconds"] else None
    return out


class Progress:
    """tqdm when installed, else a one-line bar on stderr (a line per step when stderr is not a tty)."""

    def __init__(self, total: int, desc: str = "bench", enabled: bool = True):
        self.total, self.n, self.desc, self.enabled = total, 0, desc, enabled
        self._t0 = time.perf_counter()
        self._tqdm = None
        if enabled and has_module("tqdm"):
            from tqdm import tqdm
            self._tqdm = tqdm(total=total, desc=desc, unit="case", file=sys.stderr, leave=False)
        self._tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        """Announce the step about to run."""
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(label, refresh=True)
            return
        width = 24
        done = int(width * self.n / max(self.total, 1))
        line = (f"{self.desc} [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} "
                f"{time.perf_counter() - self._t0:5.0f}s  {label}")
        if self._tty:
            sys.stderr.write("\r" + line[:150].ljust(150))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def advance(self) -> None:
        self.n += 1
        if self._tqdm is not None:
            self._tqdm.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._tty:
            sys.stderr.write("\r" + " " * 150 + "\r")
            sys.stderr.flush()


def run(cases: Sequence[Case], providers: Sequence[str] | None = None, settings: Settings = QUICK, *,
        threads: int | None = None, progress: bool = True, measure_memory: bool = True,
        command: str | None = None) -> dict:
    """Measure ``cases`` (timing cases and memory cases alike); returns the report (JSON-able dict)."""
    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    timed = [c for c in cases if "memory" not in c.suites]
    mem = [c for c in cases if "memory" in c.suites]
    dev_ok = {"cpu": True, "cuda": torch.cuda.is_available()}
    skipped_devices = sorted({c.device for c in cases if not dev_ok.get(c.device, False)})
    timed = [c for c in timed if dev_ok.get(c.device, False)]
    mem = [c for c in mem if dev_ok.get(c.device, False)]
    bar = Progress(len(timed) + len(mem) + 1, enabled=progress)
    ceilings: dict[str, float] = {}
    for dev, dt in sorted({(c.device, c.dtype) for c in timed} | {(c.device, "f32") for c in timed}):
        bar.step(f"matmul ceiling {dev} {dt}")
        ceilings[f"{dev}/{dt}"] = matmul_ceiling(dt, dev, settings=settings)
    bandwidths: dict[str, float] = {}
    probes: dict[str, ReadProbe] = {}
    for dev in sorted({c.device for c in timed if OPERATIONS[c.op].bytes_read is not None}):
        bar.step(f"read bandwidth {dev}")
        probes[dev] = ReadProbe(dev)
        bandwidths[dev] = probes[dev].best()
    bar.advance()
    results: list[Result] = []
    try:
        for c in timed:
            bar.step(f"{c.op} {c.shape} {c.dtype} {c.variant}")
            results += run_case(c, providers, settings, ceilings, measure_memory, bandwidths, probes)
            bar.advance()
        for c in mem:
            bar.step(f"memory {c.op} {c.shape} {c.variant}")
            results += run_memory_case(c, providers, threads or torch.get_num_threads())
            bar.advance()
    finally:
        bar.close()
        probes.clear()
    return {
        "format": FORMAT,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command or " ".join(["fastattn"] + sys.argv[1:]),
        "machine": machine_info(),
        "settings": dataclasses.asdict(settings),
        "ceilings": ceilings,
        "read_bandwidth": bandwidths,
        "skipped_devices": skipped_devices,
        "seconds": time.perf_counter() - t_start,
        "results": [dataclasses.asdict(r) for r in results],
    }

