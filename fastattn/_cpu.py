"""CPU launcher of every op family: picks the C++ kernel module for this CPU, allocates outputs, passes pointers
and strides. The only place on the Python side that allocates the CPU kernels' outputs.

The kernels (csrc/) are built once per instruction set: ``fastattn._C_avx512``, ``_C_avx2`` and
``_C_portable``. :func:`module` imports the widest one that is built and that the running CPU supports
(``fastattn._C.cpu_features()``); ``FASTATTN_ISA=portable|avx2|avx512`` forces one.

Tensors are read in place through their strides (no ``.contiguous()`` copies): each one travels as a
``Tensor4`` (address, strides in elements). Shape legend: B batch, H query heads, Hk key/value heads,
L query length, S key length, E head dim, Ev value head dim.

Each op family's launchers follow one contract on both devices (fastattn/_launchers.py): ``attention_fwd`` /
``attention_bwd`` and ``varlen_fwd`` / ``varlen_bwd``, ``additive_fwd`` / ``additive_bwd``, ``hard_fwd`` /
``hard_bwd``. Each has an ``_``-prefixed twin that takes the kernel module first (tests run every ISA).
The arguments arrive checked (fastattn/_validation.py); :func:`_check_kernel_inputs` only guards what would
make the kernel read memory wrongly.
"""
from __future__ import annotations

import enum
import functools
import importlib
import math
import os

import torch
from torch import Tensor

from fastattn import _philox
from fastattn._ops.attention import empty_output
from fastattn._validation import check_decode_launch, check_launch_sinks, check_launch_window_softcap

ISAS = ("avx512", "avx2", "portable")

# Element dtype codes of csrc/dtype.h (enum DType).
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
    mod.eager_init(Tensor, by_code, (torch.int32, torch.int64), torch.strided,
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


class BwdMode(enum.IntEnum):
    """How the backward kernel schedules its dQ / dK / dV passes (csrc/backward.cpp, ``Mode``). Every mode gives
    the same bits; tests force each one."""
    AUTO = 0   # the kernel picks
    FUSED = 1  # one task per (batch item, key/value head)
    SPLIT = 2  # tasks per key block, then per query block


def _check_kernel_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    """What the kernels read by dtype code and rank: 4-D q, k, v of one float dtype, a bool / float32 / q-dtype
    mask."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, L, E), got {q.dim()}, {k.dim()}, {v.dim()} dims")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"unsupported dtype {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if mask is not None and mask.dtype not in (torch.bool, torch.float32, q.dtype):
        raise TypeError(f"mask must be bool, float32 or {q.dtype}, got {mask.dtype}")


# ============================================================================================ outputs
def _lo_like(out: Tensor) -> Tensor:
    """An int16 out_lo buffer laid out as out (the return_lo forwards' third output)."""
    if out.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"return_lo needs float16 or bfloat16 inputs, got {out.dtype}")
    return torch.empty_like(out, dtype=torch.int16)  # out is dense: its strides are kept


def _forward_outputs(out: Tensor, lse: Tensor, return_lo: bool, has_keys: bool) -> tuple[tuple, bool]:
    """(res, run): the forward's result (out, lse) or (out, lse, out_lo) around the given buffers, and whether
    the kernel has anything to compute. Without keys (S == 0) or value dims (Ev == 0) every row sees nothing:
    out = 0, lse = -inf (and out_lo = 0), as the kernel gives fully masked rows."""
    res = (out, lse, _lo_like(out)) if return_lo else (out, lse)
    if out.numel() == 0 and lse.numel() == 0:
        return res, False
    if not has_keys:
        out.zero_()
        lse.fill_(float("-inf"))
        if return_lo:
            res[2].zero_()
        return res, False
    return res, True


def _grad_buffers(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, mask_needs_grad: bool = False):
    """(dq, dk, dv, dmask or None) for the backward kernels to fill, contiguous. dmask is zero-filled (the kernel
    skips hidden tiles); its stride 0 on size-1 dims tells the kernel to sum over them."""
    dq = torch.empty(q.shape, dtype=q.dtype)
    dk = torch.empty(k.shape, dtype=k.dtype)
    dv = torch.empty(v.shape, dtype=v.dtype)
    dmask = None
    if mask_needs_grad:
        if mask is None or mask.dtype == torch.bool:
            raise ValueError("mask_needs_grad needs a float mask")
        dmask = torch.zeros(mask.shape, dtype=mask.dtype)
    return dq, dk, dv, dmask


def _zero(*ts: Tensor) -> None:
    """Gradients of a call with nothing to compute."""
    for t in ts:
        t.zero_()


def _check_out_lo(out_lo: Tensor | None, out: Tensor) -> None:
    if out_lo is None:
        return
    if out_lo.shape != out.shape or out_lo.dtype != torch.int16 or out.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"out_lo must be int16 of out's shape {tuple(out.shape)} (float16 / bfloat16 out, got "
                         f"{out.dtype}), got {tuple(out_lo.shape)} {out_lo.dtype}")


# ============================================================================================ attention
def _variants_set(window: tuple[int, int], softcap: float, alibi_slopes: Tensor | None,
                  sinks: Tensor | None) -> bool:
    return tuple(window) != (-1, -1) or softcap != 0.0 or alibi_slopes is not None or sinks is not None


def _set_variants(p, q: Tensor, window: tuple[int, int], softcap: float, alibi_slopes: Tensor | None,
                  sinks: Tensor | None = None) -> None:
    """Fills the decoder variants' Params fields (csrc/params.h), checking what the kernels read: window two ints
    >= -1, softcap >= 0, alibi_slopes float32 (B, H) on q's device in any strides, sinks float32 contiguous (H,)."""
    B, H = q.shape[0], q.shape[1]
    left, right, softcap = check_launch_window_softcap(window, softcap)
    p.window_left, p.window_right, p.softcap = left, right, float(softcap)
    if alibi_slopes is not None:
        if alibi_slopes.dtype != torch.float32 or tuple(alibi_slopes.shape) != (B, H) or \
                alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes must be float32 ({B}, {H}) on {q.device}, got {alibi_slopes.dtype} "
                             f"{tuple(alibi_slopes.shape)} on {alibi_slopes.device}")
        p.alibi = alibi_slopes.data_ptr()
        p.alibi_sb, p.alibi_sh = alibi_slopes.stride()
    check_launch_sinks(sinks, q, H)
    if sinks is not None:
        p.sinks = sinks.data_ptr()


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float, is_causal: bool,
                  dropout_p: float, seed: int, return_lo: bool = False, causal_offset: int = 0,
                  window: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                  sinks: Tensor | None = None):
    """(out, lse): out (B, H, L, Ev) in q's dtype (laid out by ``fastattn._ops.empty_output``), lse (B, H, L) float32.
    ``return_lo`` (float16 / bfloat16, for training): (out, lse, out_lo), out_lo int16 laid out as out: the
    rounding residual of the fp32 result O in units of out's exponent (csrc/out_lo.h, encode_lo), from which
    :func:`attention_bwd` reads O back to ~2^-23 relative for its delta = rowsum(dout * O).
    ``causal_offset`` (with ``is_causal``): key j is visible to query i iff j <= i + causal_offset; 0 (the
    default) is top-left alignment (torch's ``is_causal``), S - L lower-right (torch's ``causal_lower_right``).
    Any int: rows that see no key (i + causal_offset < 0) give out = 0 and lse = -inf, as fully masked rows do.

    The decoder variants (``fastattn.reference.scaled_dot_product_attention`` states them; query row i sits at
    i' = i + causal_offset, causal or not): ``window`` (left, right), -1 = unbounded side: key j visible only if
    i' - left <= j <= i' + right; ``softcap`` > 0: s = softcap * tanh(s / softcap); ``alibi_slopes`` float32
    (B, H), any strides: s += slope * (j - i'); ``sinks`` float32 (H,): exp(sink) joins the softmax denominator
    and the lse (a row with no visible key then has lse = sink)."""
    return _attention_fwd(module(), q, k, v, mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
                          seed=seed, return_lo=return_lo, causal_offset=causal_offset, window=window,
                          softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)


def _attention_fwd(mod, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float, is_causal: bool,
                   dropout_p: float, seed: int, return_lo: bool = False, causal_offset: int = 0,
                   window: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                   sinks: Tensor | None = None):
    """attention_fwd with an explicit kernel module. The tensors travel as (address, strides) tuples
    (``fwd_views``): no Params object is built on this per-call path (calls with a variant build one)."""
    _check_kernel_inputs(q, k, v, mask)
    B, H, L, _ = q.shape
    S, Ev = k.shape[2], v.shape[3]
    variants = _variants_set(window, softcap, alibi_slopes, sinks)
    res, run = _forward_outputs(empty_output(q, v, dropout_p), q.new_empty(B, H, L, dtype=torch.float32),
                                return_lo, S != 0 and Ev != 0)
    if variants:
        p = make_params(mod, q, k, v, mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p, seed=seed,
                        causal_offset=causal_offset)
        _set_variants(p, q, window, softcap, alibi_slopes, sinks)
        if not run:
            if sinks is not None and S == 0 and res[1].numel() > 0:  # no key at all: lse = the sink
                res[1].copy_(sinks.view(1, H, 1).expand(B, H, L))
            return res
        out, lse = res[0], res[1]
        p.out, p.lse = _t4(mod, out), _t4(mod, lse)
        if return_lo:
            p.out_lo = _t4(mod, res[2])
        mod.fwd_params(p)
        return res
    if not run:
        return res
    out, lse = res[0], res[1]
    lo = res[2] if return_lo else None
    if mask is None:
        m5, mdt = _NO_TENSOR, 0
    else:
        m5 = (mask.data_ptr(), *(0 if n == 1 else st for n, st in zip(mask.shape, mask.stride())))
        mdt = DTYPE_CODES[mask.dtype]
    drop = dropout_p > 0.0
    mod.fwd_views(
        (q.data_ptr(), *q.stride()), (k.data_ptr(), *k.stride()), (v.data_ptr(), *v.stride()), m5,
        (out.data_ptr(), *out.stride()), _NO_TENSOR if lo is None else (lo.data_ptr(), *lo.stride()),
        (lse.data_ptr(), *lse.stride(), 0),
        (DTYPE_CODES[q.dtype], mdt, B, H, k.shape[1], L, S, q.shape[3], Ev, int(is_causal),
         _philox.threshold(dropout_p) if drop else 0, torch.get_num_threads(), int(causal_offset)),
        float(scale), float(dropout_p), (int(seed) & (2**64 - 1)) if drop else 0)
    return res


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Tensor | None, *,
                  scale: float, is_causal: bool, dropout_p: float, seed: int, mask_needs_grad: bool,
                  out_lo: Tensor | None = None, causal_offset: int = 0, window: tuple[int, int] = (-1, -1),
                  softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                  sinks: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of :func:`attention_fwd`: (dq, dk, dv, dmask or None), contiguous, in the inputs' dtypes.

    dout and out (B, H, L, Ev), q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev) in any strides; lse (B, H, L)
    float32 from the forward (-inf rows get zero gradients). With ``mask_needs_grad`` (float masks only),
    dmask has the mask's 4-D shape and dtype, its size-1 dims summed over. ``out_lo`` (float16 / bfloat16):
    the forward's int16 residual code (``return_lo``); delta = rowsum(dout * O) then uses the fp32 output O,
    as dP does, instead of out. ``causal_offset``: the forward's (with ``is_causal``, key j is visible to query
    i iff j <= i + causal_offset); rows that see no key get dq = 0 and add nothing to dk / dv.
    Deterministic: bit-identical from run to run and for any thread count.

    ``window``, ``softcap``, ``alibi_slopes``: the forward's (see :func:`attention_fwd`). With a soft-cap the mask
    gradient is dS itself (the mask is added after the cap) and dq / dk use dS * (1 - tanh^2). The forward's
    sinks need not be passed: its lse holds them, so P = exp(s - lse) is already the sink softmax (the sinks'
    own gradient, -sum exp(sink - lse) * delta, is the caller's). ``sinks`` (optional) only sharpens float64,
    whose backward recomputes the lse in double: without it, float64 rows whose recomputed lse falls short of the
    forward's (a sink) use the forward's float32 lse."""
    return _attention_bwd(module(), dout, q, k, v, out, lse, mask, scale=scale, is_causal=is_causal,
                          dropout_p=dropout_p, seed=seed, mask_needs_grad=mask_needs_grad, out_lo=out_lo,
                          causal_offset=causal_offset, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                          sinks=sinks)


def _attention_bwd(mod, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   mask: Tensor | None, *, scale: float, is_causal: bool, dropout_p: float, seed: int,
                   mask_needs_grad: bool, mode: BwdMode = BwdMode.AUTO, out_lo: Tensor | None = None,
                   causal_offset: int = 0, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                   alibi_slopes: Tensor | None = None,
                   sinks: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """attention_bwd with an explicit kernel module and schedule (``mode``)."""
    _check_kernel_inputs(q, k, v, mask)
    if dout.shape != out.shape or dout.dtype != q.dtype or out.dtype != q.dtype:
        raise ValueError(f"dout and out must be (B, H, L, Ev) = {tuple(out.shape)} in {q.dtype}, got dout "
                         f"{tuple(dout.shape)} {dout.dtype}, out {tuple(out.shape)} {out.dtype}")
    _check_out_lo(out_lo, out)
    if lse.dtype != torch.float32 or lse.shape != q.shape[:3]:
        raise ValueError(f"lse must be float32 {tuple(q.shape[:3])}, got {lse.dtype} {tuple(lse.shape)}")
    dq, dk, dv, dmask = _grad_buffers(q, k, v, mask, mask_needs_grad)
    if min(q.shape[0], q.shape[1], q.shape[2], k.shape[2], v.shape[3]) == 0:
        _zero(dq, dk, dv)
        return dq, dk, dv, dmask
    p = make_params(mod, q, k, v, mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p, seed=seed,
                    causal_offset=causal_offset)
    if _variants_set(window, softcap, alibi_slopes, sinks):
        _set_variants(p, q, window, softcap, alibi_slopes, sinks)
    return _launch_bwd(mod, p, _t4, _t4(mod, lse), out, dout, out_lo, dq, dk, dv, dmask, mode)


def _launch_bwd(mod, p, t4, lse4, out: Tensor, dout: Tensor, out_lo: Tensor | None, dq: Tensor, dk: Tensor, dv: Tensor,
                dmask: Tensor | None, mode: BwdMode) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Sets the backward's tensors on ``p`` (``t4`` wraps the (B, H, L, *) or packed ones, ``lse4`` is the
    wrapped lse; the mask gradient is always 4-D) and runs the kernel: (dq, dk, dv, dmask)."""
    p.out, p.dout, p.lse = t4(mod, out), t4(mod, dout), lse4
    if out_lo is not None:
        p.out_lo = t4(mod, out_lo)
    p.dq, p.dk, p.dv = t4(mod, dq), t4(mod, dk), t4(mod, dv)
    if dmask is not None:
        p.dmask = _t4(mod, dmask, broadcast=True)
        p.dmask_dtype = DTYPE_CODES[dmask.dtype]
    mod.bwd(p, int(mode))
    return dq, dk, dv, dmask


# ============================================================================================ varlen
# Packed (variable-length) batches: the same kernels, with Params.cu_q / cu_k set (csrc/params.h,
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
    _check_kernel_inputs(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask)
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
    res, run = _forward_outputs(q.new_empty(total_q, H, v.shape[2]), q.new_empty(H, total_q, dtype=torch.float32),
                                return_lo, k.shape[0] != 0 and max_k != 0 and v.shape[2] != 0)
    if not run:
        return res
    p = _varlen_params(mod, q, k, v, cu_q, cu_k, max_q, max_k, mask, scale=scale, is_causal=is_causal,
                       dropout_p=dropout_p, seed=seed)
    p.out, p.lse = _packed(mod, res[0]), _lse4(mod, res[1])
    if return_lo:
        p.out_lo = _packed(mod, res[2])
    mod.fwd_params(p)
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
                seed, mask_needs_grad, mode: BwdMode = BwdMode.AUTO, out_lo: Tensor | None = None):
    if dout.shape != out.shape or dout.dtype != q.dtype or out.dtype != q.dtype:
        raise ValueError(f"dout and out must be (total_q, H, Ev) = {tuple(out.shape)} in {q.dtype}, got dout "
                         f"{tuple(dout.shape)} {dout.dtype}, out {tuple(out.shape)} {out.dtype}")
    _check_out_lo(out_lo, out)
    if lse.dtype != torch.float32 or tuple(lse.shape) != (q.shape[1], q.shape[0]):
        raise ValueError(f"lse must be float32 {(q.shape[1], q.shape[0])}, got {lse.dtype} {tuple(lse.shape)}")
    dq, dk, dv, dmask = _grad_buffers(q, k, v, mask, mask_needs_grad)
    if min(q.shape[0], k.shape[0], max_q, max_k, v.shape[2]) == 0:
        _zero(dq, dk, dv)
        return dq, dk, dv, dmask
    p = _varlen_params(mod, q, k, v, cu_q, cu_k, max_q, max_k, mask, scale=scale, is_causal=is_causal,
                       dropout_p=dropout_p, seed=seed)
    return _launch_bwd(mod, p, _packed, _lse4(mod, lse), out, dout, out_lo, dq, dk, dv, dmask, mode)


# ============================================================================================ additive
# q (B, H, L, D), k (B, H, S, D), v (B, H, S, Ev) in any strides, weight (H, D); no scale (csrc/additive.cpp).

def _kernel_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The kernels compute in float32 (float64 for float64 inputs) and read a contiguous (H, D) weight."""
    return weight.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).contiguous()


def additive_fwd(q: Tensor, k: Tensor, v: Tensor, weight: Tensor, mask: Tensor | None,
                 is_causal: bool) -> tuple[Tensor, Tensor]:
    """(out, lse): out (B, H, L, Ev) (memory (B, L, H, Ev)) in q's dtype, lse (B, H, L) float32."""
    return _additive_fwd(module(), q, k, v, weight, mask, is_causal)


def _additive_fwd(mod, q: Tensor, k: Tensor, v: Tensor, weight: Tensor, mask: Tensor | None,
                  is_causal: bool) -> tuple[Tensor, Tensor]:
    _check_kernel_inputs(q, k, v, mask)
    B, H, L, _ = q.shape
    S, Ev = k.shape[2], v.shape[3]
    res, run = _forward_outputs(q.new_empty(B, L, H, Ev).transpose(1, 2), q.new_empty(B, H, L, dtype=torch.float32),
                                False, S != 0 and Ev != 0)
    if not run:
        return res
    p = make_params(mod, q, k, v, mask, scale=1.0, is_causal=is_causal, dropout_p=0.0, seed=0)
    p.out, p.lse = _t4(mod, res[0]), _t4(mod, res[1])
    w = _kernel_weight(weight, q.dtype)  # kept alive while the kernel reads it
    mod.additive_fwd(p, w.data_ptr())
    return res


def additive_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, weight: Tensor, out: Tensor, lse: Tensor,
                 mask: Tensor | None, is_causal: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dweight), contiguous, in the inputs' dtypes. Deterministic (no shared accumulators; dweight
    summed from per-row partials in a fixed order)."""
    return _additive_bwd(module(), dout, q, k, v, weight, out, lse, mask, is_causal)


def _additive_bwd(mod, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, weight: Tensor, out: Tensor, lse: Tensor,
                  mask: Tensor | None, is_causal: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_kernel_inputs(q, k, v, mask)
    dq, dk, dv, _ = _grad_buffers(q, k, v)
    if min(q.shape[0], q.shape[1], q.shape[2], k.shape[2], v.shape[3]) == 0:
        _zero(dq, dk, dv)
        return dq, dk, dv, torch.zeros_like(weight)
    p = make_params(mod, q, k, v, mask, scale=1.0, is_causal=is_causal, dropout_p=0.0, seed=0)
    p.out, p.dout, p.lse = _t4(mod, out), _t4(mod, dout), _t4(mod, lse)
    p.dq, p.dk, p.dv = _t4(mod, dq), _t4(mod, dk), _t4(mod, dv)
    w = _kernel_weight(weight, q.dtype)
    dw = torch.empty_like(w)
    mod.additive_bwd(p, w.data_ptr(), dw.data_ptr())
    return dq, dk, dv, dw.to(weight.dtype)


# ============================================================================================ hard
# idx (B, H, L, K) int32 (-1 unused), prob and ds (B, H, L, K) in hard_prob_dtype, contiguous (csrc/hard.cpp).

def hard_prob_dtype(dtype: torch.dtype) -> torch.dtype:
    """Saved probabilities / ds of the C++ hard kernel: its accumulator type (float64 only for float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def hard_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float, is_causal: bool, top_k: int):
    """(out (B, H, L, Ev) (memory (B, L, H, Ev)), idx, prob): the top_k best visible keys of each row."""
    return _hard_fwd(module(), q, k, v, mask, scale=scale, is_causal=is_causal, top_k=top_k)


def _hard_fwd(mod, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float, is_causal: bool,
              top_k: int):
    B, H, L, _ = q.shape
    Ev = v.shape[3]
    out = q.new_empty(B, L, H, Ev).transpose(1, 2)
    idx = torch.empty(B, H, L, top_k, dtype=torch.int32)
    prob = torch.empty(B, H, L, top_k, dtype=hard_prob_dtype(q.dtype))
    if B * H * L == 0:
        return out, idx, prob
    hp = mod.HardParams()
    p = make_params(mod, q, k, v, mask, scale=scale, is_causal=is_causal, dropout_p=0.0, seed=0)
    p.out = _t4(mod, out)
    hp.base = p
    hp.idx, hp.prob = _t4(mod, idx), _t4(mod, prob)
    hp.top_k = top_k
    mod.hard_fwd(hp)
    return out, idx, prob


def hard_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, prob: Tensor, *, scale: float, top_k: int,
             is_causal: bool = False):
    """(dq, dk, dv, ds), contiguous. ``is_causal`` is not needed: the saved selection already respects it."""
    return _hard_bwd(module(), dout, q, k, v, idx, prob, scale=scale, top_k=top_k)


def _hard_bwd(mod, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, prob: Tensor, *, scale: float,
              top_k: int, is_causal: bool = False):
    dq, dk, dv, _ = _grad_buffers(q, k, v)
    ds = torch.empty(idx.shape, dtype=prob.dtype)
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:
        _zero(dq, dk, dv, ds)
        return dq, dk, dv, ds
    idx, prob = idx.contiguous(), prob.contiguous()
    hp = mod.HardParams()
    p = make_params(mod, q, k, v, None, scale=scale, is_causal=False, dropout_p=0.0, seed=0)
    p.dout = _t4(mod, dout)
    p.dq, p.dk, p.dv = _t4(mod, dq), _t4(mod, dk), _t4(mod, dv)
    hp.base = p
    hp.idx, hp.prob, hp.ds = _t4(mod, idx), _t4(mod, prob), _t4(mod, ds)
    hp.top_k = top_k
    mod.hard_bwd(hp)
    return dq, dk, dv, ds


# ============================================================================================ decode
def decode_num_splits(items: int, keys: int, threads: int, *, heads: int = 1) -> int:
    """Key splits for ``items`` work items of ``heads`` kv heads each over at most ``keys`` keys on ``threads``
    threads: none while the items give every thread ~4 to take (dynamic scheduling evens out the rest), else
    enough splits for that, each reading at least 1024 key rows (keys x heads), at most 64. The kernel module's
    rule (csrc/decode.h), which the eager route (csrc/eager.cpp) uses too."""
    return module().decode_num_splits(items, keys, heads, threads)


def decode_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
               block_table: Tensor | None = None, mask: Tensor | None = None, scale: float | None = None,
               causal: bool = True, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
               sinks: Tensor | None = None, alibi_slopes: Tensor | None = None, num_splits: int | None = None,
               out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Attention of the new query rows q (B, L, H, E) to each sequence's KV cache: the decode launcher contract
    (kernels/decode.py's module doc states it; the math is fastattn/reference/decode.py's). Returns out
    (B, L, H, Ev) in q's dtype (``out`` if given, any strides) and lse (B, H, L) float32 (natural log).
    ``num_splits`` None: :func:`decode_num_splits` from the work items (b x kv heads, or b with all its kv heads
    when the cache stores a key's kv heads side by side), the cache capacity and the threads."""
    return _decode_fwd(module(), q, k_cache, v_cache, cache_seqlens, block_table=block_table, mask=mask,
                       scale=scale, causal=causal, window=window, softcap=softcap, sinks=sinks,
                       alibi_slopes=alibi_slopes, num_splits=num_splits, out=out)


def _decode_fwd(mod, q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                block_table: Tensor | None = None, mask: Tensor | None = None, scale: float | None = None,
                causal: bool = True, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                sinks: Tensor | None = None, alibi_slopes: Tensor | None = None, num_splits: int | None = None,
                out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """decode_fwd with an explicit kernel module. Every tensor is read in place through its strides; the
    (B, L, H, *) tensors travel as Tensor4 (b, h, i, e), the caches as (batch or page, kv head, slot, e)."""
    check_decode_launch(q, k_cache, v_cache, cache_seqlens, block_table, mask, window, softcap, sinks, alibi_slopes,
                        num_splits, out, cpu=True)
    B, L, H, E = q.shape
    Hk, Ev = k_cache.shape[2], v_cache.shape[3]
    if out is None:
        out = q.new_empty(B, L, H, Ev)
    lse = torch.empty(B, H, L, dtype=torch.float32)
    if B * H * L == 0:
        return out, lse

    def bhie(t: Tensor, broadcast: bool = False):  # a (B, L, H, X) / (B, S, Hk, X) tensor as (b, h, i, e)
        st = [0 if broadcast and n == 1 else s for n, s in zip(t.shape, t.stride())]
        return mod.Tensor4(t.data_ptr(), st[0], st[2], st[1], st[3])

    p = mod.DecodeParams()
    p.q, p.k, p.v, p.out = bhie(q), bhie(k_cache), bhie(v_cache), bhie(out)
    p.lse = mod.Tensor4(lse.data_ptr(), *lse.stride(), 0)
    p.dtype = DTYPE_CODES[q.dtype]
    if mask is not None:
        p.mask = _t4(mod, mask, broadcast=True)
        p.mask_dtype = DTYPE_CODES.get(mask.dtype, 0)
        if p.mask_dtype == 0:  # another float dtype: read as float32
            mask = mask.float()
            p.mask, p.mask_dtype = _t4(mod, mask, broadcast=True), DTYPE_CODES[torch.float32]
    p.B, p.H, p.Hk, p.L, p.E, p.Ev = B, H, Hk, L, E, Ev
    seqlens = cache_seqlens.contiguous()
    p.seqlens = seqlens.data_ptr()
    if block_table is not None:
        p.block_table = block_table.data_ptr()
        p.table_sb, p.table_sj = block_table.stride()
        p.page_size = k_cache.shape[1]
    capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(torch.float32)
        p.alibi = alibi_slopes.data_ptr()
        p.alibi_sb = alibi_slopes.stride(0) if alibi_slopes.dim() == 2 else 0
        p.alibi_sh = alibi_slopes.stride(-1)
    if sinks is not None:
        sinks = sinks.to(torch.float32).contiguous()
        p.sinks = sinks.data_ptr()
    # E = 0: every dot product is 0, whatever the scale.
    p.scale = (1.0 / math.sqrt(E) if E else 1.0) if scale is None else float(scale)
    p.softcap = float(softcap)
    p.causal = bool(causal)
    p.window_left, p.window_right = int(window[0]), int(window[1])
    p.num_threads = torch.get_num_threads()
    if num_splits is None:
        keys = min(capacity, window[0] + L) if window[0] >= 0 else capacity
        num_splits = mod.decode_auto_splits(p, keys)
    p.num_splits = int(num_splits)
    mod.decode_fwd(p)
    return out, lse
