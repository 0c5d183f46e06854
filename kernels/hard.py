"""Hard (top-k) attention in Triton: fused forward (streaming top-k per query row) and backward.

Shape legend: B batch, H query heads, Hk key/value heads (GQA group G = H // Hk), L query length, S key
length, E / Ev head dims (<= 256), K = top_k (<= 64), K_PAD = next_pow2(K).

Launcher contract (the same as the C++ kernels', see fastattn/hard.py):

    hard_fwd(q, k, v, mask, *, scale, is_causal, top_k) -> (out, idx, prob)
    hard_bwd(dout, q, k, v, idx, prob, *, scale, top_k) -> (dq, dk, dv, ds)

Kernels (program ids cast to int64 before pointer arithmetic, fp32 scores and accumulators):

* ``_hard_fwd``   one program per (query block, b, h). Streams key blocks: s = scale q.k + mask (hidden,
  causal, out-of-range: -inf; NaN: -inf). top_k = 1 keeps a running (max, argmax) per row (the argmax of
  a block is the lowest index among its maxima; a later block must beat the running max strictly, so
  ties go to the lowest index). top_k > 1 keeps a (BLOCK_M, K_PAD) tile of candidate scores/indices and
  merges each key block by repeatedly taking the block's best remaining key (lowest index among equals)
  while it strictly beats the row's worst kept candidate (lowest score, highest index among equals).
  At the end the kept set is emitted best first (ties: lowest index), softmax'd, and the value rows are
  gathered: out = sum_t p_t v_{j_t}. Writes idx (B, H, L, K) int32 (-1 unused), prob float32.
* ``_hard_bwd_dq``  (top_k > 1) one program per (query block, b, h): dp_t = dO.v_{j_t},
  ds_t = p_t (dp_t - sum_u p_u dp_u) (stored, float32), dq = scale sum_t ds_t k_{j_t}.
* ``_hard_bwd_dkdv``  one program per (key block, b, kv head): scans the group's saved indices block by
  block, builds the (BLOCK_N, BLOCK_M) weights W[j, i] = sum_t p_it [j_it = j] (and the same with
  scale ds_it), and accumulates dv += W @ dO, dk += W_ds @ Q with fp32 ieee dots. Each key block is owned
  by one program and the scan order is fixed, so dk/dv are deterministic (no atomics). With a causal
  forward, query blocks before the key block are skipped (they cannot have selected it).

top_k = 1 has zero dq/dk/ds (the launcher zero-fills them and runs only the dv part).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import dot_precision, import_in_current_mode, is_interpreted, named_strides

# Reloading this module after TRITON_INTERPRET changed re-decorates the kernels in the new mode.
import_in_current_mode(__package__, ("_tile",))

from ._masking import mask_args  # noqa: E402
from ._tile import LOG2E, _dot  # noqa: E402
from .configs import HARD_INTERPRETER_CONFIG, hard_bwd_config, hard_fwd_config, pad_dim  # noqa: E402

__all__ = ["hard_fwd", "hard_bwd", "fwd_config", "bwd_config", "MAX_TOP_K"]

MAX_TOP_K = 64
_BIG = tl.constexpr(1 << 30)  # index of unused candidate slots (> any key index; S < 2**30)


def fwd_config(k_pad: int, head: int, fp32: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward (``head``: padded max(E, Ev); kernels/configs.py)."""
    return HARD_INTERPRETER_CONFIG if _interpreting() else hard_fwd_config(k_pad, head, fp32)


def bwd_config(head: int, fp32: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of both backward kernels (kernels/configs.py)."""
    return HARD_INTERPRETER_CONFIG if _interpreting() else hard_bwd_config(head, fp32)


@triton.jit
def _cast(x, ty, RTNE: tl.constexpr):
    """x (fp32) -> ty. RTNE: round to nearest even by hand before a bf16 cast (Triton 3.9's interpreter
    truncates fp32 -> bf16 casts; compiled kernels round to nearest even and never set this)."""
    if RTNE:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        x = u.to(tl.float32, bitcast=True)
    return x.to(ty)


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _worst(bs, bi, col_ok):
    """(score, index) of each row's worst kept candidate: lowest score, highest index among equals."""
    wsc = tl.min(tl.where(col_ok, bs, float("inf")), 1)
    wid = tl.max(tl.where(col_ok & (bs == wsc[:, None]), bi, -1), 1)
    return wsc, wid


@triton.jit
def _hard_fwd(Q, K, V, Mask, Out, Idx, Prob,
              stride_qb, stride_qh, stride_qm, stride_qe,
              stride_kb, stride_kh, stride_kn, stride_ke,
              stride_vb, stride_vh, stride_vn, stride_ve,
              stride_mb, stride_mh, stride_mm, stride_mn,
              stride_ob, stride_oh, stride_om, stride_oe,
              H, GROUP, L, S, sm_scale,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_E: tl.constexpr,
              BLOCK_EV: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
              TOP_K: tl.constexpr, K_PAD: tl.constexpr, UPCAST_DOT: tl.constexpr,
              DOT_PRECISION: tl.constexpr, RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.static_assert(K_PAD >= TOP_K)
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    m64 = start_m.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    in_m = offs_m < L
    cols = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)

    q = tl.load(Q + b * stride_qb + h * stride_qh + m64 * stride_qm
                + rows[:, None] * stride_qm + offs_e[None, :] * stride_qe,
                mask=in_m[:, None] & (offs_e[None, :] < HEAD_DIM), other=0.0)
    K_bh = K + b * stride_kb + hk * stride_kh
    V_bh = V + b * stride_vb + hk * stride_vh
    M_row = Mask + b * stride_mb + h * stride_mh + m64 * stride_mm
    kt_off = cols[None, :] * stride_kn + offs_e[:, None] * stride_ke

    kc = tl.arange(0, K_PAD)
    col_ok = (kc < TOP_K)[None, :]
    if TOP_K == 1:
        best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        bidx = tl.full((BLOCK_M,), -1, dtype=tl.int32)
    else:
        bs = tl.full((BLOCK_M, K_PAD), float("-inf"), dtype=tl.float32)
        bi = tl.zeros((BLOCK_M, K_PAD), dtype=tl.int32) + (kc + _BIG)[None, :]

    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        n64 = start_n.to(tl.int64)
        offs_n = start_n + cols
        in_n = offs_n < S
        kt = tl.load(K_bh + n64 * stride_kn + kt_off, mask=in_n[None, :] & (offs_e[:, None] < HEAD_DIM), other=0.0)
        s = _dot(q, kt, None, UPCAST_DOT, DOT_PRECISION) * sm_scale
        if MASK_KIND != 0:
            mv = tl.load(M_row + n64 * stride_mn + rows[:, None] * stride_mm + cols[None, :] * stride_mn,
                         mask=in_m[:, None] & in_n[None, :], other=0)
            if MASK_KIND == 1:
                s = tl.where(mv != 0, s, float("-inf"))
            else:
                s = s + mv.to(tl.float32)
        ok = in_n[None, :] & (s == s)  # NaN scores are never selected
        if IS_CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(ok, s, float("-inf"))
        if TOP_K == 1:
            m_blk = tl.max(s, 1)
            j_blk = tl.min(tl.where(s == m_blk[:, None], offs_n[None, :], _BIG), 1)
            upd = m_blk > best
            best = tl.where(upd, m_blk, best)
            bidx = tl.where(upd, j_blk, bidx)
        else:
            wsc, wid = _worst(bs, bi, col_ok)
            cand = tl.max(s, 1)
            n_taken = 0
            while (tl.max((cand > wsc).to(tl.int32), 0) > 0) & (n_taken < TOP_K):
                cj = tl.min(tl.where(s == cand[:, None], offs_n[None, :], _BIG), 1)
                take = cand > wsc
                hit = (bi == wid[:, None]) & take[:, None]
                bs = tl.where(hit, cand[:, None], bs)
                bi = tl.where(hit, cj[:, None], bi)
                s = tl.where(offs_n[None, :] == cj[:, None], float("-inf"), s)
                wsc, wid = _worst(bs, bi, col_ok)
                cand = tl.max(s, 1)
                n_taken += 1

    O_blk = Out + b * stride_ob + h * stride_oh + m64 * stride_om
    ev_ok = offs_ev[None, :] < HEAD_DIM_V
    row_slots = (pid_bh * L + offs_m.to(tl.int64)) * TOP_K
    if TOP_K == 1:
        valid = best > float("-inf")
        j = tl.where(valid, bidx, -1)
        tl.store(Idx + row_slots, j, mask=in_m)
        tl.store(Prob + row_slots, tl.where(valid, 1.0, 0.0), mask=in_m)
        vrow = tl.load(V_bh + j.to(tl.int64)[:, None] * stride_vn + offs_ev[None, :] * stride_ve,
                       mask=(valid & in_m)[:, None] & ev_ok, other=0.0)
        tl.store(O_blk + rows[:, None] * stride_om + offs_ev[None, :] * stride_oe, vrow.to(Out.dtype.element_ty),
                 mask=in_m[:, None] & ev_ok)
    else:
        valid_k = col_ok & (bs > float("-inf"))
        m = tl.max(tl.where(valid_k, bs, float("-inf")), 1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        e = tl.where(valid_k, tl.math.exp2((bs - m_safe[:, None]) * LOG2E), 0.0)
        den = tl.sum(e, 1)
        p = e / tl.where(den == 0.0, 1.0, den)[:, None]
        rem = tl.where(valid_k, bs, float("-inf"))
        acc = tl.zeros((BLOCK_M, BLOCK_EV), dtype=tl.float32)
        for t in range(TOP_K):  # emit best first: highest score, lowest index among equals
            mx = tl.max(rem, 1)
            jt = tl.min(tl.where(valid_k & (rem == mx[:, None]), bi, _BIG), 1)
            vt = mx > float("-inf")
            pos = (bi == jt[:, None]) & vt[:, None]
            pt = tl.sum(tl.where(pos, p, 0.0), 1)
            rem = tl.where(pos, float("-inf"), rem)
            valid_k = valid_k & ~pos
            jo = tl.where(vt, jt, -1)
            tl.store(Idx + row_slots + t, jo, mask=in_m)
            tl.store(Prob + row_slots + t, pt, mask=in_m)
            vrow = tl.load(V_bh + jt.to(tl.int64)[:, None] * stride_vn + offs_ev[None, :] * stride_ve,
                           mask=(vt & in_m)[:, None] & ev_ok, other=0.0)
            acc += pt[:, None] * vrow.to(tl.float32)
        tl.store(O_blk + rows[:, None] * stride_om + offs_ev[None, :] * stride_oe,
                 _cast(acc, Out.dtype.element_ty, RTNE), mask=in_m[:, None] & ev_ok)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _hard_bwd_dq(K, V, DO, Idx, Prob, DS, DQ,
                 stride_kb, stride_kh, stride_kn, stride_ke,
                 stride_vb, stride_vh, stride_vn, stride_ve,
                 stride_dob, stride_doh, stride_dom, stride_doe,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqe,
                 H, GROUP, L, sm_scale,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_E: tl.constexpr,
                 BLOCK_EV: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, RTNE: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    in_m = offs_m < L
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    e_ok = offs_e[None, :] < HEAD_DIM
    ev_ok = offs_ev[None, :] < HEAD_DIM_V
    kc = tl.arange(0, K_PAD)
    m64 = offs_m.to(tl.int64)
    do = tl.load(DO + b * stride_dob + h * stride_doh + m64[:, None] * stride_dom + offs_ev[None, :] * stride_doe,
                 mask=in_m[:, None] & ev_ok, other=0.0).to(tl.float32)
    K_bh = K + b * stride_kb + hk * stride_kh
    V_bh = V + b * stride_vb + hk * stride_vh
    row_slots = (pid_bh * L + m64) * TOP_K
    dp = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    pp = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    for t in range(TOP_K):
        jt = tl.load(Idx + row_slots + t, mask=in_m, other=-1)
        pt = tl.load(Prob + row_slots + t, mask=in_m, other=0.0)
        vt = jt >= 0
        vrow = tl.load(V_bh + jt.to(tl.int64)[:, None] * stride_vn + offs_ev[None, :] * stride_ve,
                       mask=vt[:, None] & ev_ok, other=0.0).to(tl.float32)
        dpt = tl.sum(do * vrow, 1)
        dp = tl.where(kc[None, :] == t, dpt[:, None], dp)
        pp = tl.where(kc[None, :] == t, pt[:, None], pp)
    delta = tl.sum(pp * dp, 1)
    ds = pp * (dp - delta[:, None])
    dq = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for t in range(TOP_K):
        jt = tl.load(Idx + row_slots + t, mask=in_m, other=-1)
        vt = jt >= 0
        dst = tl.sum(tl.where(kc[None, :] == t, ds, 0.0), 1)
        tl.store(DS + row_slots + t, dst, mask=in_m)
        krow = tl.load(K_bh + jt.to(tl.int64)[:, None] * stride_kn + offs_e[None, :] * stride_ke,
                       mask=vt[:, None] & e_ok, other=0.0).to(tl.float32)
        dq += dst[:, None] * krow
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + m64[:, None] * stride_dqm + offs_e[None, :] * stride_dqe,
             _cast(dq, DQ.dtype.element_ty, RTNE), mask=in_m[:, None] & e_ok)


@triton.jit
def _hard_bwd_dkdv(Q, DO, Idx, Prob, DS, DK, DV,
                   stride_qb, stride_qh, stride_qm, stride_qe,
                   stride_dob, stride_doh, stride_dom, stride_doe,
                   stride_dkb, stride_dkh, stride_dkn, stride_dke,
                   stride_dvb, stride_dvh, stride_dvn, stride_dve,
                   H, GROUP, L, S, sm_scale,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_EV: tl.constexpr, TOP_K: tl.constexpr, IS_CAUSAL: tl.constexpr, RTNE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    pid_bk = tl.program_id(1).to(tl.int64)
    Hk = H // GROUP
    b = pid_bk // Hk
    hk = pid_bk % Hk
    cols = tl.arange(0, BLOCK_N)
    offs_n = start_n + cols
    rows = tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    e_ok = offs_e[None, :] < HEAD_DIM
    ev_ok = offs_ev[None, :] < HEAD_DIM_V
    dv = tl.zeros((BLOCK_N, BLOCK_EV), dtype=tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    lo = 0
    if IS_CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # query i < j never selected key j
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        for start_m in range(lo, L, BLOCK_M):
            offs_m = start_m + rows
            in_m = offs_m < L
            m64 = offs_m.to(tl.int64)
            row_slots = (bh * L + m64) * TOP_K
            w = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            wds = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for t in range(TOP_K):
                jt = tl.load(Idx + row_slots + t, mask=in_m, other=-1)
                sel = jt[None, :] == offs_n[:, None]
                pt = tl.load(Prob + row_slots + t, mask=in_m, other=0.0)
                w = tl.where(sel, pt[None, :], w)
                if TOP_K > 1:
                    dst = tl.load(DS + row_slots + t, mask=in_m, other=0.0)
                    wds = tl.where(sel, dst[None, :], wds)
            do = tl.load(DO + b * stride_dob + h * stride_doh + m64[:, None] * stride_dom
                         + offs_ev[None, :] * stride_doe, mask=in_m[:, None] & ev_ok, other=0.0).to(tl.float32)
            dv = tl.dot(w, do, dv, input_precision="ieee")
            if TOP_K > 1:
                q = tl.load(Q + b * stride_qb + h * stride_qh + m64[:, None] * stride_qm
                            + offs_e[None, :] * stride_qe, mask=in_m[:, None] & e_ok, other=0.0).to(tl.float32)
                dk = tl.dot(wds, q, dk, input_precision="ieee")
    in_n = offs_n < S
    n64 = offs_n.to(tl.int64)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + n64[:, None] * stride_dvn + offs_ev[None, :] * stride_dve,
             _cast(dv, DV.dtype.element_ty, RTNE), mask=in_n[:, None] & ev_ok)
    tl.store(DK + b * stride_dkb + hk * stride_dkh + n64[:, None] * stride_dkn + offs_e[None, :] * stride_dke,
             _cast(dk * sm_scale, DK.dtype.element_ty, RTNE), mask=in_n[:, None] & e_ok)


_INTERPRETED = is_interpreted(_hard_fwd)


def _interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return _INTERPRETED


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _fwd_args(q, k, v, mask_t, mask_kind, mstr, out, idx, prob, scale, is_causal, top_k):
    """(grid, keyword arguments) of the forward launch (also what an AOT compile check needs)."""
    B, H, L, E = q.shape
    Hk, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    k_pad = triton.next_power_of_2(top_k)
    bm, bn, nw, ns = fwd_config(k_pad, max(pad_dim(E), pad_dim(Ev)), q.dtype == torch.float32)
    args = dict(Q=q, K=k, V=v, Mask=mask_t, Out=out, Idx=idx, Prob=prob,
                **named_strides("q", q), **named_strides("k", k), **named_strides("v", v), **named_strides("m", mstr),
                **named_strides("o", out),
                H=H, GROUP=H // Hk, L=L, S=S, sm_scale=float(scale),
                HEAD_DIM=E, HEAD_DIM_V=Ev, BLOCK_E=pad_dim(E), BLOCK_EV=pad_dim(Ev), MASK_KIND=mask_kind,
                IS_CAUSAL=bool(is_causal), TOP_K=top_k, K_PAD=k_pad,
                UPCAST_DOT=_interpreting() and q.dtype == torch.bfloat16, DOT_PRECISION=dot_precision(q.dtype),
                RTNE=_interpreting() and q.dtype == torch.bfloat16, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns)
    return (triton.cdiv(L, bm), B * H), args


def _bwd_args(dout, q, k, v, idx, prob, dq, dk, dv, ds, scale, top_k, is_causal):
    """[(kernel, grid, keyword arguments)] of the backward launches."""
    B, H, L, E = q.shape
    Hk, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    bm, bn, nw, ns = bwd_config(max(pad_dim(E), pad_dim(Ev)), q.dtype == torch.float32)
    common = dict(HEAD_DIM=E, HEAD_DIM_V=Ev, BLOCK_E=pad_dim(E), BLOCK_EV=pad_dim(Ev), TOP_K=top_k,
                  RTNE=_interpreting() and q.dtype == torch.bfloat16, num_warps=nw, num_stages=ns)
    out = []
    if top_k > 1:
        out.append((_hard_bwd_dq, (triton.cdiv(L, bm), B * H), dict(
            K=k, V=v, DO=dout, Idx=idx, Prob=prob, DS=ds, DQ=dq, **named_strides("k", k), **named_strides("v", v),
            **named_strides("do", dout), **named_strides("dq", dq), H=H, GROUP=H // Hk, L=L, sm_scale=float(scale),
            **common, K_PAD=triton.next_power_of_2(top_k), BLOCK_M=bm)))
    out.append((_hard_bwd_dkdv, (triton.cdiv(S, bn), B * Hk), dict(
        Q=q, DO=dout, Idx=idx, Prob=prob, DS=ds, DK=dk, DV=dv, **named_strides("q", q), **named_strides("do", dout),
        **named_strides("dk", dk), **named_strides("dv", dv), H=H, GROUP=H // Hk, L=L, S=S, sm_scale=float(scale),
        **common, IS_CAUSAL=bool(is_causal), BLOCK_M=bm, BLOCK_N=bn)))
    return out


def _check(q, k, v, top_k: int) -> None:
    E, Ev = q.shape[3], v.shape[3]
    if E > 256 or Ev > 256:
        raise ValueError(f"the Triton hard-attention kernels support head dims up to 256, got E={E}, Ev={Ev}")
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be in [1, {MAX_TOP_K}], got {top_k}")
    if k.shape[2] >= 2**30:
        raise ValueError(f"key length must be < 2**30, got {k.shape[2]}")


def hard_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *, scale: float,
             is_causal: bool, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, H, L, Ev), idx (B, H, L, K) int32, prob (B, H, L, K) float32). See the module doc."""
    _check(q, k, v, top_k)
    B, H, L, E = q.shape
    Hk, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    out = q.new_empty(B, L, H, Ev).transpose(1, 2)
    idx = torch.empty(B, H, L, top_k, dtype=torch.int32, device=q.device)
    prob = torch.empty(B, H, L, top_k, dtype=torch.float32, device=q.device)
    if B * H * L == 0:
        return out, idx, prob
    if S == 0:
        out.zero_()
        idx.fill_(-1)
        prob.zero_()
        return out, idx, prob
    mask_t, mstr, mask_kind = mask_args(mask, q)
    grid, args = _fwd_args(q, k, v, mask_t, mask_kind, mstr, out, idx, prob, scale, is_causal, top_k)
    _hard_fwd[grid](**args)
    return out, idx, prob


def hard_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
             prob: torch.Tensor, *, scale: float, top_k: int, is_causal: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, ds), contiguous; ds (B, H, L, K) float32. ``is_causal``: the forward was causal (lets
    the dk/dv kernel skip query blocks that cannot have selected a key block; results are the same)."""
    _check(q, k, v, top_k)
    B, H, L, E = q.shape
    Hk, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    ds = torch.zeros(B, H, L, top_k, dtype=torch.float32, device=q.device)
    if B * H * L == 0 or S == 0:
        dk.zero_()
        dv.zero_()
        return dq, dk, dv, ds
    idx, prob = idx.contiguous(), prob.contiguous()
    for kernel, grid, args in _bwd_args(dout, q, k, v, idx, prob, dq, dk, dv, ds, scale, top_k, is_causal):
        kernel[grid](**args)
    return dq, dk, dv, ds


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile check (no GPU needed): registers / spills / shared memory of every kernel at the
# tile configs above, for sm_80 and sm_90. Run with TRITON_INTERPRET unset:
#     python -c "from fastattn.kernels import hard; hard.print_aot_report()"
# ----------------------------------------------------------------------------------------------------
def aot_report(archs=(80, 90), dtypes=(torch.bfloat16, torch.float32), heads=(64, 128, 256), top_ks=(1, 8, 64)):
    """Rows (dtype, E, top_k, arch, kernel, registers, spill bytes, shared bytes) from compiling each
    kernel as the launchers would call it (causal, full bool mask, BSHD views, GQA 4 -> 2)."""
    import itertools

    from . import aot

    if _interpreting():
        raise RuntimeError("aot_report needs the compiled (not interpreted) kernels: unset TRITON_INTERPRET")

    def compile_one(fn, args, arch):
        args = dict(args)
        nw, ns = args.pop("num_warps"), args.pop("num_stages")
        used = aot.resources(aot.compile_kernel(fn, args, arch, nw, ns), arch)
        return used["registers"], used["spill_bytes"], used["shared"]

    B, H, Hk, L, S = 2, 4, 2, 256, 256
    rows = []
    for dt, E, K, arch in itertools.product(dtypes, heads, top_ks, archs):
        q = torch.empty(B, L, H, E, dtype=dt).transpose(1, 2)
        k = torch.empty(B, S, Hk, E, dtype=dt).transpose(1, 2)
        v = torch.empty(B, S, Hk, E, dtype=dt).transpose(1, 2)
        out = torch.empty(B, L, H, E, dtype=dt).transpose(1, 2)
        idx = torch.empty(B, H, L, K, dtype=torch.int32)
        prob = torch.empty(B, H, L, K)
        mask = torch.ones(B, H, L, S, dtype=torch.bool)
        _, a = _fwd_args(q, k, v, mask, 1, mask.stride(), out, idx, prob, 0.1, True, K)
        launches = [(_hard_fwd, a)]
        dq, dk = torch.empty(B, H, L, E, dtype=dt), torch.empty(B, Hk, S, E, dtype=dt)
        dv = torch.empty_like(dk)
        launches += [(kern, a) for kern, _, a in _bwd_args(out, q, k, v, idx, prob, dq, dk, dv, prob, 0.1, K, True)]
        for fn, a in launches:
            name = fn.fn.__name__ if hasattr(fn, "fn") else str(fn)
            rows.append((str(dt).replace("torch.", ""), E, K, arch, name, *compile_one(fn, a, arch)))
    return rows


def print_aot_report(**kw) -> None:
    for dt, E, K, arch, name, regs, spill, smem in aot_report(**kw):
        print(f"{dt:9s} E{E:<4d} K{K:<3d} sm_{arch} {name:16s} regs {regs:4d} spill {spill:5d} B smem {smem:6d}")
