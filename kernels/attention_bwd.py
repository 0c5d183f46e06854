"""Attention backward kernels (flash-attention 2): P and dP are recomputed from lse, nothing of size
(L, S) is stored.

    dV = sum_i (P o Z)^T dO,   dP = (dO V^T) o Z,   dS = P o (dP - delta),   delta_i = rowsum(dO o O)_i,
    dQ = scale * dS K,         dK = scale * dS^T Q  (Z: the dropout keep mask times 1 / (1 - p), else 1)

With soft-capping (s = softcap * tanh(scale * q.k / softcap) = softcap * t), dQ and dK take dS o (1 - t^2) in
place of dS (a float mask's gradient stays dS: the mask is added after the cap). ALiBi and the window enter
through the recomputed P; sinks through lse (the forward's lse holds exp(sink), so P is the sink softmax).

* ``_attn_bwd_preprocess``  delta = rowsum(dO * O) (O from out and out_lo when given).
* ``_attn_bwd_dkdv``   one program per (key block, b, kv head); loops over the group's query heads and
  their query blocks, so dk/dv need no atomics.
* ``_attn_bwd_dq``     one program per (query block, b, h); also stores dS when the float mask needs a
  gradient and is not broadcast.
* ``_attn_bwd_dmask``  one program per dmask tile when the mask is broadcast: loops over the broadcast
  b / h / i / j, recomputing P and dP, and reduces in a fixed order (deterministic).

Arguments, shapes and the launch plan: kernels/attention.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._dropout import _philox_keep
from ._masking import _kv_range, _scores
from ._tile import RUNTIME_INTS, _dot, _load_row_stats, _seq_bounds
from ._variants import _alibi_slope, _variant_scales


@triton.jit
def _recompute_p(x, yt, u, wt, M_tile, lse2, b, h, rows, cols, offs_m, offs_n, start_n, in_m, in_n,
                 qk_scale, stride_mm, stride_mn, causal_offset, seed_lo, seed_hi, drop_threshold, drop_scale,
                 cap2, slope2, window_left, window_right,
                 MASK_KIND: tl.constexpr, KEYS_ONLY: tl.constexpr, CAUSAL: tl.constexpr,
                 DROPOUT: tl.constexpr, TRANSPOSED: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr):
    """The backward's recomputation of one tile (shared by the dK/dV, dQ and dmask kernels):
    P = exp2(S - lse) from the scores x @ yt (see _scores; lse2 in log2 units, +inf for empty rows) and
    dP = u @ wt (dO V^T; V dO^T when TRANSPOSED). Returns (p, pd, dp): p = P, pd = P o Z (the dropped and
    rescaled probabilities the forward multiplied V by) and dp = dP o Z, Z the dropout keep mask times
    drop_scale; without dropout pd = p and dp = dP. Also returns t, the soft-cap's tanh (see _scores; the
    scores themselves without SOFTCAP, then unused)."""
    s, t = _scores(x, yt, M_tile, rows, cols, offs_m, offs_n, in_m, in_n, qk_scale, stride_mm, stride_mn,
                   causal_offset, cap2, slope2, window_left, window_right, MASK_KIND, KEYS_ONLY, CAUSAL, TRANSPOSED,
                   UPCAST_DOT, DOT_PRECISION, SOFTCAP, ALIBI, WINDOW)
    if TRANSPOSED:
        p = tl.math.exp2(s - lse2[None, :])
    else:
        p = tl.math.exp2(s - lse2[:, None])
    dp = _dot(u, wt, None, UPCAST_DOT, DOT_PRECISION)
    if DROPOUT:
        keep = _philox_keep(b, h, offs_m, start_n, seed_lo, seed_hi, drop_threshold, BLOCK_M, BLOCK_N,
                            TRANSPOSED)
        pd = tl.where(keep, p * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    else:
        pd = p
    return p, pd, dp, t


@triton.jit
def _ds(p, dp, delta, TRANSPOSED: tl.constexpr):
    """dS = P o (dP - delta), delta (one per query row) broadcast along the keys."""
    if TRANSPOSED:
        ds = p * (dp - delta[None, :])
    else:
        ds = p * (dp - delta[:, None])
    return ds


@triton.jit
def _ds_raw(ds, t, SOFTCAP: tl.constexpr):
    """The gradient of the uncapped scores scale * q.k: dS (the gradient of the scores the mask is added to)
    times d(softcap * tanh(x / softcap)) / dx = 1 - t^2 with SOFTCAP, else dS."""
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def _attn_bwd_preprocess(Out, OutLo, DO, Delta, CuQ,
                         stride_ob, stride_oh, stride_om, stride_oe,
                         stride_db, stride_dh, stride_dm, stride_de,
                         stride_lb, stride_lh,
                         H, L, TUNE_HEAD, TUNE_LEN,
                         HEAD_DIM_V: tl.constexpr, BLOCK_EV: tl.constexpr, BLOCK_M: tl.constexpr,
                         VARLEN: tl.constexpr = False, LO_SHIFT: tl.constexpr = 0):
    """delta_i = sum_e dO_ie * O_ie (fp32), stored in the layout of lse. LO_SHIFT != 0: O is the forward's
    fp32 result, out + out_lo * 2^(e - LO_SHIFT), e the float32 exponent of out (out_lo read through Out's
    strides; see _encode_lo); a non-finite correction (out inf / NaN) is dropped, leaving out's delta."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    q0, L = _seq_bounds(CuQ, b, L, VARLEN)  # programs past a short item store nothing (masked)
    m64 = start_m.to(tl.int64) + q0
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    offs_ev = tl.arange(0, BLOCK_EV)
    msk = (offs_m[:, None] < L) & (offs_ev[None, :] < HEAD_DIM_V)
    o_blk = b * stride_ob + h * stride_oh + m64 * stride_om
    o_tile = rows[:, None] * stride_om + offs_ev[None, :] * stride_oe
    o = tl.load(Out + o_blk + o_tile, mask=msk, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + m64 * stride_dm
                 + rows[:, None] * stride_dm + offs_ev[None, :] * stride_de, mask=msk, other=0.0)
    o = o.to(tl.float32)
    do = do.to(tl.float32)
    delta = tl.sum(o * do, 1)
    if LO_SHIFT != 0:
        m = tl.load(OutLo + o_blk + o_tile, mask=msk, other=0)
        pow2 = (o.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)  # 2^e
        c = tl.sum(do * (pow2 * m.to(tl.float32)), 1) * (1.0 / (1 << LO_SHIFT))
        delta = tl.where(tl.abs(c) < float("inf"), delta + c, delta)
    tl.store(Delta + b * stride_lb + h * stride_lh + q0 + offs_m, delta, mask=offs_m < L)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _attn_bwd_dkdv(Q, K, V, Mask, KVRange, DO, Lse, Delta, DK, DV, CuQ, CuK, Alibi,
                   stride_qb, stride_qh, stride_qm, stride_qe,
                   stride_kb, stride_kh, stride_kn, stride_ke,
                   stride_vb, stride_vh, stride_vn, stride_ve,
                   stride_mb, stride_mh, stride_mm, stride_mn,
                   stride_rb, stride_rh,
                   stride_dob, stride_doh, stride_dom, stride_doe,
                   stride_dkb, stride_dkh, stride_dkn, stride_dke,
                   stride_dvb, stride_dvh, stride_dvn, stride_dve,
                   stride_lb, stride_lh, stride_ab, stride_ah,
                   H, GROUP, L, S, causal_offset, sm_scale, seed_lo, seed_hi, drop_threshold, drop_scale,
                   window_left, window_right, softcap, TUNE_HEAD, TUNE_LEN,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_EV: tl.constexpr, MASK_KIND: tl.constexpr, KEYS_ONLY: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   VARLEN: tl.constexpr = False, WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
                   ALIBI: tl.constexpr = False):
    """dV = sum_h (P o Z)^T dO, dK = scale * sum_h dS^T Q for one key block, summed over the GQA group's
    query heads in order (deterministic, no atomics). Tiles are (key, query): no transposes of P/dS.
    The decoder variants as in the forward (no sinks: lse holds them)."""
    start_n = tl.program_id(0) * BLOCK_N
    pid_bhk = tl.program_id(1).to(tl.int64)
    Hk = H // GROUP
    b = pid_bhk // Hk
    hk = pid_bhk % Hk
    q0, L = _seq_bounds(CuQ, b, L, VARLEN)
    k0, S = _seq_bounds(CuK, b, S, VARLEN)
    if VARLEN:
        L = tl.where(start_n < S, L, 0)  # a program past a short item: no query block, nothing stored
        causal_offset = 0
    n64 = start_n.to(tl.int64) + k0
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_n = start_n + cols
    in_n = offs_n < S
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    k = tl.load(K + b * stride_kb + hk * stride_kh + n64 * stride_kn
                + cols[:, None] * stride_kn + offs_e[None, :] * stride_ke,
                mask=in_n[:, None] & (offs_e[None, :] < HEAD_DIM), other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + n64 * stride_vn
                + cols[:, None] * stride_vn + offs_ev[None, :] * stride_ve,
                mask=in_n[:, None] & (offs_ev[None, :] < HEAD_DIM_V), other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_EV), dtype=tl.float32)
    qk_scale, cap2 = _variant_scales(sm_scale, softcap, SOFTCAP)
    q_off = rows[:, None] * stride_qm + offs_e[None, :] * stride_qe
    do_off = rows[:, None] * stride_dom + offs_ev[None, :] * stride_doe

    for g in range(GROUP):
        h = hk * GROUP + g
        Q_bh = Q + b * stride_qb + h * stride_qh + q0 * stride_qm
        DO_bh = DO + b * stride_dob + h * stride_doh + q0 * stride_dom
        M_col = Mask + b * stride_mb + h * stride_mh + start_n.to(tl.int64) * stride_mn
        off_bhl = b * stride_lb + h * stride_lh + q0
        slope2 = _alibi_slope(Alibi, b, h, stride_ab, stride_ah, ALIBI)
        # Query blocks that see this key block: causal skips those above the diagonal (the first query
        # that sees key start_n is start_n - causal_offset, clamped at 0 before the division so it rounds
        # down the same way compiled and interpreted); the window those whose rows lie wholly before
        # (i' + window_right < start_n) or after (i' - window_left > start_n + BLOCK_N - 1) the block; a key-only
        # mask that hides the whole block skips them all. lo >= hi: no query sees the block, dk = dv = 0 are
        # stored.
        lo = 0
        hi = L
        if KEYS_ONLY:
            klo, khi = _kv_range(KVRange, b, h, stride_rb, stride_rh, S, KEYS_ONLY)
            if (start_n >= khi) | (start_n + BLOCK_N <= klo):
                hi = 0
        if WINDOW:
            hi = tl.minimum(hi, start_n + BLOCK_N + window_left - causal_offset)
        if IS_CAUSAL:
            lo = tl.minimum((tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M, hi)
        if WINDOW:
            lo = tl.maximum(lo, (tl.maximum(start_n - window_right - causal_offset, 0) // BLOCK_M) * BLOCK_M)
        # One loop for diagonal and off-diagonal blocks: the causal test is a compare per element,
        # and a second copy of this loop body costs more registers than it saves.
        for start_m in range(lo, hi, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            m64 = start_m.to(tl.int64)
            offs_m = start_m + rows
            in_m = offs_m < L
            q = tl.load(Q_bh + m64 * stride_qm + q_off, mask=in_m[:, None] & (offs_e[None, :] < HEAD_DIM),
                        other=0.0)
            do = tl.load(DO_bh + m64 * stride_dom + do_off,
                         mask=in_m[:, None] & (offs_ev[None, :] < HEAD_DIM_V), other=0.0)
            lse2, delta = _load_row_stats(Lse, Delta, off_bhl, offs_m, in_m)
            pt, pdt, dpt, tt = _recompute_p(k, tl.trans(q), v, tl.trans(do), M_col + m64 * stride_mm, lse2, b, h,
                                            rows, cols, offs_m, offs_n, start_n, in_m, in_n, qk_scale,
                                            stride_mm, stride_mn, causal_offset, seed_lo, seed_hi, drop_threshold,
                                            drop_scale, cap2, slope2, window_left, window_right, MASK_KIND,
                                            KEYS_ONLY, IS_CAUSAL, DROPOUT, True, UPCAST_DOT, DOT_PRECISION,
                                            BLOCK_M, BLOCK_N, SOFTCAP, ALIBI, WINDOW)
            dv = _dot(pdt.to(do.dtype), do, dv, UPCAST_DOT, DOT_PRECISION)
            dst = _ds_raw(_ds(pt, dpt, delta, True), tt, SOFTCAP)
            dk = _dot(dst.to(q.dtype), q, dk, UPCAST_DOT, DOT_PRECISION)

    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + n64 * stride_dkn
             + cols[:, None] * stride_dkn + offs_e[None, :] * stride_dke,
             dk.to(DK.dtype.element_ty), mask=in_n[:, None] & (offs_e[None, :] < HEAD_DIM))
    tl.store(DV + b * stride_dvb + hk * stride_dvh + n64 * stride_dvn
             + cols[:, None] * stride_dvn + offs_ev[None, :] * stride_dve,
             dv.to(DV.dtype.element_ty), mask=in_n[:, None] & (offs_ev[None, :] < HEAD_DIM_V))


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _attn_bwd_dq(Q, K, V, Mask, KVRange, DO, Lse, Delta, DQ, DMask, CuQ, CuK, Alibi,
                 stride_qb, stride_qh, stride_qm, stride_qe,
                 stride_kb, stride_kh, stride_kn, stride_ke,
                 stride_vb, stride_vh, stride_vn, stride_ve,
                 stride_mb, stride_mh, stride_mm, stride_mn,
                 stride_rb, stride_rh,
                 stride_dob, stride_doh, stride_dom, stride_doe,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqe,
                 stride_dmb, stride_dmh, stride_dmm, stride_dmn,
                 stride_lb, stride_lh, stride_ab, stride_ah,
                 H, GROUP, L, S, causal_offset, sm_scale, seed_lo, seed_hi, drop_threshold, drop_scale,
                 window_left, window_right, softcap, TUNE_HEAD, TUNE_LEN,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_E: tl.constexpr,
                 BLOCK_EV: tl.constexpr, MASK_KIND: tl.constexpr, KEYS_ONLY: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, STORE_DS: tl.constexpr,
                 UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr = False,
                 WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False):
    """dQ = scale * dS K for one query block, dS = P o (dP - delta); with STORE_DS also writes dS as
    the gradient of a (non-broadcast) float mask. The decoder variants as in the forward (with SOFTCAP, dQ
    takes dS o (1 - t^2), the mask gradient dS itself)."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q0, L = _seq_bounds(CuQ, b, L, VARLEN)  # programs past a short item: no key block, nothing stored
    k0, S = _seq_bounds(CuK, b, S, VARLEN)
    if VARLEN:
        causal_offset = 0
    m64 = start_m.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_m = start_m + rows
    in_m = offs_m < L
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    q = tl.load(Q + b * stride_qb + h * stride_qh + (q0 + m64) * stride_qm
                + rows[:, None] * stride_qm + offs_e[None, :] * stride_qe,
                mask=in_m[:, None] & (offs_e[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + (q0 + m64) * stride_dom
                 + rows[:, None] * stride_dom + offs_ev[None, :] * stride_doe,
                 mask=in_m[:, None] & (offs_ev[None, :] < HEAD_DIM_V), other=0.0)
    lse2, delta = _load_row_stats(Lse, Delta, b * stride_lb + h * stride_lh + q0, offs_m, in_m)
    K_bh = K + b * stride_kb + hk * stride_kh + k0 * stride_kn
    V_bh = V + b * stride_vb + hk * stride_vh + k0 * stride_vn
    M_row = Mask + b * stride_mb + h * stride_mh + m64 * stride_mm
    DM_row = DMask + b * stride_dmb + h * stride_dmh + m64 * stride_dmm
    kt_off = cols[None, :] * stride_kn + offs_e[:, None] * stride_ke
    vt_off = cols[None, :] * stride_vn + offs_ev[:, None] * stride_ve
    dq = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    qk_scale, cap2 = _variant_scales(sm_scale, softcap, SOFTCAP)
    slope2 = _alibi_slope(Alibi, b, h, stride_ab, stride_ah, ALIBI)

    lo, hi = _kv_range(KVRange, b, h, stride_rb, stride_rh, S, KEYS_ONLY)
    if WINDOW:  # the forward's key range
        lo = tl.maximum(lo, start_m + causal_offset - window_left)
        hi = tl.minimum(hi, start_m + BLOCK_M + causal_offset + window_right)
    lo = (lo // BLOCK_N) * BLOCK_N
    if VARLEN:
        hi = tl.minimum(hi, tl.where(start_m < L, S, 0))
    if IS_CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + causal_offset)  # as in the forward; hi <= lo: dq = 0
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        n64 = start_n.to(tl.int64)
        offs_n = start_n + cols
        in_n = offs_n < S
        kt = tl.load(K_bh + n64 * stride_kn + kt_off, mask=in_n[None, :] & (offs_e[:, None] < HEAD_DIM),
                     other=0.0)
        vt = tl.load(V_bh + n64 * stride_vn + vt_off, mask=in_n[None, :] & (offs_ev[:, None] < HEAD_DIM_V),
                     other=0.0)
        p, _, dp, t = _recompute_p(q, kt, do, vt, M_row + n64 * stride_mn, lse2, b, h, rows, cols, offs_m, offs_n,
                                   start_n, in_m, in_n, qk_scale, stride_mm, stride_mn, causal_offset, seed_lo,
                                   seed_hi, drop_threshold, drop_scale, cap2, slope2, window_left, window_right,
                                   MASK_KIND, KEYS_ONLY, IS_CAUSAL, DROPOUT, False, UPCAST_DOT, DOT_PRECISION,
                                   BLOCK_M, BLOCK_N, SOFTCAP, ALIBI, WINDOW)
        ds = _ds(p, dp, delta, False)
        if STORE_DS:
            tl.store(DM_row + n64 * stride_dmn + rows[:, None] * stride_dmm + cols[None, :] * stride_dmn,
                     ds.to(DMask.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])
        ds = _ds_raw(ds, t, SOFTCAP)
        dq = _dot(ds.to(kt.dtype), tl.trans(kt), dq, UPCAST_DOT, DOT_PRECISION)
    dq = dq * sm_scale
    in_m = rows < L - start_m  # recomputed after the loop, as in the forward's epilogue
    tl.store(DQ + b * stride_dqb + h * stride_dqh + (q0 + m64) * stride_dqm
             + rows[:, None] * stride_dqm + offs_e[None, :] * stride_dqe,
             dq.to(DQ.dtype.element_ty), mask=in_m[:, None] & (offs_e[None, :] < HEAD_DIM))


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _attn_bwd_dmask(Q, K, V, Mask, DO, Lse, Delta, DMask, CuQ, CuK, Alibi,
                    stride_qb, stride_qh, stride_qm, stride_qe,
                    stride_kb, stride_kh, stride_kn, stride_ke,
                    stride_vb, stride_vh, stride_vn, stride_ve,
                    stride_mb, stride_mh, stride_mm, stride_mn,
                    stride_dob, stride_doh, stride_dom, stride_doe,
                    stride_dmb, stride_dmh, stride_dmm, stride_dmn,
                    stride_lb, stride_lh, stride_ab, stride_ah,
                    B, H, GROUP, L, S, Hm, causal_offset, sm_scale, seed_lo, seed_hi, drop_threshold, drop_scale,
                    window_left, window_right, softcap, TUNE_HEAD, TUNE_LEN,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_E: tl.constexpr,
                    BLOCK_EV: tl.constexpr, BCAST_B: tl.constexpr, BCAST_H: tl.constexpr,
                    BCAST_M: tl.constexpr, BCAST_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr = False,
                    WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False):
    """Gradient of a broadcast float mask: one program per dmask tile (row / column / element when the
    query / key dim is broadcast) sums dS = P o (dP - delta) over the broadcast b, h, i, j in a fixed
    order, recomputing P and dP (no atomics: deterministic). The decoder variants as in the forward."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    bm = pid_bh // Hm
    hm = pid_bh % Hm
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    qk_scale, cap2 = _variant_scales(sm_scale, softcap, SOFTCAP)
    # Loop ranges: the whole broadcast dim, or this program's own index / block.
    b_lo = 0 if BCAST_B else bm
    b_hi = B if BCAST_B else bm + 1
    h_lo = 0 if BCAST_H else hm
    h_hi = H if BCAST_H else hm + 1
    m_lo = 0 if BCAST_M else pid_m * BLOCK_M
    m_hi = L if BCAST_M else pid_m * BLOCK_M + 1
    n_lo = 0 if BCAST_N else pid_n * BLOCK_N
    n_hi = S if BCAST_N else pid_n * BLOCK_N + 1
    if VARLEN:
        causal_offset = 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(b_lo, b_hi):
        b64 = tl.cast(b, tl.int64)
        # Varlen: item b's rows and lengths (the mask and dmask keep the local (i, j) of the item).
        q0, Lb = _seq_bounds(CuQ, b64, L, VARLEN)
        k0, Sb = _seq_bounds(CuK, b64, S, VARLEN)
        m_end = Lb if BCAST_M else tl.minimum(m_hi, Lb)
        n_stop = Sb if BCAST_N else tl.minimum(n_hi, Sb)
        for h in range(h_lo, h_hi):
            h64 = tl.cast(h, tl.int64)
            hk = h64 // GROUP
            Q_bh = Q + b64 * stride_qb + h64 * stride_qh + q0 * stride_qm
            DO_bh = DO + b64 * stride_dob + h64 * stride_doh + q0 * stride_dom
            K_bh = K + b64 * stride_kb + hk * stride_kh + k0 * stride_kn
            V_bh = V + b64 * stride_vb + hk * stride_vh + k0 * stride_vn
            M_bh = Mask + b64 * stride_mb + h64 * stride_mh
            off_bhl = b64 * stride_lb + h64 * stride_lh + q0
            slope2 = _alibi_slope(Alibi, b64, h64, stride_ab, stride_ah, ALIBI)
            for start_m in range(m_lo, m_end, BLOCK_M):
                m64 = tl.cast(start_m, tl.int64)
                offs_m = start_m + rows
                in_m = offs_m < Lb
                q = tl.load(Q_bh + m64 * stride_qm + rows[:, None] * stride_qm + offs_e[None, :] * stride_qe,
                            mask=in_m[:, None] & (offs_e[None, :] < HEAD_DIM), other=0.0)
                do = tl.load(DO_bh + m64 * stride_dom + rows[:, None] * stride_dom + offs_ev[None, :] * stride_doe,
                             mask=in_m[:, None] & (offs_ev[None, :] < HEAD_DIM_V), other=0.0)
                lse2, delta = _load_row_stats(Lse, Delta, off_bhl, offs_m, in_m)
                n_end = tl.minimum(n_stop, start_m + BLOCK_M + causal_offset) if IS_CAUSAL else n_stop
                n_start = n_lo
                if WINDOW:
                    # The forward's window range; n_lo is 0 or this program's own block, so the aligned start
                    # is at most n_lo or leaves no block.
                    n_end = tl.minimum(n_end, start_m + BLOCK_M + causal_offset + window_right)
                    n_start = tl.maximum(n_lo, (tl.maximum(start_m + causal_offset - window_left, 0) // BLOCK_N)
                                         * BLOCK_N)
                for start_n in range(n_start, n_end, BLOCK_N):
                    n64 = tl.cast(start_n, tl.int64)
                    offs_n = start_n + cols
                    in_n = offs_n < Sb
                    kt = tl.load(K_bh + n64 * stride_kn + cols[None, :] * stride_kn + offs_e[:, None] * stride_ke,
                                 mask=in_n[None, :] & (offs_e[:, None] < HEAD_DIM), other=0.0)
                    vt = tl.load(V_bh + n64 * stride_vn + cols[None, :] * stride_vn + offs_ev[:, None] * stride_ve,
                                 mask=in_n[None, :] & (offs_ev[:, None] < HEAD_DIM_V), other=0.0)
                    p, _, dp, _ = _recompute_p(q, kt, do, vt, M_bh + m64 * stride_mm + n64 * stride_mn, lse2,
                                               b64, h64, rows, cols, offs_m, offs_n, start_n, in_m, in_n, qk_scale,
                                               stride_mm, stride_mn, causal_offset, seed_lo, seed_hi,
                                               drop_threshold, drop_scale, cap2, slope2, window_left, window_right,
                                               2, False, IS_CAUSAL, DROPOUT, False, UPCAST_DOT, DOT_PRECISION,
                                               BLOCK_M, BLOCK_N, SOFTCAP, ALIBI, WINDOW)
                    acc += _ds(p, dp, delta, False)
    # Reduce the tile over the broadcast query / key dims and store this program's part of dmask.
    start_m = pid_m * BLOCK_M
    start_n = pid_n * BLOCK_N
    DM_tile = (DMask + bm * stride_dmb + hm * stride_dmh + tl.cast(start_m, tl.int64) * stride_dmm
               + tl.cast(start_n, tl.int64) * stride_dmn)
    in_m = start_m + rows < L
    in_n = start_n + cols < S
    out_ty = DMask.dtype.element_ty
    if BCAST_M and BCAST_N:
        tl.store(DM_tile, tl.sum(tl.sum(acc, 1), 0).to(out_ty))
    elif BCAST_M:
        tl.store(DM_tile + cols * stride_dmn, tl.sum(acc, 0).to(out_ty), mask=in_n)
    elif BCAST_N:
        tl.store(DM_tile + rows * stride_dmm, tl.sum(acc, 1).to(out_ty), mask=in_m)
    else:
        tl.store(DM_tile + rows[:, None] * stride_dmm + cols[None, :] * stride_dmn, acc.to(out_ty),
                 mask=in_m[:, None] & in_n[None, :])
