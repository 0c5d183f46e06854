"""CPU launcher: picks the C++ kernel module for this CPU, allocates outputs, passes pointers and strides.

The kernels (csrc/) are built once per instruction set: ``fastattn._C_avx512``, ``_C_avx2`` and
``_C_portable``. :func:`module` imports the widest one that is built and that the running CPU supports
(``fastattn._C.cpu_features()``); ``FASTATTN_ISA=portable|avx2|avx512`` forces one.

Tensors are read in place through their strides (no ``.contiguous()`` copies): each one travels as a
``Tensor4`` (address, strides in elements). Shape legend: B batch, H query heads, Hk key/value heads,
L query length, S key length, E head dim, Ev value head dim.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch
from torch import Tensor

from fastattn import _philox
from fastattn._ops import empty_output

ISAS = ("avx512", "avx2", "portable")

# Element dtype codes of csrc/common.h (enum DType).
DTYPE_CODES = {torch.bool: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4, torch.float64: 5}

# CPU features each module's instructions need (fastattn._C.cpu_features() names).
_NEEDS = {
    "portable": (),
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"),
}


def _unusable_reason(isa: str) -> str | None:
    """Why the ISA's module cannot run here (None if it can)."""
    try:
        feats = importlib.import_module("fastattn._C").cpu_features()
    except ImportError as e:
        if isa == "portable":
            feats = {}
        else:
            return f"fastattn._C (CPU feature detection) cannot be imported: {e}"
    missing = [f for f in _NEEDS[isa] if not feats.get(f, False)]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    # Import only after the feature check: a wide-vector module may use its instructions anywhere.
    try:
        mod = importlib.import_module(f"fastattn._C_{isa}")
    except ModuleNotFoundError as e:
        return f"fastattn._C_{isa} is not built ({e})"
    # Any other ImportError (say, an undefined symbol) is a broken build: let it surface.
    if mod.isa()[1] and not feats.get("avx512bf16", False):
        return "the module uses AVX512-BF16 instructions the CPU lacks"
    return None


@functools.lru_cache(maxsize=None)
def module():
    """The kernel module: FASTATTN_ISA if set (an error if it cannot run), else the widest usable one."""
    forced = os.environ.get("FASTATTN_ISA", "").strip().lower()
    if forced:
        if forced not in ISAS:
            raise ValueError(f"FASTATTN_ISA must be one of {', '.join(ISAS)}, got {forced!r}")
        why = _unusable_reason(forced)
        if why is not None:
            raise RuntimeError(f"FASTATTN_ISA={forced} cannot be used: {why}")
        return _ready(importlib.import_module(f"fastattn._C_{forced}"))
    reasons = []
    for isa in ISAS:
        why = _unusable_reason(isa)
        if why is None:
            return _ready(importlib.import_module(f"fastattn._C_{isa}"))
        reasons.append(f"{isa}: {why}")
    raise ImportError("no fastattn CPU kernel module can be loaded (" + "; ".join(reasons) + ")")


def _ready(mod):
    """mod, with its eager_fwd (csrc/eager.cpp) handed the torch objects it compares against."""
    by_code = tuple(sorted(DTYPE_CODES, key=DTYPE_CODES.get))  # codes 1..5: bool, f32, f16, bf16, f64
    mod.eager_init(Tensor, by_code, torch.strided,
                   torch.is_grad_enabled, torch._C._is_tracing, torch._C._len_torch_dispatch_stack,
                   torch._C._are_functorch_transforms_active, torch.get_num_threads)
    return mod


def isa_name() -> str:
    """Name of the instruction set of the kernels in use ("avx512", "avx2" or "portable")."""
    return module().isa()[0]


def _t4(mod, t: Tensor, broadcast: bool = False):
    """Tensor4 of a 4-D tensor (3-D: se = 0). ``broadcast``: size-1 dims read with stride 0 (masks)."""
    st = [0 if broadcast and n == 1 else s for n, s in zip(t.shape, t.stride())]
    if t.dim() == 3:
        st.append(0)
    return mod.Tensor4(t.data_ptr(), *st)


def make_params(mod, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float, is_causal: bool,
                dropout_p: float, seed: int, sizes: tuple[int, ...] | None = None, t4=None,
                causal_offset: int = 0):
    """A Params with the inputs, sizes and scalars filled in (outputs are the caller's). ``sizes`` (B, H, Hk,
    L, S, E, Ev) and ``t4`` (how q/k/v travel) default to 4-D (B, H, L, E) tensors; varlen passes its own.
    ``causal_offset``: with ``is_causal``, key j is visible to query i iff j <= i + causal_offset."""
    if sizes is None:
        B, H, L, E = q.shape
        _, Hk, S, _ = k.shape
        sizes = (B, H, Hk, L, S, E, v.shape[-1])
    t4 = t4 or _t4
    p = mod.Params()
    p.q, p.k, p.v = t4(mod, q), t4(mod, k), t4(mod, v)
    p.dtype = DTYPE_CODES[q.dtype]
    if mask is not None:
        p.mask = _t4(mod, mask, broadcast=True)
        p.mask_dtype = DTYPE_CODES[mask.dtype]
    p.B, p.H, p.Hk, p.L, p.S, p.E, p.Ev = sizes
    p.scale = float(scale)
    p.is_causal = bool(is_causal)
    p.causal_offset = int(causal_offset)
    p.dropout_p = float(dropout_p)
    if dropout_p > 0.0:
        p.thr = _philox.threshold(dropout_p)
        p.seed = int(seed) & (2**64 - 1)
    p.num_threads = torch.get_num_threads()
    return p


_NO_TENSOR = (0, 0, 0, 0, 0)


def _check(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, L, E), got {q.dim()}, {k.dim()}, {v.dim()} dims")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"unsupported dtype {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if mask is not None and mask.dtype not in (torch.bool, torch.float32, q.dtype):
        raise TypeError(f"mask must be bool, float32 or {q.dtype}, got {mask.dtype}")


# ============================================================================================ forward

def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float, is_causal: bool,
                  dropout_p: float, seed: int, return_lo: bool = False, causal_offset: int = 0):
    """(out, lse): out (B, H, L, Ev) in q's dtype (laid out by ``fastattn._ops.empty_output``), lse (B, H, L) float32.
    ``return_lo`` (float16 / bfloat16, for training): (out, lse, out_lo), out_lo int16 laid out as out: the
    rounding residual of the fp32 result O in units of out's exponent (csrc/common.h, encode_lo), from which
    :func:`attention_bwd` reads O back to ~2^-23 relative for its delta = rowsum(dout * O).
    ``causal_offset`` (with ``is_causal``): key j is visible to query i iff j <= i + causal_offset; 0 (the
    default) is top-left alignment (torch's ``is_causal``), S - L lower-right (torch's ``causal_lower_right``).
    Any int: rows that see no key (i + causal_offset < 0) give out = 0 and lse = -inf, as fully masked rows do."""
    return _attention_fwd(module(), q, k, v, mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
                          seed=seed, return_lo=return_lo, causal_offset=causal_offset)


def _lo_like(out: Tensor) -> Tensor:
    """An int16 out_lo buffer laid out as out (the return_lo forwards' third output)."""
    if out.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"return_lo needs float16 or bfloat16 inputs, got {out.dtype}")
    return torch.empty_like(out, dtype=torch.int16)  # out is dense: its strides are kept


def _attention_fwd(mod, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float, is_causal: bool,
                   dropout_p: float, seed: int, return_lo: bool = False, causal_offset: int = 0):
    """attention_fwd with an explicit kernel module (tests run every ISA)."""
    _check(q, k, v, mask)
    B, H, L, _ = q.shape
    S, Ev = k.shape[2], v.shape[3]
    out = empty_output(q, v, dropout_p)
    lse = q.new_empty(B, H, L, dtype=torch.float32)
    lo = _lo_like(out) if return_lo else None
    res = (out, lse) if lo is None else (out, lse, lo)
    if out.numel() == 0 and lse.numel() == 0:
        return res
    if S == 0 or Ev == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        if lo is not None:
            lo.zero_()
        return res
    if mask is None:
        m5, mdt = _NO_TENSOR, 0
    else:
        m5 = (mask.data_ptr(), *(0 if n == 1 else st for n, st in zip(mask.shape, mask.stride())))
        mdt = DTYPE_CODES[mask.dtype]
    drop = dropout_p > 0.0
    mod.fwd_direct(
        (q.data_ptr(), *q.stride()), (k.data_ptr(), *k.stride()), (v.data_ptr(), *v.stride()), m5,
        (out.data_ptr(), *out.stride()), _NO_TENSOR if lo is None else (lo.data_ptr(), *lo.stride()),
        (lse.data_ptr(), *lse.stride(), 0),
        (DTYPE_CODES[q.dtype], mdt, B, H, k.shape[1], L, S, q.shape[3], Ev, int(is_causal),
         _philox.threshold(dropout_p) if drop else 0, torch.get_num_threads(), int(causal_offset)),
        float(scale), float(dropout_p), (int(seed) & (2**64 - 1)) if drop else 0)
    return res


# ============================================================================================ backward
# (owned by the backward kernel's author: attention_bwd / _attention_bwd go below this line)

def _grad_buffers(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, mask_needs_grad: bool):
    """(dq, dk, dv, dmask or None) for the backward kernels to fill. dmask is zero-filled (the kernel skips
    hidden tiles); its stride 0 on size-1 dims tells the kernel to sum over them."""
    dq = torch.empty(q.shape, dtype=q.dtype)
    dk = torch.empty(k.shape, dtype=k.dtype)
    dv = torch.empty(v.shape, dtype=v.dtype)
    dmask = None
    if mask_needs_grad:
        if mask is None or mask.dtype == torch.bool:
            raise ValueError("mask_needs_grad needs a float mask")
        dmask = torch.zeros(mask.shape, dtype=mask.dtype)
    return dq, dk, dv, dmask


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Tensor | None, *,
                  scale: float, is_causal: bool, dropout_p: float, seed: int, mask_needs_grad: bool,
                  out_lo: Tensor | None = None, causal_offset: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of :func:`attention_fwd`: (dq, dk, dv, dmask or None), contiguous, in the inputs' dtypes.

    dout and out (B, H, L, Ev), q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev) in any strides; lse (B, H, L)
    float32 from the forward (-inf rows get zero gradients). With ``mask_needs_grad`` (float masks only),
    dmask has the mask's 4-D shape and dtype, its size-1 dims summed over. ``out_lo`` (float16 / bfloat16):
    the forward's int16 residual code (``return_lo``); delta = rowsum(dout * O) then uses the fp32 output O,
    as dP does, instead of out. ``causal_offset``: the forward's (with ``is_causal``, key j is visible to query
    i iff j <= i + causal_offset); rows that see no key get dq = 0 and add nothing to dk / dv.
    Deterministic: bit-identical from run to run and for any thread count."""
    return _attention_bwd(module(), dout, q, k, v, out, lse, mask, scale=scale, is_causal=is_causal,
                          dropout_p=dropout_p, seed=seed, mask_needs_grad=mask_needs_grad, out_lo=out_lo,
                          causal_offset=causal_offset)


def _check_out_lo(out_lo: Tensor | None, out: Tensor) -> None:
    if out_lo is None:
        return
    if out_lo.shape != out.shape or out_lo.dtype != torch.int16 or out.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"out_lo must be int16 of out's shape {tuple(out.shape)} (float16 / bfloat16 out, got "
                         f"{out.dtype}), got {tuple(out_lo.shape)} {out_lo.dtype}")


def _attention_bwd(mod, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   mask: Tensor | None, *, scale: float, is_causal: bool, dropout_p: float, seed: int,
                   mask_needs_grad: bool, mode: int = 0, out_lo: Tensor | None = None,
                   causal_offset: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """attention_bwd with an explicit kernel module; ``mode`` (tests): 0 auto, 1 fused (a task per (b, kv
    head)), 2 split (tasks per key block and per query block). Every mode gives the same bits."""
    _check(q, k, v, mask)
    if dout.shape != out.shape or dout.dtype != q.dtype or out.dtype != q.dtype:
        raise ValueError(f"dout and out must be (B, H, L, Ev) = {tuple(out.shape)} in {q.dtype}, got dout "
                         f"{tuple(dout.shape)} {dout.dtype}, out {tuple(out.shape)} {out.dtype}")
    _check_out_lo(out_lo, out)
    if lse.dtype != torch.float32 or lse.shape != q.shape[:3]:
        raise ValueError(f"lse must be float32 {tuple(q.shape[:3])}, got {lse.dtype} {tuple(lse.shape)}")
    dq, dk, dv, dmask = _grad_buffers(q, k, v, mask, mask_needs_grad)
    if min(q.shape[0], q.shape[1], q.shape[2], k.shape[2], v.shape[3]) == 0:
        for g in (dq, dk, dv):
            g.zero_()
        return dq, dk, dv, dmask
    p = make_params(mod, q, k, v, mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p, seed=seed,
                    causal_offset=causal_offset)
    p.out, p.dout, p.lse = _t4(mod, out), _t4(mod, dout), _t4(mod, lse)
    if out_lo is not None:
        p.out_lo = _t4(mod, out_lo)
    p.dq, p.dk, p.dv = _t4(mod, dq), _t4(mod, dk), _t4(mod, dv)
    if dmask is not None:
        p.dmask = _t4(mod, dmask, broadcast=True)
        p.dmask_dtype = DTYPE_CODES[dmask.dtype]
    mod.bwd(p, mode)
    return dq, dk, dv, dmask


# ============================================================================================ varlen
# Packed (variable-length) batches: the same kernels, with Params.cu_q / cu_k set (csrc/common.h,
# item_params): q (total_q, H, E), k (total_k, Hk, E), v (total_k, Hk, Ev), int32 CPU cu_seqlens (B + 1),
# mask None or 4-D broadcastable to (B, H, max_seqlen_q, max_seqlen_k); lse (H, total_q) float32.

def _packed(mod, t: Tensor):
    """Tensor4 of a packed (total, H, D) tensor: row i of head h at i*stride(0) + h*stride(1) (sb unused)."""
    return mod.Tensor4(t.data_ptr(), 0, t.stride(1), t.stride(0), t.stride(2))


def _lse4(mod, lse: Tensor):
    """Tensor4 of an (H, total) float32 lse."""
    return mod.Tensor4(lse.data_ptr(), 0, lse.stride(0), lse.stride(1), 0)


def _varlen_params(mod, q, k, v, cu_q, cu_k, max_q, max_k, mask, *, scale, is_causal, dropout_p, seed):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"packed q, k, v must be 3-D (total, heads, dim), got {q.dim()}, {k.dim()}, {v.dim()} dims")
    _check(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask)
    for name, cu in (("cu_q", cu_q), ("cu_k", cu_k)):
        if cu.dtype != torch.int32 or cu.device.type != "cpu" or not cu.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int32 CPU tensor, got {cu.dtype} on {cu.device}")
    sizes = (cu_q.numel() - 1, q.shape[1], k.shape[1], int(max_q), int(max_k), q.shape[2], v.shape[2])
    p = make_params(mod, q, k, v, mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p, seed=seed,
                    sizes=sizes, t4=_packed)
    p.cu_q, p.cu_k = cu_q.data_ptr(), cu_k.data_ptr()
    return p


def varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
               mask: Tensor | None, *, scale: float, is_causal: bool, dropout_p: float, seed: int,
               return_lo: bool = False):
    """Packed forward: (out (total_q, H, Ev) in q's dtype, lse (H, total_q) float32), and out_lo (total_q, H,
    Ev) last with ``return_lo`` (float16 / bfloat16; see :func:`attention_fwd`)."""
    return _varlen_fwd(module(), q, k, v, cu_q, cu_k, max_q, max_k, mask, scale=scale, is_causal=is_causal,
                       dropout_p=dropout_p, seed=seed, return_lo=return_lo)


def _varlen_fwd(mod, q, k, v, cu_q, cu_k, max_q, max_k, mask, *, scale, is_causal, dropout_p, seed,
                return_lo: bool = False):
    total_q, H, _ = q.shape
    out = q.new_empty(total_q, H, v.shape[2])
    lse = q.new_empty(H, total_q, dtype=torch.float32)
    lo = _lo_like(out) if return_lo else None
    res = (out, lse) if lo is None else (out, lse, lo)
    if out.numel() == 0 and lse.numel() == 0:
        return res
    if k.shape[0] == 0 or max_k == 0 or v.shape[2] == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        if lo is not None:
            lo.zero_()
        return res
    p = _varlen_params(mod, q, k, v, cu_q, cu_k, max_q, max_k, mask, scale=scale, is_causal=is_causal,
                       dropout_p=dropout_p, seed=seed)
    p.out, p.lse = _packed(mod, out), _lse4(mod, lse)
    if lo is not None:
        p.out_lo = _packed(mod, lo)
    mod.fwd(p)
    return res


def varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor,
               cu_k: Tensor, max_q: int, max_k: int, mask: Tensor | None, *, scale: float, is_causal: bool,
               dropout_p: float, seed: int, mask_needs_grad: bool, out_lo: Tensor | None = None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of :func:`varlen_fwd`: (dq, dk, dv, dmask or None), contiguous, deterministic. ``out_lo``:
    as for :func:`attention_bwd`."""
    return _varlen_bwd(module(), dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, mask, scale=scale,
                       is_causal=is_causal, dropout_p=dropout_p, seed=seed, mask_needs_grad=mask_needs_grad,
                       out_lo=out_lo)


def _varlen_bwd(mod, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, mask, *, scale, is_causal, dropout_p,
                seed, mask_needs_grad, mode: int = 0, out_lo: Tensor | None = None):
    if dout.shape != out.shape or dout.dtype != q.dtype or out.dtype != q.dtype:
        raise ValueError(f"dout and out must be (total_q, H, Ev) = {tuple(out.shape)} in {q.dtype}, got dout "
                         f"{tuple(dout.shape)} {dout.dtype}, out {tuple(out.shape)} {out.dtype}")
    _check_out_lo(out_lo, out)
    if lse.dtype != torch.float32 or tuple(lse.shape) != (q.shape[1], q.shape[0]):
        raise ValueError(f"lse must be float32 {(q.shape[1], q.shape[0])}, got {lse.dtype} {tuple(lse.shape)}")
    dq, dk, dv, dmask = _grad_buffers(q, k, v, mask, mask_needs_grad)
    if min(q.shape[0], k.shape[0], max_q, max_k, v.shape[2]) == 0:
        for g in (dq, dk, dv):
            g.zero_()
        return dq, dk, dv, dmask
    p = _varlen_params(mod, q, k, v, cu_q, cu_k, max_q, max_k, mask, scale=scale, is_causal=is_causal,
                       dropout_p=dropout_p, seed=seed)
    p.out, p.dout, p.lse = _packed(mod, out), _packed(mod, dout), _lse4(mod, lse)
    if out_lo is not None:
        p.out_lo = _packed(mod, out_lo)
    p.dq, p.dk, p.dv = _packed(mod, dq), _packed(mod, dk), _packed(mod, dv)
    if dmask is not None:
        p.dmask = _t4(mod, dmask, broadcast=True)
        p.dmask_dtype = DTYPE_CODES[dmask.dtype]
    mod.bwd(p, mode)
    return dq, dk, dv, dmask
