"""Fused additive (Bahdanau) attention in Triton: forward (tiled online softmax) and backward.

    s_ij = sum_d w[h, d] * tanh(q[b, h, i, d] + k[b, h, j, d])  (+ mask; causal: j <= i; no scale)

Shape legend: B batch, H heads, L query length, S key length, D hidden (score) dim (1..128 advised; any
value works, the d loop is a runtime loop), Ev value dim (1..256).

Launcher contract (shared with the C++ kernels, see fastattn/additive.py):

    additive_fwd(q, k, v, weight, mask, is_causal) -> (out, lse)
    additive_bwd(dout, q, k, v, weight, out, lse, mask, is_causal) -> (dq, dk, dv, dweight)

q (B, H, L, D), k (B, H, S, D), v (B, H, S, Ev) in any strides (read in place); weight (H, D); mask None or
4-D with every dim full or 1 (size-1 dims read with stride 0), bool (True = attend) or float (added).
out (B, H, L, Ev) stored (B, L, H, Ev); lse (B, H, L) float32, natural log, -inf for rows with no key.

The score tile is built as a sum over d of rank-1 tanh tiles: for each d, a (BLOCK_M,) query column and
a (BLOCK_N,) key column are loaded and ``w_d * tanh(q_d[:, None] + k_d[None, :])`` is added, so the
registers hold (BLOCK_M, BLOCK_N) tiles only, never (BLOCK_M, BLOCK_N, D).

Kernels (program ids cast to int64 before pointer arithmetic, fp32 accumulation, ieee dot products in every
dtype (tf32 would miss the fp32 tolerance), exp2 with log2(e) folded into the scores; tiles: ``CONFIGS``, from
kernels/configs.py):

* ``_additive_fwd``     one program per (query block, b * h): online softmax over key blocks, P @ V by tl.dot.
* ``_additive_bwd_dq``  one program per (query block, b * h): recomputes P from lse, dS = P (dO V^T - delta),
  then per d re-evaluates the tanh tile for dq[:, d] = w_d * rowsum(dS (1 - t^2)) and the program's
  partial dw[d] = sum(dS t), written to a (B, H, n_query_blocks, D) buffer the launcher sums with
  torch (deterministic: no atomics).
* ``_additive_bwd_dkdv`` one program per (key block, b * h): dv = P^T dO, dk[:, d] = w_d colsum(dS (1 - t^2)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import import_in_current_mode, is_interpreted

# Reloading this module after TRITON_INTERPRET changed re-decorates the kernels in the new mode.
import_in_current_mode(__package__, ("_tile", "_masking"))

from ._masking import _apply_mask, _mask_tile, mask_args  # noqa: E402
from ._tile import LN2, LOG2E, _dot, _load_row_stats  # noqa: E402
from .configs import ADDITIVE_CONFIGS as CONFIGS  # noqa: E402 - tile configurations: kernels/configs.py
from .configs import ADDITIVE_INTERPRETER_CONFIGS as INTERPRETER_CONFIGS  # noqa: E402
from .configs import dtype_class, pad_dim  # noqa: E402

__all__ = ["additive_fwd", "additive_bwd", "CONFIGS", "INTERPRETER_CONFIGS", "compile_check"]


@triton.jit
def _tanh(x):
    """tanh in fp32 (max relative error ~2e-7): |x| < 0.625: x + x^3 P(x^2) (Cephes tanhf minimax);
    else sign(x) (1 - 2 / (2^(2|x| log2 e) + 1)), |x| clamped to 9 (tanh(9) rounds to 1)."""
    ax = tl.minimum(tl.abs(x), 9.0)
    z = x * x
    p = (((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
         + 1.33314422036e-1) * z - 3.33332819422e-1
    small = x + x * z * p
    big = 1.0 - 2.0 / (tl.exp2(ax * (2.0 * LOG2E)) + 1.0)
    big = tl.where(x < 0, -big, big)
    return tl.where(ax < 0.625, small, big)


@triton.jit
def _tanh_term(Q_bh, K_bh, W_h, d, offs_m, offs_n, in_m, in_n, stride_ql, stride_qd, stride_kl, stride_kd):
    """(w_d, t) with t = tanh(q[m, d] + k[n, d]) (BLOCK_M, BLOCK_N): the d-th rank-1 term of the scores is
    w_d * t; the backward re-evaluates it for dq[:, d], dk[:, d] and dw[d]."""
    qd = tl.load(Q_bh + offs_m * stride_ql + d * stride_qd, mask=in_m, other=0.0).to(tl.float32)
    kd = tl.load(K_bh + offs_n * stride_kl + d * stride_kd, mask=in_n, other=0.0).to(tl.float32)
    wd = tl.load(W_h + d)
    return wd, _tanh(qd[:, None] + kd[None, :])


@triton.jit
def _scores(Q_bh, K_bh, W_h, M_bh, offs_m, offs_n, in_m, in_n, stride_ql, stride_qd, stride_kl, stride_kd,
            stride_ml, stride_ms, D, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 scores sum_d w_d tanh(q[m, d] + k[n, d]) in log2 units (times log2 e), with
    the mask, causality and the key bounds applied (-inf hides)."""
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d in range(D):
        wd, t = _tanh_term(Q_bh, K_bh, W_h, d, offs_m, offs_n, in_m, in_n, stride_ql, stride_qd, stride_kl,
                           stride_kd)
        s += wd * t
    s = s * LOG2E
    if MASK_KIND != 0:
        mv = _mask_tile(M_bh, offs_m, offs_n, in_m, in_n, stride_ml, stride_ms, False, False)
        s = _apply_mask(s, mv, MASK_KIND)
    keep = in_n[None, :]
    if IS_CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _additive_fwd(Q, K, V, Wt, Mask, Out, Lse,
                  stride_qb, stride_qh, stride_ql, stride_qd,
                  stride_kb, stride_kh, stride_kl, stride_kd,
                  stride_vb, stride_vh, stride_vl, stride_ve,
                  stride_mb, stride_mh, stride_ml, stride_ms,
                  stride_ob, stride_oh, stride_ol, stride_oe,
                  H, L, S, D, EV,
                  BLOCK_EV: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    Q_bh = Q + b * stride_qb + h * stride_qh
    K_bh = K + b * stride_kb + h * stride_kh
    V_bh = V + b * stride_vb + h * stride_vh
    M_bh = Mask + b * stride_mb + h * stride_mh
    W_h = Wt + h * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < L
    offs_e = tl.arange(0, BLOCK_EV)
    in_e = offs_e < EV

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_EV), dtype=tl.float32)
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_n = offs_n < S
        s = _scores(Q_bh, K_bh, W_h, M_bh, offs_m, offs_n, in_m, in_n, stride_ql, stride_qd, stride_kl, stride_kd,
                    stride_ml, stride_ms, D, MASK_KIND, IS_CAUSAL, BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_bh + offs_n[:, None] * stride_vl + offs_e[None, :] * stride_ve,
                    mask=in_n[:, None] & in_e[None, :], other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, "ieee")
        m_i = m_new
    alive = l_i > 0.0
    out = acc / tl.where(alive, l_i, 1.0)[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_e[None, :] * stride_oe,
             out.to(Out.dtype.element_ty), mask=in_m[:, None] & in_e[None, :])
    lse = tl.where(alive, (m_i + tl.log2(tl.where(alive, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(Lse + bh * L + offs_m, lse, mask=in_m)


@triton.jit
def _additive_bwd_dq(Q, K, V, Wt, Mask, DO, Lse, Delta, DQ, DWp,
                     stride_qb, stride_qh, stride_ql, stride_qd,
                     stride_kb, stride_kh, stride_kl, stride_kd,
                     stride_vb, stride_vh, stride_vl, stride_ve,
                     stride_mb, stride_mh, stride_ml, stride_ms,
                     stride_db, stride_dh, stride_dl, stride_de,
                     H, L, S, D, EV,
                     BLOCK_D: tl.constexpr, BLOCK_EV: tl.constexpr, MASK_KIND: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    n_mblocks = tl.num_programs(0).to(tl.int64)
    b = bh // H
    h = bh % H
    Q_bh = Q + b * stride_qb + h * stride_qh
    K_bh = K + b * stride_kb + h * stride_kh
    V_bh = V + b * stride_vb + h * stride_vh
    M_bh = Mask + b * stride_mb + h * stride_mh
    W_h = Wt + h * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < L
    offs_e = tl.arange(0, BLOCK_EV)
    in_e = offs_e < EV
    offs_d = tl.arange(0, BLOCK_D)
    lse2, delta = _load_row_stats(Lse, Delta, bh * L, offs_m, in_m)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dl + offs_e[None, :] * stride_de,
                 mask=in_m[:, None] & in_e[None, :], other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_n = offs_n < S
        s = _scores(Q_bh, K_bh, W_h, M_bh, offs_m, offs_n, in_m, in_n, stride_ql, stride_qd, stride_kl, stride_kd,
                    stride_ml, stride_ms, D, MASK_KIND, IS_CAUSAL, BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse2[:, None])
        v = tl.load(V_bh + offs_n[:, None] * stride_vl + offs_e[None, :] * stride_ve,
                    mask=in_n[:, None] & in_e[None, :], other=0.0)
        dp = _dot(do, tl.trans(v), None, UPCAST, "ieee")
        ds = p * (dp - delta[:, None])
        for d in range(D):
            wd, t = _tanh_term(Q_bh, K_bh, W_h, d, offs_m, offs_n, in_m, in_n, stride_ql, stride_qd, stride_kl,
                               stride_kd)
            col = wd * tl.sum(ds * (1.0 - t * t), 1)
            dq += tl.where(offs_d[None, :] == d, col[:, None], 0.0)
            dw += tl.where(offs_d == d, tl.sum(tl.sum(ds * t, 1), 0), 0.0)
    in_d = offs_d < D
    tl.store(DQ + (bh * L + offs_m[:, None]) * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=in_m[:, None] & in_d[None, :])
    tl.store(DWp + (bh * n_mblocks + pid_m) * D + offs_d, dw, mask=in_d)


@triton.jit
def _additive_bwd_dkdv(Q, K, V, Wt, Mask, DO, Lse, Delta, DK, DV,
                       stride_qb, stride_qh, stride_ql, stride_qd,
                       stride_kb, stride_kh, stride_kl, stride_kd,
                       stride_vb, stride_vh, stride_vl, stride_ve,
                       stride_mb, stride_mh, stride_ml, stride_ms,
                       stride_db, stride_dh, stride_dl, stride_de,
                       H, L, S, D, EV,
                       BLOCK_D: tl.constexpr, BLOCK_EV: tl.constexpr, MASK_KIND: tl.constexpr,
                       IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    Q_bh = Q + b * stride_qb + h * stride_qh
    K_bh = K + b * stride_kb + h * stride_kh
    M_bh = Mask + b * stride_mb + h * stride_mh
    DO_bh = DO + b * stride_db + h * stride_dh
    W_h = Wt + h * D
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < S
    offs_e = tl.arange(0, BLOCK_EV)
    in_e = offs_e < EV
    offs_d = tl.arange(0, BLOCK_D)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_e[None, :] * stride_ve,
                mask=in_n[:, None] & in_e[None, :], other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_EV), dtype=tl.float32)
    lo = 0
    if IS_CAUSAL:
        lo = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
    for start_m in range(lo, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_m = offs_m < L
        lse2, delta = _load_row_stats(Lse, Delta, bh * L, offs_m, in_m)
        do = tl.load(DO_bh + offs_m[:, None] * stride_dl + offs_e[None, :] * stride_de,
                     mask=in_m[:, None] & in_e[None, :], other=0.0)
        s = _scores(Q_bh, K_bh, W_h, M_bh, offs_m, offs_n, in_m, in_n, stride_ql, stride_qd, stride_kl, stride_kd,
                    stride_ml, stride_ms, D, MASK_KIND, IS_CAUSAL, BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse2[:, None])
        dv = _dot(tl.trans(p).to(do.dtype), do, dv, UPCAST, "ieee")
        dp = _dot(do, tl.trans(v), None, UPCAST, "ieee")
        ds = p * (dp - delta[:, None])
        for d in range(D):
            wd, t = _tanh_term(Q_bh, K_bh, W_h, d, offs_m, offs_n, in_m, in_n, stride_ql, stride_qd, stride_kl,
                               stride_kd)
            col = wd * tl.sum(ds * (1.0 - t * t), 0)
            dk += tl.where(offs_d[None, :] == d, col[:, None], 0.0)
    in_d = offs_d < D
    tl.store(DK + (bh * S + offs_n[:, None]) * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=in_n[:, None] & in_d[None, :])
    tl.store(DV + (bh * S + offs_n[:, None]) * EV + offs_e[None, :], dv.to(DV.dtype.element_ty),
             mask=in_n[:, None] & in_e[None, :])


KERNELS = {"fwd": _additive_fwd, "bwd_dq": _additive_bwd_dq, "bwd_dkdv": _additive_bwd_dkdv}


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
_INTERPRETED = is_interpreted(_additive_fwd)


def _interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return _INTERPRETED


def _config(name: str, dtype: torch.dtype):
    if _interpreting():
        return INTERPRETER_CONFIGS[name]
    return CONFIGS[(name, dtype_class(dtype))]


def _check(q, k, v, weight, mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, N, D), got {q.dim()}, {k.dim()}, {v.dim()} dims")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton additive kernels support float16, bfloat16 and float32, got {q.dtype}")
    if v.shape[-1] > 256:
        raise ValueError(f"the Triton additive kernels support value dims up to 256, got {v.shape[-1]}")
    if mask is not None and mask.dim() != 4:
        raise ValueError(f"mask must be 4-D (B|1, H|1, L|1, S|1), got shape {tuple(mask.shape)}")


def _strides(t):
    return tuple(t.stride())


def _store_dtype(dtype):
    # The interpreter converts float32 to bfloat16 by truncation (a GPU rounds to nearest even), so
    # interpreted bf16 kernels write float32 outputs and torch rounds them.
    return torch.float32 if _interpreting() and dtype == torch.bfloat16 else dtype


def _fwd_args(q, k, v, w, mask, out, lse, is_causal):
    """(positional args, constexprs) of _additive_fwd (shared by the launcher and compile_check)."""
    B, H, L, D = q.shape
    S, Ev = k.shape[2], v.shape[3]
    m, mstr, kind = mask_args(mask, q)
    return ((q, k, v, w, m, out, lse, *_strides(q), *_strides(k), *_strides(v), *mstr, *_strides(out),
             H, L, S, D, Ev),
            dict(BLOCK_EV=pad_dim(Ev), MASK_KIND=kind, IS_CAUSAL=bool(is_causal),
                 UPCAST=_interpreting() and q.dtype == torch.bfloat16))


def _bwd_args(q, k, v, w, mask, dout, lse, delta, out1, out2, is_causal):
    """(positional args, constexprs) of _additive_bwd_dq (out1, out2 = dq, dw partials) and
    _additive_bwd_dkdv (out1, out2 = dk, dv)."""
    B, H, L, D = q.shape
    S, Ev = k.shape[2], v.shape[3]
    m, mstr, kind = mask_args(mask, q)
    return ((q, k, v, w, m, dout, lse, delta, out1, out2, *_strides(q), *_strides(k), *_strides(v), *mstr,
             *_strides(dout), H, L, S, D, Ev),
            dict(BLOCK_D=max(1, triton.next_power_of_2(D)), BLOCK_EV=pad_dim(Ev), MASK_KIND=kind,
                 IS_CAUSAL=bool(is_causal), UPCAST=_interpreting() and q.dtype == torch.bfloat16))


def additive_fwd(q, k, v, weight, mask, is_causal: bool):
    """(out, lse): out (B, H, L, Ev) in q's dtype (memory (B, L, H, Ev)), lse (B, H, L) float32."""
    _check(q, k, v, weight, mask)
    B, H, L, D = q.shape
    S, Ev = k.shape[2], v.shape[3]
    out = q.new_empty(B, L, H, Ev, dtype=_store_dtype(q.dtype)).transpose(1, 2)
    lse = q.new_empty(B, H, L, dtype=torch.float32)
    if out.numel() == 0 and lse.numel() == 0 or S == 0 or Ev == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return _as(out, q.dtype), lse
    w = weight.detach().to(torch.float32).contiguous()
    bm, bn, nw, ns = _config("fwd", q.dtype)
    args, const = _fwd_args(q, k, v, w, mask, out, lse, is_causal)
    _additive_fwd[(triton.cdiv(L, bm), B * H)](*args, **const, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
                                               num_stages=ns)
    return _as(out, q.dtype), lse


def _as(t, dtype):
    if t.dtype == dtype:
        return t
    r = torch.empty_like(t, dtype=dtype)  # same strides
    r.copy_(t)
    return r


def additive_bwd(dout, q, k, v, weight, out, lse, mask, is_causal: bool):
    """(dq, dk, dv, dweight), contiguous, in the inputs' dtypes. Deterministic: dweight is the sum of
    per-program partials, taken by torch in a fixed order."""
    _check(q, k, v, weight, mask)
    B, H, L, D = q.shape
    S, Ev = k.shape[2], v.shape[3]
    sd = _store_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=sd, device=q.device)
    dk = torch.zeros(k.shape, dtype=sd, device=k.device)
    dv = torch.zeros(v.shape, dtype=sd, device=v.device)
    if min(B, H, L, S, Ev) == 0:
        return _as(dq, q.dtype), _as(dk, q.dtype), _as(dv, q.dtype), torch.zeros_like(weight)
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # (B, H, L)
    lse = lse.contiguous()
    w = weight.detach().to(torch.float32).contiguous()
    bm, bn, nw, ns = _config("bwd_dq", q.dtype)
    n_mb = triton.cdiv(L, bm)
    dwp = torch.zeros(B, H, n_mb, D, dtype=torch.float32, device=q.device)
    args, const = _bwd_args(q, k, v, w, mask, dout, lse, delta, dq, dwp, is_causal)
    _additive_bwd_dq[(n_mb, B * H)](*args, **const, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns)
    bm, bn, nw, ns = _config("bwd_dkdv", q.dtype)
    args, const = _bwd_args(q, k, v, w, mask, dout, lse, delta, dk, dv, is_causal)
    _additive_bwd_dkdv[(triton.cdiv(S, bn), B * H)](*args, **const, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
                                                    num_stages=ns)
    dw = dwp.sum(dim=(0, 2)).to(weight.dtype)
    return _as(dq, q.dtype), _as(dk, q.dtype), _as(dv, q.dtype), dw


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile check (no GPU needed; run with TRITON_INTERPRET unset)
# ----------------------------------------------------------------------------------------------------
def compile_check(archs=(80, 90), dtypes=("bf16", "fp16", "fp32"), D: int = 8, Ev: int = 64,
                  variants=("plain", "causal-bool", "float"), kernels=tuple(KERNELS)) -> list[dict]:
    """Compile every kernel in its CONFIGS tile for each arch / dtype / variant and report registers,
    spill bytes and shared memory (kernels/aot.py's tools: cuobjdump -res-usage, ptxas -v)."""
    from . import aot

    if _interpreting():
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the kernels are decorated for the "
                           "interpreter)")
    dts = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    rows = []
    for dname in dtypes:
        dt = dts[dname]
        B, H, L, S = 2, 2, 256, 256
        q, k = torch.empty(B, H, L, D, dtype=dt), torch.empty(B, H, S, D, dtype=dt)
        v, dout = torch.empty(B, H, S, Ev, dtype=dt), torch.empty(B, L, H, Ev, dtype=dt).transpose(1, 2)
        w, lse, delta = torch.empty(H, D), torch.empty(B, H, L), torch.empty(B, H, L)
        out = torch.empty(B, L, H, Ev, dtype=dt).transpose(1, 2)
        for variant in variants:
            mask = {"plain": None, "causal-bool": torch.empty(B, H, L, S, dtype=torch.bool),
                    "float": torch.empty(1, 1, L, S, dtype=torch.float32)}[variant]
            causal = variant == "causal-bool"
            plans = {"fwd": _fwd_args(q, k, v, w, mask, out, lse, causal),
                     "bwd_dq": _bwd_args(q, k, v, w, mask, dout, lse, delta, q, torch.empty(B, H, 4, D), causal),
                     "bwd_dkdv": _bwd_args(q, k, v, w, mask, dout, lse, delta, k, v, causal)}
            for name, (pos, const) in plans.items():
                if name not in kernels:
                    continue
                fn = KERNELS[name]
                cfg = CONFIGS[(name, dtype_class(dt))]
                bm, bn, nw, ns = cfg
                args = dict(zip([p.name for p in fn.params], pos))
                args.update(const, BLOCK_M=bm, BLOCK_N=bn)
                for arch in archs:
                    row = dict(kernel=name, dtype=dname, variant=variant, arch=arch, D=D, Ev=Ev,
                               config=cfg, error=None)
                    try:
                        used = aot.resources(aot.compile_kernel(fn, args, arch, nw, ns), arch)
                        row.update(registers=used["registers"], shared=used["shared"],
                                   spill_bytes=used["spill_bytes"])
                    except Exception as e:  # noqa: BLE001 - a failed compile is a row of the report
                        row["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
                    rows.append(row)
    return rows


if __name__ == "__main__":  # python -m fastattn.kernels.additive: the compile report
    for r in compile_check():
        print(r)
