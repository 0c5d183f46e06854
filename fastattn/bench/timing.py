"""The one timer (:func:`time_interleaved`), the timed call of a case (:func:`make_call`), the matmul
ceiling the throughputs are compared with, and the read-bandwidth probe memory-bound cases are compared with
(:class:`ReadProbe`, timed in each such case's rounds).

Each provider is warmed up, then timed in rounds of enough calls to last ``min_round_s``; the providers of
a case take turns round by round, so background load hits them alike. We report the median time per call
over the rounds and the interquartile range as the spread. CUDA rounds are bracketed by
``torch.cuda.synchronize()``. Ceiling: the throughput of a large square ``torch.mm`` in each dtype,
measured in the same run with the same threads ("% mm").
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from fastattn.bench.cases import DTYPES, Case
from fastattn.bench.registry import Operation, Provider


@dataclass
class Timing:
    """Seconds per call: median, quartiles and minimum over ``rounds`` rounds of ``iterations`` calls."""
    median: float
    q1: float
    q3: float
    min: float
    rounds: int
    iterations: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0

    @classmethod
    def from_samples(cls, samples: Sequence[float], iterations: int) -> "Timing":
        s = sorted(samples)
        q1, q3 = (statistics.quantiles(s, n=4, method="inclusive")[::2] if len(s) > 1 else (s[0], s[0]))
        return cls(statistics.median(s), q1, q3, s[0], len(s), iterations)


@dataclass(frozen=True)
class Settings:
    """How hard to measure. ``max_case_s`` caps the timed rounds of one case (all providers together);
    at least ``min_rounds`` rounds are run regardless."""
    warmup_s: float = 0.05
    min_round_s: float = 0.02
    rounds: int = 7
    min_rounds: int = 3
    max_case_s: float = 3.0
    ceiling_n: int | None = None  # matmul ceiling size (default 1024 on CPU, 8192 on CUDA)


QUICK = Settings()
FULL = Settings(warmup_s=0.1, min_round_s=0.05, rounds=11, min_rounds=5, max_case_s=10.0)


def synchronizer(devices: Iterable[str]) -> Callable[[], None]:
    if any(d.startswith("cuda") for d in devices):
        return torch.cuda.synchronize
    return lambda: None


@contextlib.contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.collect(1)  # young generations: what the calls just made (a full pass costs ~0.1 s with torch loaded)
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_interleaved(calls: dict[str, Callable[[], Any]], settings: Settings = QUICK,
                     device: str = "cpu", *, called: bool = False) -> dict[str, Timing]:
    """Time each call: warm up, size rounds to ``min_round_s``, then run the rounds of all calls in
    turn (A B C A B C ...) so drifting background load is shared; median and IQR per call.
    ``called``: each call has already run once (its first-call costs are paid)."""
    sync = synchronizer([device])
    per_call: dict[str, float] = {}
    for name, fn in calls.items():
        if not called:
            fn()  # first call: lazy imports, compilation, allocator growth
        sync()
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            sync()
            n += 1
            if time.perf_counter() - t0 >= settings.warmup_s:
                break
        per_call[name] = (time.perf_counter() - t0) / n
    iters = {k: max(1, math.ceil(settings.min_round_s / max(t, 1e-9))) for k, t in per_call.items()}
    round_s = sum(iters[k] * per_call[k] for k in calls)
    rounds = max(settings.min_rounds, min(settings.rounds, int(settings.max_case_s / max(round_s, 1e-9))))
    samples: dict[str, list[float]] = {k: [] for k in calls}
    with _gc_paused():
        for _ in range(rounds):
            for name, fn in calls.items():
                sync()
                t0 = time.perf_counter()
                for _ in range(iters[name]):
                    fn()
                sync()
                samples[name].append((time.perf_counter() - t0) / iters[name])
    return {k: Timing.from_samples(v, iters[k]) for k, v in samples.items()}


def make_call(op: Operation, provider: Provider, case: Case, inputs: dict) -> Callable[[], Any]:
    """The timed closure: the forward, or forward + backward (``torch.autograd.grad`` with a fixed
    random output gradient, so nothing accumulates between calls). Returns what the call produced."""
    if case.mode == "fwd":
        return lambda: provider.fn(inputs)
    if case.mode != "fwd+bwd":
        raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {case.mode!r}")
    leaves = [inputs[n] for n in (provider.grad_inputs or op.grad_inputs)]
    out = provider.fn(inputs)
    gen = torch.Generator(device=out.device).manual_seed(4321)
    grad = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32).to(out.dtype)
    del out

    def step():
        return torch.autograd.grad(provider.fn(inputs), leaves, grad)
    return step



# ======================================================================================== ceiling
def matmul_ceiling(dtype: str, device: str = "cpu", n: int | None = None, settings: Settings = QUICK) -> float:
    """FLOP/s of ``torch.mm`` on (n, n) x (n, n) in ``dtype`` with the current threads: the ceiling
    attention throughput is compared with (float32 on CUDA: with TF32 allowed)."""
    if n is None:
        n = settings.ceiling_n or (8192 if device.startswith("cuda") else 1024)
    g = torch.Generator(device=device).manual_seed(0)

    def operands(n):
        return [torch.randn(n, n, generator=g, device=device).to(DTYPES[dtype]) for _ in range(2)]

    # Some dtypes have no fast path on some CPUs (float16 without AVX512-FP16 runs at ~1 GFLOP/s); a
    # probe keeps their measurement short by staying at a small size. (On a GPU a small probe would
    # only time the launch.)
    if device == "cpu" and n > 256:
        a, b = operands(256)
        torch.mm(a, b)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if (time.perf_counter() - t0) * (n / 256) ** 3 > 0.3:
            n = 256
    a, b = operands(n)
    # float32 on a GPU: with TF32 tensor cores allowed, the fastest way the hardware multiplies float32
    # inputs (what Triton's tl.dot uses by default), not torch's strict-float32 default.
    tf32 = device.startswith("cuda") and dtype == "f32"
    prev = torch.backends.cuda.matmul.allow_tf32
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        t = time_interleaved({"mm": lambda: torch.mm(a, b)},
                             dataclasses.replace(settings, rounds=max(settings.rounds, 5)), device)["mm"]
    finally:
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = prev
    return 2.0 * n**3 / t.median


# ================================================================================== read bandwidth
class ReadProbe:
    """What the machine's memory reads at a moment: ``torch.sum`` over a ``mib`` MiB float32 tensor, far larger
    than any cache, with the current threads. :meth:`best` times it alone; a memory-bound case also times
    :meth:`call` in its own interleaved rounds, beside the providers, so that the bandwidth a kernel is compared
    with was measured under the same background load (a shared machine's bandwidth drifts within seconds)."""

    def __init__(self, device: str = "cpu", mib: int = 256):
        self.device = device
        self.x = torch.ones(mib * 2**20 // 4, device=device)
        self.nbytes = self.x.numel() * 4

    def call(self):
        return self.x.sum()

    def best(self, repeats: int = 5) -> float:
        """Bytes/s, best of ``repeats`` calls after one that faults the pages in."""
        sync = synchronizer([self.device])
        best = math.inf
        for _ in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            self.call()
            sync()
            best = min(best, time.perf_counter() - t0)
        return self.nbytes / best


def read_bandwidth(device: str = "cpu", mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s the machine reads from memory now: :class:`ReadProbe` alone, best of ``repeats``."""
    return ReadProbe(device, mib).best(repeats)


def ceiling_for(ceilings: dict[str, float], device: str, dtype: str) -> float | None:
    """The ceiling for ``dtype`` rows: the faster of torch.mm in that dtype and in float32 (a kernel
    may compute a low-precision input in float32, as CPUs without native float16 math must)."""
    vals = [v for k, v in ceilings.items() if k in (f"{device}/{dtype}", f"{device}/f32")]
    return max(vals) if vals else None

