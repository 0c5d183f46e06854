"""Peak memory of one call: the peak above what was live before it.

CPU: the process's resident-set high-water mark (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``
after ``malloc_trim(0)`` hands cached free memory back), which also sees a C++ kernel's own scratch buffers.
CUDA: ``torch.cuda.max_memory_allocated``. The long-sequence memory check runs each call in a fresh
subprocess (:func:`memory_in_subprocess`).
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

import torch

from fastattn.bench.cases import Case
from fastattn.bench.registry import OPERATIONS
from fastattn.bench.timing import make_call

MIB = 2**20


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def cpu_memory_supported() -> str | None:
    """None when the CPU peak-memory method works here, else why not."""
    if not sys.platform.startswith("linux"):
        return "needs Linux /proc"
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return "needs glibc malloc_trim"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        return f"cannot reset the RSS high-water mark ({e})"
    return None


def _bytes_of(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (tuple, list)):
        return sum(_bytes_of(o) for o in obj)
    return 0


def peak_memory(fn: Callable[[], Any], device: str = "cpu") -> tuple[int | None, int]:
    """(peak bytes above what was live before one call of ``fn``, bytes of what it returned); peak is
    None where the method is unavailable. CPU: resident-set high-water mark (sees every allocator,
    including a C++ kernel's own); CUDA: torch's allocator peak."""
    gc.collect(1)  # young generations: what the calls just made (a full pass costs ~0.1 s with torch loaded)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        res = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, _bytes_of(res)
    if cpu_memory_supported() is not None:
        return None, _bytes_of(fn())
    _libc().malloc_trim(0)  # cached free memory back to the OS, so reusing it shows up as RSS growth
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _proc_status()["VmRSS"]
    res = fn()
    peak = _proc_status()["VmHWM"] - base
    return max(peak, 0), _bytes_of(res)


def _memory_child() -> None:
    """Subprocess entry of :func:`memory_in_subprocess`: argv[1] is {"case": ..., "provider": ...}."""
    req = json.loads(sys.argv[1])
    if req.get("threads"):
        torch.set_num_threads(int(req["threads"]))
    case = Case.from_dict(req["case"])
    op = OPERATIONS[case.op]
    provider = op.provider(req["provider"])
    # Load modules, start thread pools and size one-time tables on a tiny case first.
    tiny = dataclasses.replace(case, B=1, H=case.hk, L=16, S=16, mask="none")
    make_call(op, provider, tiny, op.inputs(tiny, tiny.mode != "fwd"))()
    inputs = op.inputs(case, case.mode != "fwd")
    call = make_call(op, provider, case, inputs)
    t0 = time.perf_counter()
    peak, kept = peak_memory(call, case.device)
    print(json.dumps({"peak": peak, "kept": kept, "seconds": time.perf_counter() - t0}))


def memory_in_subprocess(case: Case, provider: str, threads: int | None = None, timeout: float = 600) -> dict:
    """Run one call of ``provider`` on ``case`` in a fresh Python process; returns
    {"peak": bytes above the inputs, "kept": bytes of the returned tensors, "seconds": one call}."""
    req = json.dumps({"case": case.to_dict(), "provider": provider, "threads": threads})
    code = "from fastattn.bench import memory; memory._memory_child()"
    env = dict(os.environ)  # the child imports this very fastattn, installed or not
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, "-c", code, req], capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"memory subprocess failed ({r.returncode}): {tail}")
    return json.loads(r.stdout.strip().splitlines()[-1])

