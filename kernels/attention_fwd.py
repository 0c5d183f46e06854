"""Attention forward kernel: tiled online softmax (flash-attention 2), fp32 accumulation, exp2 with log2(e)
folded into the scale.

    out[b, h, i, :] = sum_j softmax_j(scale * q_i . k_j + mask_ij) v_j      (dropout: kept p_ij / (1 - p))
    lse[b, h, i]    = log sum_j exp(scale * q_i . k_j + mask_ij)

with the decoder variants on the scores when switched on (soft-capping, ALiBi, sliding window, sinks in the
denominator: kernels/_variants.py).

``_attn_fwd``: one program per (query block, b, h); loops over the visible key blocks only (the key range of a
padding mask, cut by causality). Arguments, shapes and the launch plan: kernels/attention.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._dropout import _philox_keep
from ._masking import _kv_range, _scores
from ._tile import LN2, LOG2E, RUNTIME_INTS, _dot, _seq_bounds
from ._variants import _alibi_slope, _fold_sink, _variant_scales


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K_bh, V_bh, M_row, b, h, offs_m, in_m, lo, hi,
               stride_kn, stride_ke, stride_vn, stride_ve, stride_mm, stride_mn, S, qk_scale,
               causal_offset, seed_lo, seed_hi, drop_threshold, cap2, slope2, window_left, window_right,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_E: tl.constexpr,
               BLOCK_EV: tl.constexpr, MASK_KIND: tl.constexpr, KEYS_ONLY: tl.constexpr,
               DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, APPLY_CAUSAL: tl.constexpr,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr):
    """Online softmax over key blocks [lo, hi) (lo a multiple of BLOCK_N; none when hi <= lo); scores in
    log2 units; APPLY_CAUSAL hides key j from query i unless j <= i + causal_offset; the decoder variants as
    in _scores."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    kt_off = cols[None, :] * stride_kn + offs_e[:, None] * stride_ke
    v_off = cols[:, None] * stride_vn + offs_ev[None, :] * stride_ve
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        n64 = start_n.to(tl.int64)
        offs_n = start_n + cols
        in_n = offs_n < S
        kt = tl.load(K_bh + n64 * stride_kn + kt_off, mask=in_n[None, :] & (offs_e[:, None] < HEAD_DIM),
                     other=0.0)
        s, _ = _scores(q, kt, M_row + n64 * stride_mn, rows, cols, offs_m, offs_n, in_m, in_n, qk_scale, stride_mm,
                       stride_mn, causal_offset, cap2, slope2, window_left, window_right, MASK_KIND, KEYS_ONLY,
                       APPLY_CAUSAL, False, UPCAST_DOT, DOT_PRECISION, SOFTCAP, ALIBI, WINDOW)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only hidden keys keeps m = -inf; subtract 0 there (p = 0, not NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _philox_keep(b, h, offs_m, start_n, seed_lo, seed_hi, drop_threshold, BLOCK_M, BLOCK_N, False)
            p = tl.where(keep, p, 0.0)
        v = tl.load(V_bh + n64 * stride_vn + v_off, mask=in_n[:, None] & (offs_ev[None, :] < HEAD_DIM_V),
                    other=0.0)
        acc = _dot(p.to(v.dtype), v, acc, UPCAST_DOT, DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _encode_lo(o, out, LO_SHIFT: tl.constexpr):
    """out_lo of the fp32 result o and out = o rounded to fp16 / bf16: round((o - out) * 2^(LO_SHIFT - e)) as
    int16 (to nearest even), e the float32 exponent of out; 0 where out is 0, subnormal, inf / NaN or >= 2^127
    (csrc/out_lo.h, encode_lo: the same code). Powers of two from the exponent bits, not a division: a
    division of the tile costs registers the full-feature forwards (dropout and a float mask) do not have."""
    h = out.to(tl.float32)
    ex = (h.to(tl.int32, bitcast=True) >> 23) & 0xFF
    inv = ((254 - ex) << 23).to(tl.float32, bitcast=True)  # 2^-e
    m = (o - h) * inv * (1 << LO_SHIFT)
    m = tl.minimum(tl.maximum(m, -32767.0), 32767.0)
    m = (m + 12582912.0) - 12582912.0  # round to nearest even (|m| < 2^22)
    return tl.where((ex >= 1) & (ex <= 253), m, 0.0).to(tl.int16)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _attn_fwd(Q, K, V, Mask, KVRange, Out, OutLo, Lse, CuQ, CuK, Alibi, Sinks,
              stride_qb, stride_qh, stride_qm, stride_qe,
              stride_kb, stride_kh, stride_kn, stride_ke,
              stride_vb, stride_vh, stride_vn, stride_ve,
              stride_mb, stride_mh, stride_mm, stride_mn,
              stride_rb, stride_rh,
              stride_ob, stride_oh, stride_om, stride_oe,
              stride_lb, stride_lh, stride_ab, stride_ah,
              H, GROUP, L, S, causal_offset, sm_scale, seed_lo, seed_hi, drop_threshold, drop_scale,
              window_left, window_right, softcap, TUNE_HEAD, TUNE_LEN,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_E: tl.constexpr,
              BLOCK_EV: tl.constexpr, MASK_KIND: tl.constexpr, KEYS_ONLY: tl.constexpr,
              IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
              DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              VARLEN: tl.constexpr = False, LO_SHIFT: tl.constexpr = 0, WINDOW: tl.constexpr = False,
              SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False, SINKS: tl.constexpr = False):
    """LO_SHIFT != 0 (fp16 / bf16 training): also store out_lo (see _encode_lo) through Out's strides.
    The decoder variants (kernels/_variants.py; query row i at position i + causal_offset, whether or not
    IS_CAUSAL): WINDOW (window_left / window_right: finite, >= 0), SOFTCAP (softcap > 0), ALIBI (Alibi: float32
    slopes read at b * stride_ab + h * stride_ah) and SINKS (Sinks: float32 (H,), folded into l and lse). The
    launchers pass None for the arguments of a variant that is off."""
    tl.static_assert(BLOCK_E >= HEAD_DIM)
    tl.static_assert(BLOCK_EV >= HEAD_DIM_V)
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    # Varlen: this item's rows of the packed tensors and its own lengths (the grid covers the longest).
    # Programs past a short item visit no key block and store nothing (an early return costs a stack
    # frame in the compiled kernel).
    q0, L = _seq_bounds(CuQ, b, L, VARLEN)
    k0, S = _seq_bounds(CuK, b, S, VARLEN)
    if VARLEN:
        causal_offset = 0  # packed batches are top-left causal (the varlen launchers pass 0)
    m64 = start_m.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    in_m = offs_m < L
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)

    Q_blk = Q + b * stride_qb + h * stride_qh + (q0 + m64) * stride_qm
    q = tl.load(Q_blk + rows[:, None] * stride_qm + offs_e[None, :] * stride_qe,
                mask=in_m[:, None] & (offs_e[None, :] < HEAD_DIM), other=0.0)
    K_bh = K + b * stride_kb + hk * stride_kh + k0 * stride_kn
    V_bh = V + b * stride_vb + hk * stride_vh + k0 * stride_vn
    M_row = Mask + b * stride_mb + h * stride_mh + m64 * stride_mm

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_EV), dtype=tl.float32)
    qk_scale, cap2 = _variant_scales(sm_scale, softcap, SOFTCAP)
    slope2 = _alibi_slope(Alibi, b, h, stride_ab, stride_ah, ALIBI)

    # Visible key blocks: the key-only mask's [lo, hi) range, cut by causality at the block's last row
    # (keys j <= start_m + BLOCK_M - 1 + causal_offset) and by the window (keys from the first row's
    # i' - window_left to the last row's i' + window_right). hi <= lo (every row of the block has
    # i + causal_offset < 0, the window lies outside the keys, or the mask leaves no key): no iteration, the
    # epilogue stores out = 0, lse = -inf (the sink with SINKS).
    lo, hi = _kv_range(KVRange, b, h, stride_rb, stride_rh, S, KEYS_ONLY)
    if WINDOW:
        lo = tl.maximum(lo, start_m + causal_offset - window_left)
        hi = tl.minimum(hi, start_m + BLOCK_M + causal_offset + window_right)
    lo = (lo // BLOCK_N) * BLOCK_N
    if VARLEN:
        hi = tl.minimum(hi, tl.where(start_m < L, S, 0))
    if IS_CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + causal_offset)
    if VARLEN:
        # Keys in [hi, S) are hidden anyway (causal / key-range), so hi bounds the keys: one register
        # less in the loop than S (the varlen variant otherwise spills at 255 registers).
        S = hi
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_bh, V_bh, M_row, b, h, offs_m, in_m, lo, hi,
                               stride_kn, stride_ke, stride_vn, stride_ve, stride_mm, stride_mn,
                               S, qk_scale, causal_offset, seed_lo, seed_hi, drop_threshold,
                               cap2, slope2, window_left, window_right,
                               HEAD_DIM, HEAD_DIM_V, BLOCK_E, BLOCK_EV, MASK_KIND, KEYS_ONLY,
                               DROPOUT, UPCAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, IS_CAUSAL,
                               SOFTCAP, ALIBI, WINDOW)
    if SINKS:
        acc, m_i, l_i = _fold_sink(acc, m_i, l_i, tl.load(Sinks + h) * LOG2E)

    # Rows that saw no visible key: out = 0, lse = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if DROPOUT:
        acc = acc * (drop_scale / l_safe)[:, None]
    else:
        acc = acc * (1.0 / l_safe)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    if VARLEN:
        q0 = tl.load(CuQ + b, volatile=True).to(tl.int64)  # reloaded: not kept live across the key loop
    # The row mask again from scalars (rows < L - start_m is not CSE'd with offs_m < L), so the store
    # layout's copy of it is not held across the key loop: the full-feature variants sit at 255 registers.
    in_m = rows < L - start_m
    tl.store(Lse + b * stride_lb + h * stride_lh + q0 + offs_m, lse, mask=in_m)
    o_blk = b * stride_ob + h * stride_oh + (q0 + m64) * stride_om
    o_tile = rows[:, None] * stride_om + offs_ev[None, :] * stride_oe
    o_msk = in_m[:, None] & (offs_ev[None, :] < HEAD_DIM_V)
    out = acc.to(Out.dtype.element_ty)
    tl.store(Out + o_blk + o_tile, out, mask=o_msk)
    if LO_SHIFT != 0:
        tl.store(OutLo + o_blk + o_tile, _encode_lo(acc, out, LO_SHIFT), mask=o_msk)
