"""Benchmark core shared by ``fastattn bench`` and the pytest-benchmark suite in ``bench/``.

What is measured, and how (the rules every number in a report follows):

* Work: one FLOP formula, :func:`attention_flops`. The forward costs ``2 * (E + Ev)`` FLOPs per (query,
  key) pair the mask leaves visible (QK^T and PV), summed over batch and heads: causal attention counts
  the lower triangle only, a padded batch counts only its real keys. Backward = 2.5x forward (five
  matmuls against two); forward+backward = 3.5x. Softmax and other element-wise work are not counted.
* Time: each provider is warmed up, then timed in rounds of enough calls to last ``min_round_s``; the
  providers of a case take turns round by round, so background load hits them alike. We report the
  median time per call over the rounds and the interquartile range as the spread. CUDA rounds are
  bracketed by ``torch.cuda.synchronize()``.
* Ceiling: the throughput of a large square ``torch.mm`` in each dtype, measured in the same run with the
  same threads, is what the GFLOP/s are compared with ("% mm").
* Memory: the peak above what was live before one call. CPU: the process's resident-set high-water mark
  (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` after ``malloc_trim(0)`` hands cached free
  memory back), which also sees a C++ kernel's own scratch buffers. CUDA:
  ``torch.cuda.max_memory_allocated``. The long-sequence memory check runs each call in a fresh
  subprocess.

Adding an operation: build an :class:`Operation` (cases, an input builder, providers, a FLOP count) and
:func:`register` it; ``fastattn bench`` and a three-line ``bench/test_bench_<op>.py`` pick it up.

Nothing here touches a GPU or imports matplotlib until a benchmark is actually run.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "f64": torch.float64}
BASELINE = "torch"  # the provider speedups are measured against
MIB = 2**20


# ============================================================================================ cases
@dataclass(frozen=True)
class Case:
    """One benchmark configuration.

    Shape legend: B batch, H query heads, Hk key/value heads (default H), L query length, S key length,
    E head dim, Ev value head dim (default E). ``mask``: "none", or "pad" (the second half of the batch
    has real keys for only the first quarter of S, given as a bool (B, 1, 1, S) mask, True = attend).
    ``mode``: "fwd" or "fwd+bwd". ``suites``: which runs include it ("quick", "full", "memory").
    ``mem_limit_mib``: for memory cases, the budget for peak extra memory (a check, not a measurement).
    """
    op: str
    B: int
    H: int
    L: int
    S: int
    E: int
    dtype: str = "f32"
    mode: str = "fwd"
    causal: bool = False
    mask: str = "none"
    device: str = "cpu"
    Hk: int | None = None
    Ev: int | None = None
    family: str = ""
    suites: tuple[str, ...] = ("full",)
    mem_limit_mib: float | None = None

    @property
    def hk(self) -> int:
        return self.H if self.Hk is None else self.Hk

    @property
    def ev(self) -> int:
        return self.E if self.Ev is None else self.Ev

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def shape(self) -> str:
        """Readable shape, e.g. ``B8 H12 L512 E64`` (S, Hk, Ev only where they differ)."""
        s = f"B{self.B} H{self.H}" + ("" if self.hk == self.H else f"/{self.hk}") + f" L{self.L}"
        s += "" if self.S == self.L else f" S{self.S}"
        return s + f" E{self.E}" + ("" if self.ev == self.E else f"/{self.ev}")

    @property
    def variant(self) -> str:
        """e.g. ``fwd``, ``fwd+bwd causal``, ``fwd pad``."""
        extra = (["causal"] if self.causal else []) + ([self.mask] if self.mask != "none" else [])
        return " ".join([self.mode] + extra)

    @property
    def id(self) -> str:
        """Stable identifier (JSON key for --compare, pytest id)."""
        parts = [self.op, self.device, self.shape.replace(" ", "-").replace("/", "_"), self.dtype, self.mode]
        return "-".join(parts + (["causal"] if self.causal else []) + ([self.mask] if self.mask != "none" else []))

    def key_lengths(self) -> list[int]:
        """Real key count of each batch element (what a padding mask leaves)."""
        if self.mask == "pad":
            short = max(1, self.S // 4)
            return [self.S] * (self.B - self.B // 2) + [short] * (self.B // 2)
        return [self.S] * self.B

    def to_dict(self) -> dict:
        """JSON-ready (tuples as lists, so a loaded report equals the one written)."""
        d = dataclasses.asdict(self)
        d["suites"] = list(self.suites)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        d = dict(d)
        d["suites"] = tuple(d.get("suites", ()))
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# ============================================================================================ FLOPs
def visible_pairs(q_len: int, k_len: int, causal: bool) -> int:
    """(query, key) pairs attention computes for one sequence and head: causal is top-left aligned
    (key j visible to query i iff j <= i), so it keeps the lower triangle."""
    if not causal:
        return q_len * k_len
    d = min(q_len, k_len)
    return d * (d + 1) // 2 + (q_len - d) * k_len


MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def attention_flops(H: int, E: int, Ev: int, q_lens: Sequence[int], k_lens: Sequence[int], *,
                    causal: bool = False, mode: str = "fwd") -> float:
    """THE FLOP formula: ``2 * (E + Ev)`` per visible (query, key) pair and head (forward: QK^T and PV),
    times 1 / 2.5 / 3.5 for ``mode`` fwd / bwd / fwd+bwd. ``q_lens``/``k_lens``: real lengths of each
    batch element (padding counts nothing; fixed-length batches pass ``[L] * B``)."""
    if len(q_lens) != len(k_lens):
        raise ValueError(f"q_lens and k_lens must have one entry per batch element, "
                         f"got {len(q_lens)} and {len(k_lens)}")
    pairs = sum(visible_pairs(q, k, causal) for q, k in zip(q_lens, k_lens))
    return 2.0 * (E + Ev) * H * pairs * MODE_FACTOR[mode]


def case_flops(case: Case) -> float:
    return attention_flops(case.H, case.E, case.ev, [case.L] * case.B, case.key_lengths(),
                           causal=case.causal, mode=case.mode)


# ======================================================================================== providers
@dataclass(frozen=True)
class Provider:
    """``fn(inputs) -> output`` (the forward; the harness adds the backward for "fwd+bwd" cases).
    ``devices``: the devices it has cases for (it is not listed at all for others).
    ``why_not(case)``: None when the provider can run ``case`` here, else the reason it is skipped.
    Both are called only when a benchmark runs (never at import or collection)."""
    name: str
    fn: Callable[[dict], Any]
    why_not: Callable[[Case], str | None] = lambda case: None
    devices: tuple[str, ...] = ("cpu", "cuda")


@dataclass
class Operation:
    """An operation to benchmark: its cases, how to build inputs, who computes it, what it costs.
    ``inputs(case, requires_grad)`` returns the keyword inputs of the providers, on ``case.device``;
    ``grad_inputs`` names the ones differentiated in "fwd+bwd" cases."""
    name: str
    description: str
    cases: Callable[[], list[Case]]
    inputs: Callable[[Case, bool], dict]
    providers: list[Provider]
    flops: Callable[[Case], float] = case_flops
    grad_inputs: tuple[str, ...] = ("query", "key", "value")

    def providers_for(self, case: Case, names: Sequence[str] | None = None) -> list[Provider]:
        """The providers that have ``case``'s device (optionally only those in ``names``), baseline first."""
        return [p for p in self.providers if case.device in p.devices and (names is None or p.name in names)]

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(f"operation {self.name!r} has no provider {name!r}; it has {[p.name for p in self.providers]}")


OPERATIONS: dict[str, Operation] = {}


def register(op: Operation) -> Operation:
    OPERATIONS[op.name] = op
    return op


# Availability checks shared by operations. Each runs lazily (inside a benchmark run).
def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _cuda_case(case: Case) -> str | None:
    return None if torch.cuda.is_available() else "no CUDA device"


def need_cpu_kernel(case: Case) -> str | None:
    from fastattn import _launchers
    ok, why = _launchers.cpu_available()
    return None if ok else why


def need_triton_kernel(case: Case) -> str | None:
    from fastattn import _launchers
    if (why := _cuda_case(case)) is not None:
        return why
    if case.dtype == "f64":
        return "Triton kernels take f16/bf16/f32"
    ok, why = _launchers.triton_available()
    return None if ok else why


def need_naive_memory(case: Case, limit_gib: float | None = None) -> str | None:
    """The naive reference materialises (B, H, L, S) scores, masked scores and probabilities (and their
    gradients in the backward); skip it where that would crowd the machine."""
    if limit_gib is None:
        limit_gib = 2.0 if case.device == "cpu" else 16.0
    per = case.B * case.H * case.L * case.S * torch.finfo(case.torch_dtype).bits // 8
    need = per * (3 if case.mode == "fwd" else 6) / 2**30
    return None if need <= limit_gib else f"naive scores would need {need:.1f} GiB (> {limit_gib:g})"


def need_flash_attn(case: Case) -> str | None:
    if (why := _cuda_case(case)) is not None:
        return why
    if not _has_module("flash_attn"):
        return "flash_attn not installed"
    if case.dtype not in ("f16", "bf16"):
        return "flash_attn takes f16/bf16"
    if case.mask != "none":
        return "flash_attn_func takes no mask (padded batches go through the varlen op)"
    if case.causal and case.L != case.S:
        return "flash_attn aligns causal bottom-right"
    return None


def need_xformers(case: Case) -> str | None:
    if (why := _cuda_case(case)) is not None:
        return why
    if not _has_module("xformers"):
        return "xformers not installed"
    if case.mask != "none":
        return "padded masks not wired for xformers"
    if case.causal and case.L != case.S:
        return "xformers' causal mask alignment differs for L != S"
    return None


# ============================================================================== operation: sdpa
def _sdpa_inputs(case: Case, requires_grad: bool) -> dict:
    """query (B, H, L, E), key (B, Hk, S, E), value (B, Hk, S, Ev): contiguous, standard normal, fixed seed."""
    dev, dt = torch.device(case.device), case.torch_dtype
    g = torch.Generator(device=dev).manual_seed(1234)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dt).requires_grad_(requires_grad)

    mask = None
    if case.mask == "pad":
        lens = torch.tensor(case.key_lengths(), device=dev)
        mask = (torch.arange(case.S, device=dev)[None, :] < lens[:, None]).view(case.B, 1, 1, case.S)
    elif case.mask != "none":
        raise ValueError(f"unknown mask kind {case.mask!r}")
    return dict(query=r(case.B, case.H, case.L, case.E), key=r(case.B, case.hk, case.S, case.E),
                value=r(case.B, case.hk, case.S, case.ev), attn_mask=mask, is_causal=case.causal,
                enable_gqa=case.hk != case.H)


def _sdpa_fastattn(backend: str) -> Callable[[dict], Any]:
    def fn(x: dict):
        import fastattn
        return fastattn.scaled_dot_product_attention(**x, backend=backend)
    return fn


def _sdpa_torch(x: dict):
    return torch.nn.functional.scaled_dot_product_attention(**x)


def _sdpa_reference(x: dict):
    from fastattn import reference
    return reference.scaled_dot_product_attention(**x, upcast=False)


def _sdpa_flash_attn(x: dict):
    from flash_attn import flash_attn_func  # (B, L, H, E) views of the same memory
    q, k, v = (x[n].transpose(1, 2) for n in ("query", "key", "value"))
    return flash_attn_func(q, k, v, causal=x["is_causal"]).transpose(1, 2)


def _sdpa_xformers(x: dict):
    import xformers.ops as xops
    q, k, v = (x[n].transpose(1, 2) for n in ("query", "key", "value"))
    bias = xops.LowerTriangularMask() if x["is_causal"] else None
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias).transpose(1, 2)


# Shapes. Issue 2 (CPU targets) and issue 3 (GPU targets) are the quick set; --full adds BERT
# inference/training, long sequences, the other dtypes and the causal/padded variants.
ISSUE2_SHAPES = [(8, 12, 128, 64), (8, 12, 512, 64), (16, 12, 64, 32)]           # (B, H, L=S, E)
ISSUE3_SHAPES = [(8, 12, 128, 64), (8, 12, 512, 64), (4, 16, 1024, 128), (4, 16, 4096, 128)]


def _sdpa_cases() -> list[Case]:
    cases: list[Case] = []

    def add(B, H, L, E, suites, *, S=None, **kw):
        cases.append(Case("sdpa", B, H, L, L if S is None else S, E, suites=tuple(suites), **kw))

    q, f = ("quick", "full"), ("full",)
    # ---- CPU: issue 2's measurements (quick), then the rest (full)
    for B, H, L, E in ISSUE2_SHAPES:
        add(B, H, L, E, q, family="issue2", dtype="f32")
        add(B, H, L, E, q, family="issue2", dtype="bf16")
        add(B, H, L, E, q, family="issue2", dtype="f32", mask="pad")
        add(B, H, L, E, q, family="issue2", dtype="f32", mode="fwd+bwd")
        add(B, H, L, E, f, family="issue2", dtype="f16")
        add(B, H, L, E, f, family="issue2", dtype="f32", causal=True)
        add(B, H, L, E, f, family="issue2", dtype="bf16", mask="pad")
        add(B, H, L, E, f, family="issue2", dtype="bf16", mode="fwd+bwd")
    for dt in ("f32", "bf16"):  # a third point for the throughput-against-length plot of the quick run
        add(8, 12, 256, 64, q, family="sweep", dtype=dt)
    for dt in ("f32", "bf16"):
        add(1, 1, 16, 32, f, family="call", dtype=dt)  # almost no work: the cost of a call itself
        for L in (128, 384, 512):
            add(1, 12, L, 64, f, family="bert-base-infer", dtype=dt)
        for L in (128, 512):
            add(1, 16, L, 64, f, family="bert-large-infer", dtype=dt)
        add(32, 12, 128, 64, f, family="bert-base-train", dtype=dt, mode="fwd+bwd")
        add(32, 12, 128, 64, f, family="bert-base-train", dtype=dt, mode="fwd+bwd", mask="pad")
        add(8, 16, 512, 64, f, family="bert-large-train", dtype=dt, mode="fwd+bwd")
        for L in (1024, 2048, 4096):
            add(1, 12, L, 64, f, family="long", dtype=dt)
            add(1, 12, L, 64, f, family="long", dtype=dt, causal=True)
        add(1, 12, 2048, 64, f, family="long", dtype=dt, causal=True, mode="fwd+bwd")
    # ---- CPU: issue 2's memory check (fresh subprocess per call)
    for mode in ("fwd", "fwd+bwd"):
        add(1, 4, 16384, 64, ("memory",), family="memory", causal=True, mode=mode, mem_limit_mib=64.0)
    # ---- GPU: issue 3's cases (quick), the rest (full)
    for B, H, L, E in ISSUE3_SHAPES:
        for dt in ("bf16", "f16"):
            for var in (dict(), dict(causal=True), dict(mask="pad")):
                for mode in ("fwd", "fwd+bwd"):
                    add(B, H, L, E, q if dt == "bf16" or not var else f, family="issue3", device="cuda",
                        dtype=dt, mode=mode, **var)
        add(B, H, L, E, f, family="issue3", device="cuda", dtype="f32")
    for dt in ("bf16", "f16"):
        for L in (8192, 16384):
            add(1, 16, L, 128, f, family="long", device="cuda", dtype=dt, causal=True)
            add(1, 16, L, 128, f, family="long", device="cuda", dtype=dt, causal=True, mode="fwd+bwd")
        add(32, 12, 128, 64, f, family="bert-base-train", device="cuda", dtype=dt, mode="fwd+bwd", mask="pad")
        add(8, 16, 512, 64, f, family="bert-large-train", device="cuda", dtype=dt, mode="fwd+bwd")
    add(1, 4, 16384, 64, ("memory",), family="memory", device="cuda", dtype="bf16", causal=True,
        mem_limit_mib=64.0)
    return cases


register(Operation(
    name="sdpa",
    description="scaled_dot_product_attention(q, k, v, attn_mask, is_causal)",
    cases=_sdpa_cases,
    inputs=_sdpa_inputs,
    providers=[
        Provider("torch", _sdpa_torch),
        Provider("fastattn-cpu", _sdpa_fastattn("cpu"), need_cpu_kernel, devices=("cpu",)),
        Provider("fastattn-triton", _sdpa_fastattn("triton"), need_triton_kernel, devices=("cuda",)),
        Provider("flash_attn", _sdpa_flash_attn, need_flash_attn, devices=("cuda",)),
        Provider("xformers", _sdpa_xformers, need_xformers, devices=("cuda",)),
        Provider("reference", _sdpa_reference, need_naive_memory),
    ],
))


# ============================================================================================ timing
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


def _synchronizer(devices: Iterable[str]) -> Callable[[], None]:
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
    sync = _synchronizer([device])
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
    leaves = [inputs[n] for n in op.grad_inputs]
    out = provider.fn(inputs)
    gen = torch.Generator(device=out.device).manual_seed(4321)
    grad = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32).to(out.dtype)
    del out

    def step():
        return torch.autograd.grad(provider.fn(inputs), leaves, grad)
    return step


# ============================================================================================ memory
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
    code = "import fastattn.bench as b; b._memory_child()"
    env = dict(os.environ)  # the child imports this very fastattn, installed or not
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, "-c", code, req], capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"memory subprocess failed ({r.returncode}): {tail}")
    return json.loads(r.stdout.strip().splitlines()[-1])


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


def ceiling_for(ceilings: dict[str, float], device: str, dtype: str) -> float | None:
    """The ceiling for ``dtype`` rows: the faster of torch.mm in that dtype and in float32 (a kernel
    may compute a low-precision input in float32, as CPUs without native float16 math must)."""
    vals = [v for k, v in ceilings.items() if k in (f"{device}/{dtype}", f"{device}/f32")]
    return max(vals) if vals else None


# ======================================================================================= the run
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
    info["triton"] = (importlib.import_module("triton").__version__ if _has_module("triton") else None)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def select_cases(ops: Iterable[str] | None = None, suites: Iterable[str] = ("quick",), *,
                 devices: Iterable[str] | None = None, dtypes: Iterable[str] | None = None,
                 modes: Iterable[str] | None = None, contains: str | None = None) -> list[Case]:
    """Cases of ``ops`` (default all) in any of ``suites``, optionally filtered."""
    suites = set(suites)
    out = []
    for name in (ops or OPERATIONS):
        if name not in OPERATIONS:
            raise ValueError(f"unknown operation {name!r}; known: {sorted(OPERATIONS)}")
        for c in OPERATIONS[name].cases():
            if not suites.intersection(c.suites):
                continue
            if devices is not None and c.device not in devices:
                continue
            if dtypes is not None and c.dtype not in dtypes:
                continue
            if modes is not None and c.mode not in modes:
                continue
            if contains and contains not in c.id:
                continue
            out.append(c)
    return out


def run_case(case: Case, providers: Sequence[str] | None = None, settings: Settings = QUICK,
             ceilings: dict[str, float] | None = None, measure_memory: bool = True) -> list[Result]:
    """Time one case on each provider that can run it (skips carry the reason), side by side."""
    op = OPERATIONS[case.op]
    flops = op.flops(case)
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
    if calls:
        try:
            timings = time_interleaved(calls, settings, case.device, called=True)
        except Exception as e:  # noqa: BLE001
            for name in calls:
                rows[name].status = f"error: {type(e).__name__}: {e}".splitlines()[0][:200]
            timings = {}
        for name, t in timings.items():
            row = rows[name]
            row.median_s, row.q1_s, row.q3_s, row.min_s = t.median, t.q1, t.q3, t.min
            row.rounds, row.iterations = t.rounds, t.iterations
            row.flops_per_s = flops / t.median if t.median > 0 else None
            ceil = ceiling_for(ceilings or {}, case.device, case.dtype)
            if ceil and row.flops_per_s:
                row.ceiling_frac = row.flops_per_s / ceil
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
        if enabled and _has_module("tqdm"):
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
    bar.advance()
    results: list[Result] = []
    try:
        for c in timed:
            bar.step(f"{c.op} {c.shape} {c.dtype} {c.variant}")
            results += run_case(c, providers, settings, ceilings, measure_memory)
            bar.advance()
        for c in mem:
            bar.step(f"memory {c.op} {c.shape} {c.variant}")
            results += run_memory_case(c, providers, threads or torch.get_num_threads())
            bar.advance()
    finally:
        bar.close()
    return {
        "format": 1,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command or " ".join(["fastattn"] + sys.argv[1:]),
        "machine": machine_info(),
        "settings": dataclasses.asdict(settings),
        "ceilings": ceilings,
        "skipped_devices": skipped_devices,
        "seconds": time.perf_counter() - t_start,
        "results": [dataclasses.asdict(r) for r in results],
    }


# ========================================================================================= JSON
def save_report(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


def load_report(path: str) -> dict:
    with open(path) as f:
        report = json.load(f)
    if report.get("format") != 1 or "results" not in report:
        raise ValueError(f"{path} is not a fastattn bench report (format 1)")
    return report


def results_of(report: dict) -> list[Result]:
    return [Result(**r) for r in report["results"]]


# ======================================================================================= tables
def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= f:
            return f"{s / f:.3g} {unit}" if s / f < 1000 else f"{s / f:.0f} {unit}"
    return f"{s * 1e9:.0f} ns"


def _fmt_rate(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r / 1e12:.1f} T" if r >= 1e12 else f"{r / 1e9:.1f}"


def _fmt_mib(b: int | None) -> str:
    return "-" if b is None else f"{b / MIB:.1f}"


def _row_cells(r: Result) -> list[str]:
    c = Case.from_dict(r.case)
    head = [c.op, c.device, c.shape, c.dtype, c.variant, r.provider]
    if not r.ok:
        return head + [r.status] + [""] * 5
    sp = r.spread
    return head + [_fmt_time(r.median_s), "-" if sp is None else f"{100 * sp:.1f}%", _fmt_rate(r.flops_per_s),
                   "-" if r.ceiling_frac is None else f"{100 * r.ceiling_frac:.0f}%",
                   "-" if r.speedup is None else f"{r.speedup:.2f}x", _fmt_mib(r.peak_bytes)]


TIME_COLUMNS = ["op", "dev", "shape", "dtype", "variant", "provider", "median", "IQR", "GFLOP/s", "% mm",
                "x torch", "peak MiB"]


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    def spans(r, i):  # a skip/error reason runs across the columns after the provider
        return i >= 6 and len(r) > 6 and r[6].startswith(("skipped", "error"))
    widths = [max([len(h)] + [len(r[i]) for r in rows if i < len(r) and not spans(r, i)])
              for i, h in enumerate(header)]
    right = {i for i, h in enumerate(header) if h in ("median", "IQR", "GFLOP/s", "% mm", "x torch", "peak MiB",
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
    return _table(TIME_COLUMNS, [_row_cells(r) for r in sorted(rows, key=_table_order)], markdown)


def _table_order(r: Result):
    """Group rows by variant, then dtype (f32 first), shape family and length; providers as registered."""
    c = Case.from_dict(r.case)
    op = OPERATIONS.get(c.op)
    names = [p.name for p in op.providers] if op else []
    return (c.op, c.device, c.mode, c.causal, c.mask, c.dtype != "f32", c.dtype, (c.B, c.H, c.E), c.L, c.S,
            names.index(r.provider) if r.provider in names else len(names), r.provider)


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
        rows.append(head + [_fmt_time(r.median_s), f"{_fmt_mib(r.peak_bytes)} MiB", f"{_fmt_mib(r.kept_bytes)} MiB",
                            f"{_fmt_mib(extra)} MiB", "-" if limit is None else f"{limit:g} MiB", verdict])
    return _table(MEMORY_COLUMNS, rows, markdown) if rows else ""


def geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def format_summary(report: dict) -> str:
    """Geometric-mean speedup over torch per (device, shape family, dtype, variant, provider), and the
    mean share of the matmul ceiling: the headline numbers (family "issue2" = issue 2's target shapes)."""
    groups: dict[tuple, list[Result]] = {}
    for r in results_of(report):
        if r.kind == "time" and r.ok and r.provider != BASELINE and r.speedup:
            c = Case.from_dict(r.case)
            groups.setdefault((c.op, c.device, c.family, c.dtype, c.variant, r.provider), []).append(r)
    lines = []
    for (op, dev, fam, dt, var, prov), rs in sorted(groups.items()):
        share = [r.ceiling_frac for r in rs if r.ceiling_frac]
        gm = geomean([r.speedup for r in rs])
        lines.append(f"  {op} {dev} {fam:16} {dt:4} {var:18} {prov:16} geomean {gm:5.2f}x torch over {len(rs)} "
                     f"shape(s)" + (f", {100 * statistics.mean(share):.0f}% of matmul" if share else ""))
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
            f"{k} {_fmt_rate(v)}{'FLOP/s' if v >= 1e12 else ' GFLOP/s'}" for k, v in ceil.items()))
        if "cuda/f32" in ceil:
            lines.append("         (cuda/f32 measured with TF32 tensor cores allowed)")
        low = [k for k, v in ceil.items() if ceiling_for(ceil, *k.split("/")) != v]
        if low:
            lines.append(f"         ({', '.join(low)}: % mm uses the f32 ceiling, which is higher here)")
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
        f = _fmt_time if c.kind == "time" else (lambda b: f"{b / MIB:.1f} MiB")
        rows.append([c.case_id, c.provider, c.kind, f(c.old), f(c.new), f"{100 * (c.ratio - 1):+.1f}%", c.verdict])
    n_reg = sum(c.verdict in ("regression", "more memory") for c in changes)
    n_fast = sum(c.verdict in ("faster", "less memory") for c in changes)
    head = f"compared {len(changes)} measurements: {n_reg} regression(s), {n_fast} improvement(s)"
    if not rows:
        return head
    return head + "\n" + _table(["case", "provider", "kind", "old", "new", "change", "verdict"], rows, False)


# ======================================================================================== plots
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


# ========================================================================================== CLI
def add_arguments(p) -> None:
    """The options of ``fastattn bench`` (wired in fastattn/cli.py)."""
    p.add_argument("--full", action="store_true", help="every case (~10 min on 2 cores), incl. --memory")
    p.add_argument("--memory", action="store_true",
                   help="add the long-sequence peak-memory check (B1 H4 L16384 E64 causal, subprocess per call)")
    p.add_argument("--op", action="append", help=f"operation(s) to run (default all: {', '.join(OPERATIONS)})")
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
                   help="time each CPU case quietly, then with N processes spinning on cores (fastattn/contend.py)")


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
        from fastattn import contend
        return contend.main(a, cases)
    if a.compare:
        baseline = load_report(a.compare)  # fail before measuring, not after
    settings = FULL if a.full else QUICK
    report = run(cases, a.provider, settings, threads=a.threads, measure_memory=not a.no_memory_column,
                 command=" ".join(["fastattn", "bench"] + sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None)
    print(format_header(report))
    print()
    print(format_table(report, show_skipped=a.show_skipped))
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
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "results.json")
    save_report(report, path)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(f"`{report['command']}`\n\n```\n{format_header(report)}\n```\n\n")
        f.write(format_table(report, markdown=True) + "\n")
        if mem:
            f.write("\n" + format_memory_table(report, markdown=True) + "\n")
        if summary:
            f.write(f"\n```\n{summary}\n```\n")
    written = [path, os.path.join(a.out, "table.md")]
    if not a.no_plot:
        pngs = plot(report, a.out)
        if not pngs and not _has_module("matplotlib"):
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


# ======================================================================= model level: padding-free encoders
# A whole HuggingFace encoder on a padded batch of sentences of mixed length: transformers' SDPA on the padded
# batch, fastattn on the padded batch, and fastattn's packed model (fastattn.integrations.packed: every layer
# on the real tokens only). Used by bench/test_bench_packed.py and examples/sentence_embeddings.py.
ENCODER_PROVIDERS = ("sdpa", "fastattn", "fastattn-packed")


def mixed_length_texts(corpus: Sequence[str], tokenizer, n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """``n`` texts whose token counts (special tokens included) are spread evenly over ``lo..hi``, in a seeded
    random order: each is the longest run of whole words of ``corpus`` (read as one circular word stream, from
    the start of a seeded random corpus entry) that the tokenizer turns into at most its target count.
    Deterministic for a given corpus, tokenizer and seed; a count falls short of its target only when one word
    splits into several tokens at the cut."""
    import random

    words, starts = [], []
    for text in corpus:
        starts.append(len(words))
        words += text.split()
    if len(words) < hi:
        raise ValueError(f"the corpus has {len(words)} words; lengths up to {hi} tokens need at least {hi}")
    rng = random.Random(seed)
    targets = [round(lo + (hi - lo) * i / max(n - 1, 1)) for i in range(n)]
    rng.shuffle(targets)

    def tokens(ws: list[str]) -> int:
        return len(tokenizer(" ".join(ws))["input_ids"])

    texts = []
    for target in targets:
        start = starts[rng.randrange(len(starts))]
        stream = (words[start:] + words[:start])[:target]  # every word is at least one token
        k_lo, k_hi = 1, len(stream)  # largest k with tokens(stream[:k]) <= target
        while k_lo < k_hi:
            mid = (k_lo + k_hi + 1) // 2
            if tokens(stream[:mid]) <= target:
                k_lo = mid
            else:
                k_hi = mid - 1
        texts.append(" ".join(stream[:k_lo]))
    return texts


def load_encoders(path: str, dtype: torch.dtype = torch.float32,
                  providers: Sequence[str] = ENCODER_PROVIDERS) -> dict[str, torch.nn.Module]:
    """One eval-mode copy of the HuggingFace model at ``path`` per provider: ``"sdpa"`` (transformers' SDPA,
    padded), ``"fastattn"`` (``attn_implementation="fastattn"``, padded), ``"fastattn-packed"``
    (``fastattn.integrations.transformers.packed``)."""
    import transformers

    import fastattn.integrations.transformers as fa_hf

    fa_hf.register()
    models = {}
    for p in providers:
        if p not in ENCODER_PROVIDERS:
            raise ValueError(f"provider must be one of {ENCODER_PROVIDERS}, got {p!r}")
        impl = "fastattn" if p == "fastattn" else "sdpa"
        model = transformers.AutoModel.from_pretrained(path, attn_implementation=impl, dtype=dtype).eval()
        models[p] = fa_hf.packed(model) if p == "fastattn-packed" else model
    return models


def mean_pooled(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: the mean of
    ``last_hidden_state`` over each sentence's real tokens, L2-normalised; float32 (B, hidden)."""
    out = model(**batch).last_hidden_state.float()
    m = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((out * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)
