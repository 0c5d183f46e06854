"""Fused attention in Triton: the launchers (the op-facing surface), their launch plans and the autotuner.

Shape legend: B batch, H query heads, Hk key/value heads (H % Hk == 0, GQA group G = H // Hk),
L query length, S key length, E query/key head dim, Ev value head dim (both 1..256, any value).

Where things are (kernels/):

* ``configs.py``        every tile configuration (``CONFIGS``, ``INTERPRETER_CONFIGS``, head / length buckets);
* ``attention_fwd.py``  the forward kernel (tiled online softmax);
* ``attention_bwd.py``  the flash-attention-2 backward kernels (preprocess, dK/dV, dQ, broadcast dmask);
* ``_masking.py``, ``_dropout.py``, ``_tile.py``: the masks (and the score tile), Philox dropout, and the
  shared @triton.jit helpers; ``_host.py``: the launchers' shared host code;
* this file: the launch plan of a call (``_fwd_plan`` / ``_bwd_plan``), autotuning and the launchers.

Launcher contract (shared with the C++ CPU kernels, see fastattn/_cpu.py):

    attention_fwd(q, k, v, mask, *, scale, is_causal, dropout_p, seed, return_lo=False, causal_offset=0,
                  window=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None)
        -> (out, lse), or (out, lse, out_lo) with return_lo
    attention_bwd(dout, q, k, v, out, lse, mask, *, scale, is_causal, dropout_p, seed,
                  mask_needs_grad, out_lo=None, causal_offset=0, window=(-1, -1), softcap=0.0,
                  alibi_slopes=None, sinks=None) -> (dq, dk, dv, dmask | None)

q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev) in any strides (read in place). mask: None or 4-D
with every dim full or 1 (size-1 dims broadcast through stride 0); bool (True = attend) or float
(added to the scaled scores, -inf hides). ``is_causal``: key j visible to query i iff j <= i + causal_offset
(0: top-left, torch's ``is_causal``; S - L: lower-right, torch's ``causal_lower_right``; any int, negative
too). The offset is a runtime argument of the kernels (one compiled kernel serves every offset); every causal
bound is ``offs_m + causal_offset``: a query block [m, m + BLOCK_M) sees keys [0, m + BLOCK_M + offset),
a key block [n, n + BLOCK_N) is seen by queries [n - offset, L). A block whose key range is empty (rows with
i + offset < 0) runs its loop zero times and stores out = 0, lse = -inf, dq = 0 like any row with no key.
out (B, H, L, Ev) in q's dtype, laid out by ``fastattn._ops.empty_output`` (as torch lays out its own); lse (B, H, L)
float32, natural log, -inf (and out = 0) for rows that see no key. out_lo (fp16 / bf16 training): int16,
laid out as out, the rounding residual of the fp32 result O in units of out's exponent,
round((O - out) * 2^(K - e)) (K = 22 bf16, 25 fp16; csrc/out_lo.h ``encode_lo`` explains it); the backward
reads O back from it. ``varlen_fwd`` / ``varlen_bwd`` run the same kernels on packed (variable-length) batches.

The decoder variants (sliding window, logit soft-capping, ALiBi, attention sinks; their math in
``fastattn.reference.scaled_dot_product_attention`` and kernels/_variants.py) are constexpr switches of the
kernels: a call without them passes None for their arguments and runs the plain kernels. They read query
positions i + causal_offset whether or not ``is_causal`` (so the offset is then passed unclamped). Key blocks
wholly outside the window are skipped like those past the causal diagonal. The varlen launchers take none.

Dropout uses counter-based Philox4x32-10 (kernels/_dropout.py; fastattn/_philox.py is the spec); the backward
regenerates the same bits.

The autotuner times the ``CONFIGS`` rows allowed for the call's features (dropout / float mask or not) and
caches the choice per head-dim bucket, dtype, length bucket and feature set. Under TRITON_INTERPRET=1 the
kernels run on CPU tensors with ``INTERPRETER_CONFIGS`` and no autotuning. ``kernels/aot.py`` compiles every
row for sm_80 / sm_90 and checks registers, spills, shared memory and tensor-core use.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import triton

from fastattn._ops import empty_output
from fastattn._validation import check_launch_sinks, check_launch_window_softcap

from ._host import dot_precision, import_in_current_mode, is_interpreted, named_strides

# Reloading this module after TRITON_INTERPRET changed re-decorates the kernels in the new mode.
import_in_current_mode(__package__, ("_tile", "_variants", "_masking", "_dropout", "attention_fwd", "attention_bwd"))

from ._dropout import dropout_args  # noqa: E402
from ._masking import FLOAT_MASK, kv_range_of, mask_args, mask_strides  # noqa: E402
from .attention_bwd import _attn_bwd_dkdv, _attn_bwd_dmask, _attn_bwd_dq, _attn_bwd_preprocess  # noqa: E402
from .attention_fwd import _attn_fwd  # noqa: E402
from .configs import (  # noqa: E402,F401 - the config table is read through this module (aot.py, tests)
    CONFIGS, HEAD_BUCKETS, INTERPRETER_CONFIGS, TileConfig, dtype_class, head_bucket, len_bucket, pad_dim)

__all__ = ["attention_fwd", "attention_bwd", "varlen_fwd", "varlen_bwd", "CONFIGS", "INTERPRETER_CONFIGS",
           "TileConfig", "KERNELS", "HEAD_BUCKETS", "head_bucket", "len_bucket", "candidate_configs"]

_kv_range_of = kv_range_of  # the name tests/test_triton.py reads the key range of a padding mask by


# ----------------------------------------------------------------------------------------------------
# Autotuning (compiled GPU code only)
# ----------------------------------------------------------------------------------------------------
# kernel name -> jit function; CONFIGS has the same keys, and the AOT report (kernels/aot.py) walks both.
KERNELS = {
    "fwd": _attn_fwd,
    "bwd_preprocess": _attn_bwd_preprocess,
    "bwd_dkdv": _attn_bwd_dkdv,
    "bwd_dq": _attn_bwd_dq,
    "bwd_dmask": _attn_bwd_dmask,
}


def _triton_config(c: TileConfig) -> triton.Config:
    return triton.Config(c.kwargs(), num_warps=c.num_warps, num_stages=c.num_stages)


def _heavy(name: str, args: dict) -> bool:
    """Dropout or a float mask (the dmask kernel always has one): these restrict a kernel to its
    "all" config rows."""
    return name == "bwd_dmask" or bool(args.get("DROPOUT")) or args.get("MASK_KIND") == FLOAT_MASK


def _decoder(args: dict) -> bool:
    """Any decoder variant on (the rows marked decoder=False are then left out)."""
    return any(bool(args.get(k)) for k in ("WINDOW", "SOFTCAP", "ALIBI", "SINKS"))


def candidate_configs(name: str, head: int, dtype: torch.dtype, heavy: bool, decoder: bool = False) -> list[TileConfig]:
    """The CONFIGS rows the autotuner may pick for kernel ``name`` with these features (``decoder``: a decoder
    variant is on)."""
    rows = CONFIGS[name][(head, dtype_class(dtype))]
    return [c for c in rows if (c.features == "all" or not heavy) and (c.decoder or not decoder)]


def _make_tuned(name: str):
    fn = KERNELS[name]
    unique = list(dict.fromkeys(c for rows in CONFIGS[name].values() for c in rows))
    by_tile = {c: _triton_config(c) for c in unique}

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        dtype = args["Q"].dtype if "Q" in args else args["Out"].dtype
        return [by_tile[c] for c in candidate_configs(name, args["TUNE_HEAD"], dtype, _heavy(name, args),
                                                      _decoder(args))]

    key = [k for k in ("TUNE_HEAD", "TUNE_LEN", "IS_CAUSAL", "MASK_KIND", "DROPOUT", "VARLEN", "WINDOW", "SOFTCAP",
                       "ALIBI", "SINKS") if k in fn.arg_names]
    return triton.autotune(list(by_tile.values()), key=key, prune_configs_by={"early_config_prune": prune})(fn)


_INTERPRETED = is_interpreted(_attn_fwd)


def _interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return _INTERPRETED


@dataclass
class _Launch:
    """One kernel launch: table name, grid as a function of (BLOCK_M, BLOCK_N), keyword arguments."""
    name: str
    grid: object
    args: dict


_TUNED: dict[str, object] = {}


def _launch(name: str, grid, **args) -> None:
    """Run kernel ``name``: autotuned over its CONFIGS rows on a GPU, the one INTERPRETER_CONFIGS row
    under the interpreter. ``grid(block_m, block_n)`` gives the launch grid."""
    if _interpreting():
        c = INTERPRETER_CONFIGS[name]
        KERNELS[name][grid(c.block_m, c.block_n)](**args, **c.kwargs(), num_warps=c.num_warps,
                                                  num_stages=c.num_stages)
        return
    if name not in _TUNED:
        _TUNED[name] = _make_tuned(name)
    _TUNED[name][lambda meta: grid(meta["BLOCK_M"], meta.get("BLOCK_N", 0))](**args)


def _run(launches: list[_Launch]) -> None:
    for launch in launches:
        _launch(launch.name, launch.grid, **launch.args)


# ----------------------------------------------------------------------------------------------------
# Launch plans: the kernel arguments of a call
# ----------------------------------------------------------------------------------------------------
@dataclass
class _Problem:
    """Everything the launchers derive from the inputs once (shapes, mask layout, flags, dropout)."""
    B: int
    H: int
    Hk: int
    L: int
    S: int
    E: int
    Ev: int
    mask: torch.Tensor
    mask_kind: int
    mask_strides: tuple[int, int, int, int]
    keys_only: bool
    kv_range: torch.Tensor
    kv_range_strides: tuple[int, int]
    seed_lo: int
    seed_hi: int
    drop_threshold: int
    drop_scale: float
    causal_offset: int
    constexprs: dict
    variants: dict  # the decoder variants' kernel arguments (None where off) and switches, sinks excepted

    def common(self, scale: float) -> dict:
        return dict(H=self.H, GROUP=self.H // self.Hk, L=self.L, S=self.S, causal_offset=self.causal_offset,
                    sm_scale=scale, seed_lo=self.seed_lo, seed_hi=self.seed_hi, drop_threshold=self.drop_threshold,
                    drop_scale=self.drop_scale, TUNE_HEAD=head_bucket(self.E, self.Ev),
                    TUNE_LEN=len_bucket(max(self.L, self.S)))


@dataclass
class _Varlen:
    """A packed (variable-length) batch: q (total_q, H, E), k (total_k, Hk, E), v (total_k, Hk, Ev); item b
    is rows cu_q[b]..cu_q[b+1] / cu_k[b]..cu_k[b+1] (int32, on the device); L, S are the longest lengths."""
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    B: int
    max_q: int
    max_k: int


def _dims(q, k, v, vl: _Varlen | None) -> tuple[int, int, int, int, int, int, int]:
    """(B, H, Hk, L, S, E, Ev) of 4-D inputs, or of packed ones (L, S: the longest lengths)."""
    if vl is None:
        return q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    return vl.B, q.shape[1], k.shape[1], vl.max_q, vl.max_k, q.shape[2], v.shape[2]


def _strides4(t: torch.Tensor, vl: _Varlen | None) -> tuple[int, int, int, int]:
    """(b, h, row, e) strides; a packed (total, H, D) tensor has batch stride 0 (rows come from cu_seqlens)."""
    return tuple(t.stride()) if vl is None else (0, t.stride(1), t.stride(0), t.stride(2))


def _seq_args(lse: torch.Tensor, vl: _Varlen | None, dummy: torch.Tensor) -> dict:
    """Row-statistics layout (lse and delta: (B, H, L), or (H, total_q) for a packed batch) and the
    varlen arguments of the kernels."""
    if vl is None:
        return dict(stride_lb=lse.stride(0), stride_lh=lse.stride(1), CuQ=dummy, CuK=dummy, VARLEN=False)
    return dict(stride_lb=0, stride_lh=lse.stride(0), CuQ=vl.cu_q, CuK=vl.cu_k, VARLEN=True)


def _causal_offset(causal_offset: int, is_causal: bool, L: int, S: int, positional: bool = False) -> int:
    """The kernels' causal_offset: 0 without causality, else clamped to [-L, S]. Exact: with offset >= S - 1
    every query sees every key, with offset <= -L none sees any; the clamp keeps offs_m + causal_offset and
    start_m + BLOCK_M + causal_offset in int32. ``positional`` (a window or ALiBi: they read query positions
    i + causal_offset whether or not causal): the offset itself, which must then fit int32 with room."""
    off = operator.index(causal_offset)
    if positional:
        if L + S + abs(off) >= _POS_LIMIT:
            raise ValueError(f"causal_offset with a window or ALiBi must satisfy L + S + |causal_offset| < 2**29, "
                             f"got L={L}, S={S}, causal_offset={off}")
        return off
    return min(max(off, -L), S) if is_causal else 0


# Positions, offsets and window bounds stay below this, so every sum of two of them (plus a block) fits int32.
_POS_LIMIT = 2 ** 29


def _variant_args(q, B: int, H: int, L: int, S: int, offset: int, window, softcap, alibi_slopes) -> dict:
    """The kernel arguments of the decoder variants but sinks (the forward adds those): None for a variant that
    is off (the JIT then drops the argument, and the plain kernels compile as without variants), the
    WINDOW / SOFTCAP / ALIBI switches. An unbounded window side (-1) becomes a bound no key reaches,
    L + S + |offset| (a larger one is cut to it: the same keys)."""
    left, right, softcap = check_launch_window_softcap(window, softcap)
    window = (left, right)
    windowed = window != (-1, -1)
    far = L + S + abs(offset)
    args = dict(window_left=None, window_right=None, softcap=None, Alibi=None, stride_ab=None, stride_ah=None,
                WINDOW=windowed, SOFTCAP=softcap > 0.0, ALIBI=alibi_slopes is not None)
    if windowed:
        args.update(window_left=far if window[0] < 0 else min(window[0], far),
                    window_right=far if window[1] < 0 else min(window[1], far))
    if softcap > 0.0:
        args["softcap"] = softcap
    if alibi_slopes is not None:
        a = alibi_slopes
        if (a.dtype != torch.float32 or a.device != q.device or a.dim() not in (1, 2)
                or tuple(a.shape[-1:]) != (H,) or (a.dim() == 2 and a.shape[0] not in (1, B))):
            raise ValueError(f"alibi_slopes must be float32 (B, H) = ({B}, {H}) or (H,) on {q.device}, got "
                             f"{a.dtype} {tuple(a.shape)} on {a.device}")
        args.update(Alibi=a, stride_ab=a.stride(0) if a.dim() == 2 and a.shape[0] > 1 else 0,
                    stride_ah=a.stride(-1))
    return args


def _problem(q, k, v, mask, is_causal: bool, dropout_p: float, seed: int, vl: _Varlen | None = None,
             causal_offset: int = 0, window=(-1, -1), softcap: float = 0.0,
             alibi_slopes: torch.Tensor | None = None) -> _Problem:
    B, H, Hk, L, S, E, Ev = _dims(q, k, v, vl)
    if E > 256 or Ev > 256:
        raise ValueError(f"the Triton kernels support head dims up to 256, got E={E}, Ev={Ev}")
    if H % Hk:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hk})")
    if mask is not None and mask.dim() != 4:
        raise ValueError(f"mask must be 4-D (B|1, H|1, L|1, S|1), got shape {tuple(mask.shape)}")
    mask_t, mstr, mask_kind = mask_args(mask, q)
    keys_only = mask is not None and mask.shape[2] == 1
    if keys_only:
        kv_range = kv_range_of(mask_t, S)
        rstr = (kv_range.stride(0) if kv_range.shape[0] > 1 else 0,
                kv_range.stride(1) if kv_range.shape[1] > 1 else 0)
    else:
        kv_range, rstr = torch.zeros(2, dtype=torch.int32, device=q.device), (0, 0)
    seed_lo, seed_hi, threshold, drop_scale = dropout_args(dropout_p, seed)
    constexprs = dict(HEAD_DIM=E, HEAD_DIM_V=Ev, BLOCK_E=pad_dim(E), BLOCK_EV=pad_dim(Ev),
                      IS_CAUSAL=bool(is_causal), DROPOUT=dropout_p > 0.0,
                      UPCAST_DOT=_interpreting() and q.dtype == torch.bfloat16, DOT_PRECISION=dot_precision(q.dtype))
    positional = tuple(window) != (-1, -1) or alibi_slopes is not None
    offset = _causal_offset(causal_offset, is_causal, L, S, positional)
    return _Problem(B, H, Hk, L, S, E, Ev, mask_t, mask_kind, mstr, keys_only, kv_range, rstr,
                    seed_lo, seed_hi, threshold, drop_scale, offset, constexprs,
                    _variant_args(q, B, H, L, S, offset, window, softcap, alibi_slopes))


# K of the out_lo code (module doc; csrc/out_lo.h explains the choice): |O - out| < one ulp of out, 2^(e-7)
# (bf16) or 2^(e-10) (fp16, normal out), whatever the rounding (the interpreter truncates to bf16), so
# |out_lo| < 2^15 and out + out_lo * 2^(e-K) is O to ~2^-23 relative.
_LO_SHIFT = {torch.bfloat16: 22, torch.float16: 25}


def _out_lo_args(out: torch.Tensor, out_lo: torch.Tensor | None) -> dict:
    """OutLo / LO_SHIFT of the forward and preprocess kernels (out stands in for an absent out_lo)."""
    if out_lo is None:
        return dict(OutLo=out, LO_SHIFT=0)
    return dict(OutLo=out_lo, LO_SHIFT=_LO_SHIFT[out.dtype])


def _empty_out_lo(out: torch.Tensor) -> torch.Tensor:
    """An int16 out_lo buffer in out's strides (the return_lo forwards' third output)."""
    if out.dtype not in _LO_SHIFT:
        raise TypeError(f"return_lo needs float16 or bfloat16 inputs, got {out.dtype}")
    return torch.empty_like(out, dtype=torch.int16)  # out is dense: its strides are kept


def _out_lo_in_out_strides(out_lo: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor | None:
    """out_lo in out's strides (the kernels read both with one set); checked like the CPU launcher's."""
    if out_lo is None:
        return None
    if out_lo.shape != out.shape or out_lo.dtype != torch.int16 or out.dtype not in _LO_SHIFT:
        raise ValueError(f"out_lo must be int16 of out's shape {tuple(out.shape)} (float16 / bfloat16 out, got "
                         f"{out.dtype}), got {tuple(out_lo.shape)} {out_lo.dtype}")
    if out_lo.stride() == out.stride():
        return out_lo
    return torch.empty_strided(out.shape, out.stride(), dtype=torch.int16, device=out.device).copy_(out_lo)


def _fwd_plan(q, k, v, mask, out, lse, *, scale, is_causal, dropout_p, seed,
              vl: _Varlen | None = None, out_lo: torch.Tensor | None = None, causal_offset: int = 0,
              window=(-1, -1), softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
              sinks: torch.Tensor | None = None) -> list[_Launch]:
    """Launches of the forward; ``vl``: q/k/v/out are packed (see _Varlen), lse is (H, total_q). ``out_lo``
    (int16, out's strides): also store the residual code there. The decoder variants: see attention_fwd."""
    B, H, _, L, _, _, _ = _dims(q, k, v, vl)
    problem = _problem(q, k, v, mask, is_causal, dropout_p, seed, vl, causal_offset, window, softcap, alibi_slopes)
    check_launch_sinks(sinks, q, H)
    return [_Launch("fwd", lambda bm, bn: (triton.cdiv(L, bm), B * H), dict(
        Q=q, K=k, V=v, Mask=problem.mask, KVRange=problem.kv_range, Out=out, Lse=lse, **_out_lo_args(out, out_lo),
        **named_strides("q", _strides4(q, vl)), **named_strides("k", _strides4(k, vl)),
        **named_strides("v", _strides4(v, vl)),
        **named_strides("m", problem.mask_strides), stride_rb=problem.kv_range_strides[0],
        stride_rh=problem.kv_range_strides[1], **named_strides("o", _strides4(out, vl)),
        **_seq_args(lse, vl, problem.kv_range),
        **problem.common(scale), **problem.constexprs, MASK_KIND=problem.mask_kind, KEYS_ONLY=problem.keys_only,
        **problem.variants, Sinks=sinks, SINKS=sinks is not None))]


def _bwd_plan(dout, q, k, v, out, lse, mask, dq, dk, dv, dmask, delta, *, scale, is_causal, dropout_p,
              seed, vl: _Varlen | None = None, out_lo: torch.Tensor | None = None,
              causal_offset: int = 0, window=(-1, -1), softcap: float = 0.0,
              alibi_slopes: torch.Tensor | None = None) -> list[_Launch]:
    """Launches of the backward; ``vl``: packed tensors, lse and delta (H, total_q). ``out_lo``: the forward's
    (out's strides), or None. The decoder variants: see attention_bwd."""
    B, H, Hk, L, S, _, Ev = _dims(q, k, v, vl)
    problem = _problem(q, k, v, mask, is_causal, dropout_p, seed, vl, causal_offset, window, softcap, alibi_slopes)
    common = problem.common(scale)
    seq = _seq_args(lse, vl, problem.kv_range)
    do_st = _strides4(dout, vl)
    plan = [_Launch("bwd_preprocess", lambda bm, bn: (triton.cdiv(L, bm), B * H), dict(
        Out=out, DO=dout, Delta=delta, **named_strides("o", _strides4(out, vl)), **_out_lo_args(out, out_lo),
        stride_db=do_st[0], stride_dh=do_st[1], stride_dm=do_st[2], stride_de=do_st[3],
        H=H, L=L, TUNE_HEAD=common["TUNE_HEAD"], TUNE_LEN=common["TUNE_LEN"],
        HEAD_DIM_V=Ev, BLOCK_EV=problem.constexprs["BLOCK_EV"], CuQ=seq["CuQ"], stride_lb=seq["stride_lb"],
        stride_lh=seq["stride_lh"], VARLEN=seq["VARLEN"]))]
    # Arguments shared by the dK/dV, dQ and dmask kernels.
    shared = dict(Q=q, K=k, V=v, Mask=problem.mask, DO=dout, Lse=lse, Delta=delta,
                  **named_strides("q", _strides4(q, vl)), **named_strides("k", _strides4(k, vl)),
                  **named_strides("v", _strides4(v, vl)),
                  **named_strides("m", problem.mask_strides), **named_strides("do", do_st),
                  **common, **problem.constexprs, **seq, **problem.variants)
    masked = dict(KVRange=problem.kv_range, stride_rb=problem.kv_range_strides[0],
                  stride_rh=problem.kv_range_strides[1], MASK_KIND=problem.mask_kind, KEYS_ONLY=problem.keys_only)
    plan.append(_Launch("bwd_dkdv", lambda bm, bn: (triton.cdiv(S, bn), B * Hk), dict(
        **shared, **masked, DK=dk, DV=dv, **named_strides("dk", _strides4(dk, vl)),
        **named_strides("dv", _strides4(dv, vl)))))
    # dS comes straight from the dQ kernel when every (b, h, i, j) owns its mask element; a broadcast
    # mask's gradient is a reduction, done by the dmask kernel.
    bcast = [n == 1 and full > 1 for n, full in zip(mask.shape, (B, H, L, S))] if dmask is not None else []
    store_ds = dmask is not None and not any(bcast)
    plan.append(_Launch("bwd_dq", lambda bm, bn: (triton.cdiv(L, bm), B * H), dict(
        **shared, **masked, DQ=dq, DMask=dmask if store_ds else dq, **named_strides("dq", _strides4(dq, vl)),
        **named_strides("dm", mask_strides(dmask) if store_ds else (0, 0, 0, 0)), STORE_DS=store_ds)))
    if dmask is not None and not store_ds:
        Bm, Hm, Lm, Sm = mask.shape
        plan.append(_Launch("bwd_dmask", lambda bm, bn: (triton.cdiv(Lm, bm), triton.cdiv(Sm, bn), Bm * Hm), dict(
            **shared, DMask=dmask, **named_strides("dm", mask_strides(dmask)), B=B, Hm=Hm,
            BCAST_B=bcast[0], BCAST_H=bcast[1], BCAST_M=bcast[2], BCAST_N=bcast[3])))
    return plan


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _forward(q, k, v, mask, out: torch.Tensor, lse: torch.Tensor, *, return_lo: bool, no_rows: bool,
             no_keys: bool, **plan):
    """Run the forward into the allocated ``out`` / ``lse`` (and an out_lo with ``return_lo``) and return them.
    ``no_rows``: nothing to compute; ``no_keys``: every row sees no key (out = 0, lse = -inf, out_lo = 0)."""
    out_lo = _empty_out_lo(out) if return_lo else None
    res = (out, lse) if out_lo is None else (out, lse, out_lo)
    if no_rows:
        return res
    if no_keys:
        out.zero_()
        sinks = plan.get("sinks")
        if sinks is None:
            lse.fill_(float("-inf"))
        else:  # the sink alone in the denominator (lse (B, H, L))
            lse.copy_(sinks.view(1, -1, 1).expand_as(lse))
        if out_lo is not None:
            out_lo.zero_()
        return res
    _run(_fwd_plan(q, k, v, mask, out, lse, out_lo=out_lo, **plan))
    return res


def _backward(dout, q, k, v, out, lse, mask, *, mask_needs_grad: bool, out_lo: torch.Tensor | None,
              empty: bool, **plan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Allocate (dq, dk, dv, dmask or None), run the backward into them and return them; ``empty``: no row or
    no key (zero gradients)."""
    out_lo = _out_lo_in_out_strides(out_lo, out)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dmask = None
    if mask_needs_grad and mask is not None and mask.dtype != torch.bool:
        # Zeros: tiles the dQ kernel skips (hidden by causality or padding) have dS = 0.
        dmask = torch.zeros(mask.shape, dtype=mask.dtype, device=mask.device)
    if empty:
        for t in (dq, dk, dv):
            t.zero_()
        return dq, dk, dv, dmask
    lse = lse.contiguous()  # the kernels read lse and delta with one set of strides (_seq_args): both dense
    delta = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
    _run(_bwd_plan(dout, q, k, v, out, lse, mask, dq, dk, dv, dmask, delta, out_lo=out_lo, **plan))
    return dq, dk, dv, dmask


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                  scale: float, is_causal: bool, dropout_p: float, seed: int, return_lo: bool = False,
                  causal_offset: int = 0, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                  alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None):
    """Attention forward: (out (B, H, L, Ev) in q's dtype, lse (B, H, L) float32), and out_lo (int16, out's
    layout) last with ``return_lo`` (fp16 / bf16 training). ``causal_offset`` (with ``is_causal``): key j is
    visible to query i iff j <= i + causal_offset (S - L: lower-right). See the module doc.

    The decoder variants (query row i at position i' = i + causal_offset, whether or not ``is_causal``):
    ``window`` (left, right), -1 unbounded: key j hidden unless i' - left <= j <= i' + right; ``softcap`` > 0:
    scores -> softcap * tanh(scores / softcap); ``alibi_slopes`` float32 (B, H) (any strides, stride 0 along a
    broadcast batch): scores += slope * (j - i'); ``sinks`` contiguous float32 (H,): exp(sink_h) joins every
    row's softmax denominator (lse includes it; a row with no visible key gets out 0, lse = sink_h)."""
    B, H, L, _ = q.shape
    out = empty_output(q, v, dropout_p)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    if k.shape[2] == 0:
        check_launch_sinks(sinks, q, H)  # validated where the kernel plan would do it
    return _forward(q, k, v, mask, out, lse, return_lo=return_lo, no_rows=B * H * L == 0, no_keys=k.shape[2] == 0,
                    scale=scale, is_causal=is_causal, dropout_p=dropout_p, seed=seed, causal_offset=causal_offset,
                    window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)


def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, mask: torch.Tensor | None, *, scale: float, is_causal: bool,
                  dropout_p: float, seed: int, mask_needs_grad: bool, out_lo: torch.Tensor | None = None,
                  causal_offset: int = 0, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                  alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Attention backward: (dq, dk, dv, dmask or None), contiguous. dk/dv are summed over each GQA group;
    dmask (float masks, when ``mask_needs_grad``) has the mask's shape and dtype, broadcast dims summed.
    ``out_lo``: the forward's residual code (``return_lo``), for delta from the fp32 output. ``causal_offset``:
    the forward's. Deterministic: no atomics, fixed reduction order. ``window`` / ``softcap`` / ``alibi_slopes``:
    the forward's (see attention_fwd). ``sinks`` is not read: the forward's lse holds the sink, so the recomputed
    P is already the sink softmax (the sinks' own gradient, -sum_{b,i} exp(sink_h - lse) delta, is the op's);
    with ``softcap``, dq / dk take dS (1 - t^2), t = tanh(scale q.k / softcap), dmask dS."""
    B, H, L, _ = q.shape
    return _backward(dout, q, k, v, out, lse, mask, mask_needs_grad=mask_needs_grad, out_lo=out_lo,
                     empty=B * H * L == 0 or k.shape[2] == 0, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
                     seed=seed, causal_offset=causal_offset, window=window, softcap=softcap,
                     alibi_slopes=alibi_slopes)


def varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
               max_q: int, max_k: int, mask: torch.Tensor | None, *, scale: float, is_causal: bool,
               dropout_p: float, seed: int, return_lo: bool = False):
    """Packed (variable-length) forward: q (total_q, H, E), k (total_k, Hk, E), v (total_k, Hk, Ev), int32
    cu_q / cu_k (B + 1) on the device, mask None or 4-D broadcastable to (B, H, max_q, max_k) (item b reads
    its top-left corner). Returns (out (total_q, H, Ev), lse (H, total_q) float32), and out_lo (total_q, H,
    Ev) int16 last with ``return_lo``. The grid covers the longest item; programs past their item's length
    exit at once."""
    total_q, H, _ = q.shape
    out = q.new_empty(total_q, H, v.shape[2])
    lse = torch.empty(H, total_q, dtype=torch.float32, device=q.device)
    return _forward(q, k, v, mask, out, lse, return_lo=return_lo, no_rows=total_q * H == 0,
                    no_keys=k.shape[0] == 0 or max_k == 0, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
                    seed=seed, vl=_Varlen(cu_q, cu_k, cu_q.numel() - 1, int(max_q), int(max_k)))


def varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
               mask: torch.Tensor | None, *, scale: float, is_causal: bool, dropout_p: float, seed: int,
               mask_needs_grad: bool, out_lo: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`varlen_fwd`: (dq, dk, dv, dmask or None), contiguous, deterministic. ``out_lo``:
    as for :func:`attention_bwd`."""
    return _backward(dout, q, k, v, out, lse, mask, mask_needs_grad=mask_needs_grad, out_lo=out_lo,
                     empty=q.shape[0] * q.shape[1] == 0 or k.shape[0] == 0 or max_q == 0 or max_k == 0,
                     scale=scale, is_causal=is_causal, dropout_p=dropout_p, seed=seed,
                     vl=_Varlen(cu_q, cu_k, cu_q.numel() - 1, int(max_q), int(max_k)))
