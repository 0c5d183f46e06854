"""Host-side helpers every launcher shares: Triton's decoration mode (interpreted or compiled), stride
arguments and the dot precision."""
from __future__ import annotations

import importlib

import torch


def is_interpreted(fn) -> bool:
    """True when ``fn`` was decorated under TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - older layouts
        return False
    return isinstance(fn, InterpretedFunction)


def _decorated_in_other_mode(module) -> bool:
    """Whether ``module`` holds an @triton.jit function decorated in the mode Triton is not in now."""
    from triton import knobs
    from triton.runtime.jit import JITFunction
    now = bool(knobs.runtime.interpret)
    return any(is_interpreted(v) != now for v in vars(module).values()
               if isinstance(v, JITFunction) or is_interpreted(v))


def import_in_current_mode(package: str, names: tuple[str, ...]) -> None:
    """Import the kernel modules ``package.<name>`` in order, reloading those decorated under the other
    TRITON_INTERPRET mode. Triton picks interpreted or compiled functions when it decorates them, so a
    launcher module reloaded after the switch changed (what the tests do) must reload the modules that hold
    its kernels and helpers too; ``names`` lists helpers before their users, so each reload binds the
    helpers' new functions."""
    for name in names:
        module = importlib.import_module(f"{package}.{name}")
        if _decorated_in_other_mode(module):
            importlib.reload(module)


_STRIDE_NAMES = {"q": "qb qh qm qe", "k": "kb kh kn ke", "v": "vb vh vn ve", "o": "ob oh om oe",
                 "do": "dob doh dom doe", "dq": "dqb dqh dqm dqe", "dk": "dkb dkh dkn dke",
                 "dv": "dvb dvh dvn dve", "m": "mb mh mm mn", "dm": "dmb dmh dmm dmn"}


def named_strides(prefix: str, t) -> dict[str, int]:
    """The kernels' stride arguments of tensor ``t`` (or of a stride tuple): ``stride_<prefix><dim>`` for the
    (b, h, row, e) dims, e.g. stride_qb, stride_qh, stride_qm, stride_qe."""
    st = t.stride() if isinstance(t, torch.Tensor) else t
    return {f"stride_{n}": int(x) for n, x in zip(_STRIDE_NAMES[prefix].split(), st)}


def dot_precision(dtype: torch.dtype) -> str:
    """The DOT_PRECISION of a call: fp32 follows torch's allow_tf32 switch (tf32 tensor cores or ieee FMA);
    fp16 / bf16 products are exact in fp32 ("ieee")."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "ieee"
