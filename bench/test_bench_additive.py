"""Benchmarks of ``fastattn.additive_attention`` (fused kernels) against the naive reference
(``fastattn.reference.additive_attention(upcast=False)``, which builds the (B, H, L, S, D) tanh tensor).

Cases: B=1, H=1, D=8, Ev=64, float32 on CPU, L = S in {512, 2048, 8192}; "fwd" and "fwdbwd" (forward +
backward of all four inputs; 512 and 2048 only: the naive backward at 8192 keeps several 2 GiB tensors).

* ``test_additive_time``: wall time per call (pytest-benchmark; median and spread in its table).
* ``test_additive_memory``: peak memory above the inputs of one call in a fresh subprocess, by the
  resident-set high-water mark (``fastattn.bench.peak_memory``: VmHWM reset through /proc, so it sees the
  C++ kernel's own buffers too). Printed with -s and recorded as junit properties.

The naive reference at L = S = 8192 needs ~2 GiB per (L, S, D) float32 tensor (and holds about three at
once); its cases are skipped with the reason when the machine has less than 8 GiB available.

    pytest bench/test_bench_additive.py -s --benchmark-columns=min,median,max,rounds
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

B, H, D, EV = 1, 1, 8, 64
SIZES = (512, 2048, 8192)
PROVIDERS = ("fastattn", "naive")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _naive_skip(n: int, mode: str) -> str | None:
    need = (3 if mode == "fwd" else 8) * B * H * n * n * D * 4
    if mode == "fwdbwd" and n > 2048:
        return "the naive backward at L=S=8192 keeps ~8 (L, S, D) float32 tensors of 2 GiB"
    if need > _available_bytes():
        return f"the naive reference needs ~{need / 2**30:.1f} GiB, {_available_bytes() / 2**30:.1f} GiB available"
    return None


def _inputs(n: int, grad: bool):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, n, D, generator=g)
    k = torch.randn(B, H, n, D, generator=g)
    v = torch.randn(B, H, n, EV, generator=g)
    w = torch.randn(H, D, generator=g) / D ** 0.5
    return [x.requires_grad_(grad) for x in (q, k, v, w)]


def _call(provider: str, mode: str, n: int):
    """A zero-argument callable running one forward (or forward + backward) on fresh inputs."""
    import fastattn
    from fastattn import reference

    xs = _inputs(n, mode == "fwdbwd")
    if provider == "fastattn":
        f = lambda: fastattn.additive_attention(*xs, backend="cpu")  # noqa: E731
    else:
        f = lambda: reference.additive_attention(*xs, upcast=False)  # noqa: E731

    def run():
        if mode == "fwd":
            with torch.no_grad():
                return f()
        out = f()
        return torch.autograd.grad(out.sum(), xs)
    return run


def _cases():
    for mode in ("fwd", "fwdbwd"):
        for n in SIZES:
            if mode == "fwdbwd" and n > 2048:
                continue
            for p in PROVIDERS:
                yield pytest.param(mode, n, p, id=f"B{B}-H{H}-L{n}-S{n}-D{D}-Ev{EV}-f32-{mode}-{p}")


@pytest.mark.parametrize("mode,n,provider", list(_cases()))
def test_additive_time(benchmark, mode, n, provider):
    if provider == "naive" and (why := _naive_skip(n, mode)):
        pytest.skip(why)
    run = _call(provider, mode, n)
    run()  # warm-up (thread pools, first-touch)
    rounds = 3 if n >= 8192 or (provider == "naive" and n >= 2048) else 10
    benchmark.extra_info.update(dict(B=B, H=H, L=n, S=n, D=D, Ev=EV, dtype="float32", mode=mode,
                                     threads=torch.get_num_threads()))
    benchmark.pedantic(run, rounds=rounds, iterations=1)


_CHILD = """
import json, sys, torch
sys.path.insert(0, {root!r})
from fastattn import bench
sys.path.insert(0, {bench_dir!r})
import test_bench_additive as t
t._call({provider!r}, {mode!r}, 16)()  # load modules, start thread pools
run = t._call({provider!r}, {mode!r}, {n})
import time
t0 = time.perf_counter()
peak, kept = bench.peak_memory(run, "cpu")
print(json.dumps(dict(peak=peak, kept=kept, seconds=time.perf_counter() - t0)))
"""


def memory_in_subprocess(provider: str, mode: str, n: int) -> dict:
    code = _CHILD.format(root=ROOT, bench_dir=os.path.dirname(os.path.abspath(__file__)), provider=provider,
                         mode=mode, n=n)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"memory subprocess failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode,n,provider", list(_cases()))
def test_additive_memory(mode, n, provider, record_property):
    from fastattn import bench

    if (why := bench.cpu_memory_supported()) is not None:
        pytest.skip(why)
    if provider == "naive" and (why := _naive_skip(n, mode)):
        pytest.skip(why)
    row = memory_in_subprocess(provider, mode, n)
    mib = 2 ** 20
    figures = dict(peak_mib=row["peak"] / mib, kept_mib=row["kept"] / mib, seconds=row["seconds"])
    for k, v in figures.items():
        record_property(k, v)
    print(f"\nB{B}-H{H}-L{n}-S{n}-D{D}-Ev{EV}-f32-{mode} {provider}: "
          + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    if provider == "fastattn":
        # Fused: O(L + S) working memory. Inputs are (L + S) * (D + Ev) floats; allow a few copies of them
        # plus the per-thread row buffers, never anything like L * S.
        io = B * H * n * (2 * D + 2 * EV) * 4
        assert row["peak"] < 8 * io + 32 * mib, f"fused peak {row['peak'] / mib:.1f} MiB for L=S={n}"
