"""The registry: every benchmarked operation, with its cases, input builder, providers and FLOP count.

An operation registers once (``fastattn/bench/ops/<op>.py``); ``fastattn bench`` and the pytest-benchmark
suite in ``bench/`` both read it, so they time the same calls. The availability checks below are shared by
the operations' providers; each runs lazily, inside a benchmark run (never at import or collection).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from fastattn.bench.cases import Case, case_flops

BASELINE = "torch"  # the provider speedups are measured against


# ======================================================================================== providers
@dataclass(frozen=True)
class Provider:
    """``fn(inputs) -> output`` (the forward; the harness adds the backward for "fwd+bwd" cases).
    ``devices``: the devices it has cases for (it is not listed at all for others).
    ``why_not(case)``: None when the provider can run ``case`` here, else the reason it is skipped.
    Both are called only when a benchmark runs (never at import or collection).
    ``grad_inputs``: the inputs its "fwd+bwd" cases differentiate, where they are not the operation's
    (a provider that reads its own copy of the inputs, such as a padded batch)."""
    name: str
    fn: Callable[[dict], Any]
    why_not: Callable[[Case], str | None] = lambda case: None
    devices: tuple[str, ...] = ("cpu", "cuda")
    grad_inputs: tuple[str, ...] | None = None


@dataclass
class Operation:
    """An operation to benchmark: its cases, how to build inputs, who computes it, what it costs.
    ``inputs(case, requires_grad)`` returns the keyword inputs of the providers, on ``case.device``;
    ``grad_inputs`` names the ones differentiated in "fwd+bwd" cases. ``in_default_run``: whether
    ``fastattn bench`` without ``--op`` runs it (the others run when named: ``--op varlen``).
    ``bytes_read(case)``: for a memory-bound operation, the bytes one call must read; its rows then also
    report GB/s and the share of the read bandwidth measured in the same run (None: FLOP rates only)."""
    name: str
    description: str
    cases: Callable[[], list[Case]]
    inputs: Callable[[Case, bool], dict]
    providers: list[Provider]
    flops: Callable[[Case], float] = case_flops
    grad_inputs: tuple[str, ...] = ("query", "key", "value")
    in_default_run: bool = True
    bytes_read: Callable[[Case], float] | None = None

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
def has_module(name: str) -> bool:
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
    if not has_module("flash_attn"):
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
    if not has_module("xformers"):
        return "xformers not installed"
    if case.mask != "none":
        return "padded masks not wired for xformers"
    if case.causal and case.L != case.S:
        return "xformers' causal mask alignment differs for L != S"
    return None


def need_memory(need_bytes: float, what: str) -> str | None:
    """Skip a provider whose call needs more memory than the machine has available (Linux ``MemAvailable``;
    no check elsewhere)."""
    avail = available_bytes()
    if avail is None or need_bytes <= avail:
        return None
    return f"{what} needs ~{need_bytes / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"


def available_bytes() -> int | None:
    """Memory the kernel could hand out now (``MemAvailable`` in /proc/meminfo), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def select_cases(ops: Iterable[str] | None = None, suites: Iterable[str] = ("quick",), *,
                 devices: Iterable[str] | None = None, dtypes: Iterable[str] | None = None,
                 modes: Iterable[str] | None = None, contains: str | None = None) -> list[Case]:
    """Cases of ``ops`` (default: the operations of the default run) in any of ``suites``, optionally filtered."""
    suites = set(suites)
    out = []
    for name in (ops or [n for n, op in OPERATIONS.items() if op.in_default_run]):
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
