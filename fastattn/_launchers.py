"""The registry: which backend a call runs on, and which launcher module runs an op family there.

Backends: "cpu" (the C++ kernels, fastattn/_cpu.py), "triton" (the Triton kernels, kernels/<family>.py;
CPU tensors only under TRITON_INTERPRET=1) and "reference" (the naive formulas of fastattn.reference, run by
the public functions themselves). CUDA tensors always run Triton. The ops (fastattn/_ops/) ask
:func:`launcher_for` for their launcher; nothing else picks a module.

A launcher module holds, for each op family it runs, functions of one contract on both devices:
"attention": ``attention_fwd`` / ``attention_bwd`` and ``varlen_fwd`` / ``varlen_bwd``; "additive":
``additive_fwd`` / ``additive_bwd``; "hard": ``hard_fwd`` / ``hard_bwd``; "decode": ``decode_fwd`` (inference
only; its contract is kernels/decode.py's module doc).

One more route exists, on purpose: :func:`cpu_eager`, the CPU eager inference route (the whole plain call in
C++, fastattn/functional.py explains when it is taken).
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("cpu", "triton", "reference")

# Op family -> the Triton launcher module; the CPU launcher module holds every family.
_TRITON_LAUNCHERS = {
    "attention": "fastattn.kernels.attention",
    "additive": "fastattn.kernels.additive",
    "hard": "fastattn.kernels.hard",
    "decode": "fastattn.kernels.decode",
}
_CPU_LAUNCHER = "fastattn._cpu"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _import(name: str):
    return importlib.import_module(name)


def launcher_for(family: str, backend: str, device: torch.device):
    """The launcher module that runs op family ``family`` ("attention", "additive", "hard", "decode") for
    ``backend`` on ``device``."""
    if device.type == "cuda" or backend == "triton":
        return _import(_TRITON_LAUNCHERS[family])
    if backend == "cpu":
        return _import(_CPU_LAUNCHER)
    raise ValueError(f"backend {backend!r} has no {family} kernel for device {device}")


@functools.lru_cache(maxsize=None)
def triton_available() -> tuple[bool, str]:
    """(available, reason) for the Triton kernels: importable, and a GPU or the interpreter."""
    try:
        _import("triton")
        _import(_TRITON_LAUNCHERS["attention"])
    except Exception as e:  # noqa: BLE001 - report any import failure verbatim
        return False, f"Triton kernels cannot be imported ({type(e).__name__}: {e})"
    return True, ""


@functools.lru_cache(maxsize=None)
def cpu_available() -> tuple[bool, str]:
    try:
        _import(_CPU_LAUNCHER).isa_name()
    except Exception as e:  # noqa: BLE001
        return False, f"the C++ extension is not built or cannot be loaded ({type(e).__name__}: {e})"
    return True, ""


def cpu_eager():
    """The CPU eager inference route: the kernel module's ``eager_fwd`` (csrc/eager.cpp), which takes a whole
    plain eager call of ``scaled_dot_product_attention`` on CPU tensors and returns None for any other; None
    where the module cannot load."""
    return _import(_CPU_LAUNCHER).module().eager_fwd if cpu_available()[0] else None


def cpu_kvcache():
    """The CPU eager route of ``attention_with_kvcache``: the kernel module's ``kvcache_fwd`` (csrc/eager.cpp),
    which takes a whole plain eager call on CPU tensors and returns None for any other; None where the module
    cannot load."""
    return _import(_CPU_LAUNCHER).module().kvcache_fwd if cpu_available()[0] else None


def choose_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend a call runs on: ``backend`` if given (checked against the device and what is installed),
    else "cpu" for CPU tensors, "triton" for CUDA tensors ("reference" for CUDA float64: exact float64 math,
    Triton has no float64 tensor cores)."""
    if torch.compiler.is_compiling():
        # Availability was established when the model ran eagerly / at import; dynamo cannot trace
        # the import probes, and the op itself raises a clear error if a kernel is missing.
        if backend is not None:
            return backend
        if device.type == "cuda" and dtype == torch.float64:
            return "reference"
        return "cpu" if device.type == "cpu" else "triton"
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend == "cpu":
            if device.type != "cpu":
                raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
            ok, why = cpu_available()
            if not ok:
                raise RuntimeError(f"backend='cpu' is unavailable: {why}")
        elif backend == "triton":
            ok, why = triton_available()
            if not ok:
                raise RuntimeError(f"backend='triton' is unavailable: {why}")
            if device.type == "cpu" and not triton_interpreting():
                raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the "
                                 "Triton interpreter on CPU tensors)")
            if device.type not in ("cpu", "cuda"):
                raise ValueError(f"backend='triton' supports CUDA tensors, got {device}")
            if dtype == torch.float64 and device.type == "cuda":
                raise TypeError("backend='triton' supports float16, bfloat16 and float32, not float64")
        return backend
    if device.type == "cpu":
        ok, why = cpu_available()
        if not ok:
            raise RuntimeError(f"no fastattn kernel for CPU tensors: {why}")
        return "cpu"
    if device.type == "cuda":
        if dtype == torch.float64:
            return "reference"
        ok, why = triton_available()
        if not ok:
            raise RuntimeError(f"no fastattn kernel for CUDA tensors: {why}")
        return "triton"
    raise ValueError(f"fastattn supports CPU and CUDA tensors, got {device}")
