"""Which launcher module runs a backend on a device (the only place that knows)."""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("cpu", "triton", "reference")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _import(name: str):
    return importlib.import_module(name)


def get(backend: str, device: torch.device):
    """The module with ``attention_fwd``/``attention_bwd`` for ``backend`` on ``device``."""
    if device.type == "cuda" or backend == "triton":
        return _import("fastattn.kernels.attention")
    if backend == "cpu":
        return _import("fastattn._cpu")
    raise ValueError(f"backend {backend!r} has no kernel for device {device}")


@functools.lru_cache(maxsize=None)
def triton_available() -> tuple[bool, str]:
    """(available, reason) for the Triton kernels: importable, and a GPU or the interpreter."""
    try:
        _import("triton")
        _import("fastattn.kernels.attention")
    except Exception as e:  # noqa: BLE001 - report any import failure verbatim
        return False, f"Triton kernels cannot be imported ({type(e).__name__}: {e})"
    return True, ""


def cpu_eager():
    """The CPU kernel module's ``eager_fwd`` (csrc/eager.cpp: the whole plain eager inference call in C++,
    None for any other case), or None where the module cannot load."""
    return _import("fastattn._cpu").module().eager_fwd if cpu_available()[0] else None


@functools.lru_cache(maxsize=None)
def cpu_available() -> tuple[bool, str]:
    try:
        _import("fastattn._cpu").isa_name()
    except Exception as e:  # noqa: BLE001
        return False, f"the C++ extension is not built or cannot be loaded ({type(e).__name__}: {e})"
    return True, ""
