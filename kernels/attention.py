"""Fused attention in Triton: forward (tiled online softmax) and flash-attention-2 backward.

Shape legend: B batch, H query heads, Hk key/value heads (H % Hk == 0, GQA group G = H // Hk),
L query length, S key length, E query/key head dim, Ev value head dim (both 1..256, any value).

Launcher contract (shared with the C++ CPU kernels, see fastattn/_cpu.py):

    attention_fwd(q, k, v, mask, *, scale, is_causal, dropout_p, seed, return_lo=False, causal_offset=0)
        -> (out, lse), or (out, lse, out_lo) with return_lo
    attention_bwd(dout, q, k, v, out, lse, mask, *, scale, is_causal, dropout_p, seed,
                  mask_needs_grad, out_lo=None, causal_offset=0) -> (dq, dk, dv, dmask | None)

q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev) in any strides (read in place). mask: None or 4-D
with every dim full or 1 (size-1 dims broadcast through stride 0); bool (True = attend) or float
(added to the scaled scores, -inf hides). ``is_causal``: key j visible to query i iff j <= i + causal_offset
(0: top-left, torch's ``is_causal``; S - L: lower-right, torch's ``causal_lower_right``; any int, negative
too). The offset is a runtime argument of the kernels (one compiled kernel serves every offset); every causal
bound below is ``offs_m + causal_offset``: a query block [m, m + BLOCK_M) sees keys [0, m + BLOCK_M + offset),
a key block [n, n + BLOCK_N) is seen by queries [n - offset, L). A block whose key range is empty (rows with
i + offset < 0) runs its loop zero times and stores out = 0, lse = -inf, dq = 0 like any row with no key.
out (B, H, L, Ev) in q's dtype, laid out by ``fastattn._ops.empty_output`` (as torch lays out its own); lse (B, H, L)
float32, natural log, -inf (and out = 0) for rows that see no key. out_lo (fp16 / bf16 training): int16,
laid out as out, the rounding residual of the fp32 result O in units of out's exponent,
round((O - out) * 2^(K - e)) (K = 22 bf16, 25 fp16; csrc/common.h ``encode_lo`` explains it); the backward
reads O back from it.

Kernels (all program ids cast to int64 before pointer arithmetic, fp32 accumulation):

* ``_attn_fwd``        one program per (query block, b, h); loops over the visible key blocks only.
* ``_attn_bwd_preprocess``  delta = rowsum(dO * O) (O from out and out_lo when given).
* ``_attn_bwd_dkdv``   one program per (key block, b, kv head); loops over the group's query heads and
  their query blocks, so dk/dv need no atomics.
* ``_attn_bwd_dq``     one program per (query block, b, h); also stores dS when the float mask needs a
  gradient and is not broadcast.
* ``_attn_bwd_dmask``  one program per dmask tile when the mask is broadcast: loops over the broadcast
  b / h / i / j, recomputing P and dP, and reduces in a fixed order (deterministic).

Dropout uses counter-based Philox4x32-10 (fastattn/_philox.py is the spec): element (b, h, i, j) of the
(B, H, L, S) probability matrix reads word j & 3 of philox((j >> 2, i, h, b), seed); the backward
regenerates the same bits.

Tile sizes live in ``CONFIGS``, one table keyed by kernel, head-dim bucket and dtype class; the
autotuner times the rows allowed for the call's features (dropout / float mask or not) and caches the
choice per head-dim bucket, dtype, length bucket and feature set. Under TRITON_INTERPRET=1 the kernels
run on CPU tensors with ``INTERPRETER_CONFIGS`` and no autotuning. ``kernels/aot.py`` compiles every
row for sm_80 / sm_90 and checks registers, spills, shared memory and tensor-core use.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastattn._ops import empty_output

__all__ = ["attention_fwd", "attention_bwd", "varlen_fwd", "varlen_bwd", "CONFIGS", "INTERPRETER_CONFIGS", "TileConfig", "KERNELS",
           "HEAD_BUCKETS", "head_bucket", "len_bucket", "candidate_configs"]

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_PHILOX_A = tl.constexpr(0xD2511F53)
_PHILOX_B = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)

# Dropout key, threshold and causal offset are plain runtime ints: the JIT would otherwise turn a value of 1
# into a constexpr and mark multiples of 16 as divisible (and compile another variant per value).
_RUNTIME_INTS = ["seed_lo", "seed_hi", "drop_threshold", "causal_offset"]

# Mask kinds (the MASK_KIND constexpr).
_NO_MASK, _BOOL_MASK, _FLOAT_MASK = 0, 1, 2


# ----------------------------------------------------------------------------------------------------
# Tile configurations: the only place block sizes, warps and stages live.
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile (0: the kernel has no key tile)
    num_warps: int
    num_stages: int
    # "all": usable with every feature; "base": only without dropout and float masks (those add a
    # Philox word tile and a float mask tile per step, so larger tiles would spill registers).
    features: str = "all"

    def kwargs(self) -> dict[str, int]:
        return {"BLOCK_M": self.block_m, **({"BLOCK_N": self.block_n} if self.block_n else {})}

    def __str__(self) -> str:
        n = f"x{self.block_n}" if self.block_n else ""
        return f"{self.block_m}{n} w{self.num_warps} s{self.num_stages}"


def _c(*rows: tuple) -> list[TileConfig]:
    return [TileConfig(*r) for r in rows]


_B = "base"
# Keyed by kernel, then by (head-dim bucket, dtype class). The head-dim bucket is the padded head dim
# max(next_pow2(E), next_pow2(Ev)) rounded up to 64, 128 or 256; the dtype class is "16" (fp16/bf16,
# 2-byte tiles on mma/wgmma tensor cores) or "32" (fp32: tf32 or ieee dots, 4-byte tiles).
# Rows: (BLOCK_M, BLOCK_N, num_warps, num_stages[, "base"]). The autotuner times the rows allowed for
# the call's features (see TileConfig.features). Every row compiles for sm_80 and sm_90 without
# register spills and within shared memory (163 KiB / 227 KiB) in its worst feature combination:
# `fastattn kernels` (kernels/aot.py) checks that.
# Forward: large query tiles amortise each K/V load; at E=256 a 64-row tile keeps acc (64 x 256 fp32)
# in registers. dK/dV hold two fp32 (BLOCK_N x E) accumulators plus K and V, so key tiles are smaller,
# and 32-key tiles once dropout/float-mask tiles join them. dQ is the forward's shape with one more dot.
CONFIGS: dict[str, dict[tuple[int, str], list[TileConfig]]] = {
    "fwd": {
        (64, "16"): _c((128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 4, 3), (64, 64, 4, 4), (128, 128, 8, 3, _B)),
        (128, "16"): _c((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3)),
        (256, "16"): _c((64, 32, 8, 3), (64, 32, 8, 2), (32, 32, 4, 3), (64, 64, 8, 2, _B)),
        (64, "32"): _c((128, 64, 8, 2), (64, 32, 4, 3)),
        (128, "32"): _c((64, 32, 8, 2), (32, 32, 4, 3), (64, 32, 4, 2, _B)),
        (256, "32"): _c((32, 32, 4, 2), (32, 16, 4, 2), (64, 16, 8, 2, _B)),
    },
    "bwd_preprocess": {
        (64, "16"): _c((128, 0, 4, 1)),
        (128, "16"): _c((128, 0, 4, 1)),
        (256, "16"): _c((64, 0, 4, 1)),
        (64, "32"): _c((128, 0, 4, 1)),
        (128, "32"): _c((64, 0, 4, 1)),
        (256, "32"): _c((32, 0, 4, 1)),
    },
    "bwd_dkdv": {
        (64, "16"): _c((32, 128, 8, 1), (16, 128, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2)),
        (128, "16"): _c((32, 64, 8, 2, _B), (16, 64, 8, 2, _B), (16, 32, 8, 2), (16, 32, 4, 2)),
        (256, "16"): _c((32, 16, 8, 1), (32, 16, 4, 1)),
        (64, "32"): _c((16, 32, 4, 2), (16, 32, 8, 2)),
        (128, "32"): _c((16, 32, 8, 2), (32, 32, 4, 2, _B), (16, 32, 4, 2, _B)),
        (256, "32"): _c((16, 16, 4, 1), (32, 32, 8, 1, _B)),
    },
    "bwd_dq": {
        (64, "16"): _c((128, 32, 8, 3), (64, 32, 4, 3)),
        (128, "16"): _c((64, 32, 4, 3), (64, 32, 4, 2), (64, 64, 8, 2, _B)),
        (256, "16"): _c((32, 32, 4, 2), (64, 32, 8, 2, _B), (64, 16, 4, 2, _B)),
        (64, "32"): _c((64, 32, 8, 2), (128, 32, 8, 2, _B)),
        (128, "32"): _c((64, 16, 4, 2), (32, 32, 4, 2), (64, 32, 8, 2, _B)),
        (256, "32"): _c((32, 16, 4, 2), (16, 32, 4, 2)),
    },
    "bwd_dmask": {  # always runs with a float mask
        (64, "16"): _c((32, 32, 4, 2), (64, 32, 4, 2)),
        (128, "16"): _c((32, 32, 4, 2)),
        (256, "16"): _c((16, 32, 4, 1)),
        (64, "32"): _c((16, 32, 4, 2)),
        (128, "32"): _c((16, 32, 8, 2), (32, 16, 4, 1)),
        (256, "32"): _c((16, 32, 8, 1), (32, 16, 8, 1)),
    },
}

# Under TRITON_INTERPRET=1 (CPU tensors): one small config per kernel, no autotuning. Query and key
# tiles differ so the causal block bounds are exercised with BLOCK_M != BLOCK_N.
INTERPRETER_CONFIGS: dict[str, TileConfig] = {
    "fwd": TileConfig(32, 16, 1, 1),
    "bwd_preprocess": TileConfig(32, 0, 1, 1),
    "bwd_dkdv": TileConfig(16, 32, 1, 1),
    "bwd_dq": TileConfig(32, 16, 1, 1),
    "bwd_dmask": TileConfig(32, 32, 1, 1),
}

HEAD_BUCKETS = (64, 128, 256)


def head_bucket(e: int, ev: int) -> int:
    """The config table's head-dim bucket for head dims (E, Ev): 64, 128 or 256."""
    padded = max(_pad_dim(e), _pad_dim(ev))
    for b in HEAD_BUCKETS:
        if padded <= b:
            return b
    raise ValueError(f"head dims up to 256 are supported by the Triton kernels, got E={e}, Ev={ev}")


def len_bucket(n: int) -> int:
    """Sequence-length bucket of the autotuning key: 256, 1024, 4096 or 16384 (and longer)."""
    for b in (256, 1024, 4096):
        if n <= b:
            return b
    return 16384


def dtype_class(dtype: torch.dtype) -> str:
    return "32" if dtype == torch.float32 else "16"


def _pad_dim(e: int) -> int:
    # tl.dot needs every dim >= 16; tiles are powers of two, masked beyond the true head dim.
    return max(16, triton.next_power_of_2(e))


# ----------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------
# Indexing: batch/head ids come from program ids cast to int64 and every block's base pointer is formed
# with int64 scalars (row * stride can exceed 2**31 in (B, S, H, E) views); offsets *inside* a tile stay
# int32 (rows < BLOCK, so they cannot overflow), which keeps address tiles in half the registers.
@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST: the interpreter's tl.dot mishandles bfloat16
    (it multiplies the raw 16-bit patterns), so interpreted bf16 tiles go through fp32 (exact)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _philox_rounds(c0, c1, c2, c3, seed_lo, seed_hi):
    """Philox4x32-10 on uint32 counter tiles (the round of fastattn/_philox.py)."""
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _PHILOX_A)
        lo0 = c0 * _PHILOX_A
        hi2 = tl.umulhi(c2, _PHILOX_B)
        lo2 = c2 * _PHILOX_B
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + _PHILOX_W0
        k1 = k1 + _PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _philox_keep(b, h, offs_m, start_n, seed_lo, seed_hi, threshold,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Dropout keep-mask for query rows offs_m and keys start_n + [0, BLOCK_N): (BLOCK_M, BLOCK_N), or
    (BLOCK_N, BLOCK_M) if TRANSPOSED. Element (i, j) keeps iff word j & 3 of Philox4x32-10 at counter
    (j >> 2, i, h, b) is >= threshold."""
    if TRANSPOSED:
        # (key, query) tiles of the dK/dV kernel are small: evaluate each element's counter and pick
        # its word (no cross-thread interleave, fewer live registers than the shuffle below).
        offs_n = start_n + tl.arange(0, BLOCK_N)
        zero = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.uint32)
        c0, c1, c2, c3 = _philox_rounds(zero + (offs_n // 4).to(tl.uint32)[:, None],
                                        zero + offs_m.to(tl.uint32)[None, :],
                                        zero + h.to(tl.uint32), zero + b.to(tl.uint32), seed_lo, seed_hi)
        w = (offs_n % 4)[:, None]
        words = tl.where(w == 0, c0, tl.where(w == 1, c1, tl.where(w == 2, c2, c3)))
    else:
        # One call per 4 consecutive keys, the 4 words interleaved along the key axis.
        tl.static_assert(BLOCK_N % 4 == 0)
        N4: tl.constexpr = BLOCK_N // 4
        zero = tl.zeros((BLOCK_M, N4), dtype=tl.uint32)
        c0, c1, c2, c3 = _philox_rounds(zero + ((start_n // 4) + tl.arange(0, N4)).to(tl.uint32)[None, :],
                                        zero + offs_m.to(tl.uint32)[:, None],
                                        zero + h.to(tl.uint32), zero + b.to(tl.uint32), seed_lo, seed_hi)
        # [..., k, l] = word 2k + l, flattened: key 4t + w reads word w of counter t.
        words = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (BLOCK_M, BLOCK_N))
    return words >= threshold.to(tl.uint32)


@triton.jit
def _mask_tile(M_tile, rows, cols, in_m, in_n, stride_mm, stride_mn,
               KEYS_ONLY: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Mask values of a score tile (rows x cols), or of its transpose (cols x rows). M_tile points at
    the tile's first element; KEYS_ONLY: the mask is broadcast over queries, one row is read."""
    if KEYS_ONLY:
        mv = tl.load(M_tile + cols * stride_mn, mask=in_n, other=0)
        if TRANSPOSED:
            return mv[:, None]
        else:
            return mv[None, :]
    else:
        if TRANSPOSED:
            return tl.load(M_tile + cols[:, None] * stride_mn + rows[None, :] * stride_mm,
                           mask=in_n[:, None] & in_m[None, :], other=0)
        else:
            return tl.load(M_tile + rows[:, None] * stride_mm + cols[None, :] * stride_mn,
                           mask=in_m[:, None] & in_n[None, :], other=0)


@triton.jit
def _apply_mask(s, mv, MASK_KIND: tl.constexpr):
    """Scores in log2 units with the mask applied: bool hides (-inf), float adds (times log2(e))."""
    if MASK_KIND == 1:
        s = tl.where(mv != 0, s, float("-inf"))
    elif MASK_KIND == 2:
        s = s + mv.to(tl.float32) * _LOG2E
    return s


@triton.jit
def _kv_range(KVRange, b, h, stride_rb, stride_rh, S, KEYS_ONLY: tl.constexpr):
    """[lo, hi): the keys a key-only mask leaves visible for (b, h) (padding); else [0, S)."""
    if KEYS_ONLY:
        r = KVRange + b * stride_rb + h * stride_rh
        lo = tl.load(r)
        hi = tl.load(r + 1)
    else:
        lo = 0
        hi = S
    return lo, hi


@triton.jit
def _seq_bounds(Cu, b, n, VARLEN: tl.constexpr):
    """(first row, length) of batch item b: rows Cu[b]..Cu[b+1] of a packed (varlen) batch, else (0, n)."""
    if VARLEN:
        start = tl.load(Cu + b)
        length = tl.load(Cu + b + 1) - start
        start = start.to(tl.int64)
    else:
        start = 0
        length = n
    return start, length


@triton.jit
def _load_row_stats(Lse, Delta, off_bhl, offs_m, in_m):
    """(lse in log2 units, delta) of query rows offs_m. Rows with no visible key (lse = -inf) and rows
    past L get lse = +inf, so their probabilities exp2(s - lse) are exactly 0."""
    lse = tl.load(Lse + off_bhl + offs_m, mask=in_m, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    delta = tl.load(Delta + off_bhl + offs_m, mask=in_m, other=0.0)
    return lse2, delta


@triton.jit
def _scores(x, yt, M_tile, rows, cols, offs_m, offs_n, in_m, in_n, qk_scale, stride_mm, stride_mn, causal_offset,
            MASK_KIND: tl.constexpr, KEYS_ONLY: tl.constexpr, CAUSAL: tl.constexpr,
            TRANSPOSED: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scores x @ yt in log2 units (qk_scale has log2(e) folded in), masked (M_tile: see _mask_tile),
    causal (key j hidden from query i unless j <= i + causal_offset) and with keys past the bound hidden:
    a (query, key) tile (x = q, yt = k^T), or with TRANSPOSED a (key, query) tile (x = k, yt = q^T) whose
    keys past the bound are left as they are (the dK/dV kernel never stores those rows)."""
    s = _dot(x, yt, None, UPCAST_DOT, DOT_PRECISION) * qk_scale
    if MASK_KIND != 0:
        mv = _mask_tile(M_tile, rows, cols, in_m, in_n, stride_mm, stride_mn, KEYS_ONLY, TRANSPOSED)
        s = _apply_mask(s, mv, MASK_KIND)
    if TRANSPOSED:
        if CAUSAL:
            s = tl.where(offs_n[:, None] <= (offs_m + causal_offset)[None, :], s, float("-inf"))
    elif CAUSAL:
        s = tl.where(in_n[None, :] & (offs_n[None, :] <= (offs_m + causal_offset)[:, None]), s, float("-inf"))
    else:
        s = tl.where(in_n[None, :], s, float("-inf"))
    return s


@triton.jit
def _recompute_p(x, yt, u, wt, M_tile, lse2, b, h, rows, cols, offs_m, offs_n, start_n, in_m, in_n,
                 qk_scale, stride_mm, stride_mn, causal_offset, seed_lo, seed_hi, drop_threshold, drop_scale,
                 MASK_KIND: tl.constexpr, KEYS_ONLY: tl.constexpr, CAUSAL: tl.constexpr,
                 DROPOUT: tl.constexpr, TRANSPOSED: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The backward's recomputation of one tile (shared by the dK/dV, dQ and dmask kernels):
    P = exp2(S - lse) from the scores x @ yt (see _scores; lse2 in log2 units, +inf for empty rows) and
    dP = u @ wt (dO V^T; V dO^T when TRANSPOSED). Returns (p, pd, dp): p = P, pd = P o Z (the dropped and
    rescaled probabilities the forward multiplied V by) and dp = dP o Z, Z the dropout keep mask times
    drop_scale; without dropout pd = p and dp = dP."""
    s = _scores(x, yt, M_tile, rows, cols, offs_m, offs_n, in_m, in_n, qk_scale, stride_mm, stride_mn,
                causal_offset, MASK_KIND, KEYS_ONLY, CAUSAL, TRANSPOSED, UPCAST_DOT, DOT_PRECISION)
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
    return p, pd, dp


@triton.jit
def _ds(p, dp, delta, TRANSPOSED: tl.constexpr):
    """dS = P o (dP - delta), delta (one per query row) broadcast along the keys."""
    if TRANSPOSED:
        ds = p * (dp - delta[None, :])
    else:
        ds = p * (dp - delta[:, None])
    return ds


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K_bh, V_bh, M_row, b, h, offs_m, in_m, lo, hi,
               stride_kn, stride_ke, stride_vn, stride_ve, stride_mm, stride_mn, S, qk_scale,
               causal_offset, seed_lo, seed_hi, drop_threshold,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_E: tl.constexpr,
               BLOCK_EV: tl.constexpr, MASK_KIND: tl.constexpr, KEYS_ONLY: tl.constexpr,
               DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, APPLY_CAUSAL: tl.constexpr):
    """Online softmax over key blocks [lo, hi) (lo a multiple of BLOCK_N; none when hi <= lo); scores in
    log2 units; APPLY_CAUSAL hides key j from query i unless j <= i + causal_offset."""
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
        s = _dot(q, kt, None, UPCAST_DOT, DOT_PRECISION) * qk_scale
        if MASK_KIND != 0:
            mv = _mask_tile(M_row + n64 * stride_mn, rows, cols, in_m, in_n, stride_mm, stride_mn,
                            KEYS_ONLY, False)
            s = _apply_mask(s, mv, MASK_KIND)
        if APPLY_CAUSAL:
            s = tl.where(in_n[None, :] & (offs_n[None, :] <= (offs_m + causal_offset)[:, None]), s, float("-inf"))
        else:
            s = tl.where(in_n[None, :], s, float("-inf"))
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
    (csrc/common.h, encode_lo: the same code). Powers of two from the exponent bits, not a division: a
    division of the tile tipped the E=128 forward with dropout and a float mask into spills."""
    h = out.to(tl.float32)
    ex = (h.to(tl.int32, bitcast=True) >> 23) & 0xFF
    inv = ((254 - ex) << 23).to(tl.float32, bitcast=True)  # 2^-e
    m = (o - h) * inv * (1 << LO_SHIFT)
    m = tl.minimum(tl.maximum(m, -32767.0), 32767.0)
    m = (m + 12582912.0) - 12582912.0  # round to nearest even (|m| < 2^22)
    return tl.where((ex >= 1) & (ex <= 253), m, 0.0).to(tl.int16)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attn_fwd(Q, K, V, Mask, KVRange, Out, OutLo, Lse, CuQ, CuK,
              stride_qb, stride_qh, stride_qm, stride_qe,
              stride_kb, stride_kh, stride_kn, stride_ke,
              stride_vb, stride_vh, stride_vn, stride_ve,
              stride_mb, stride_mh, stride_mm, stride_mn,
              stride_rb, stride_rh,
              stride_ob, stride_oh, stride_om, stride_oe,
              stride_lb, stride_lh,
              H, GROUP, L, S, causal_offset, sm_scale, seed_lo, seed_hi, drop_threshold, drop_scale,
              TUNE_HEAD, TUNE_LEN,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_E: tl.constexpr,
              BLOCK_EV: tl.constexpr, MASK_KIND: tl.constexpr, KEYS_ONLY: tl.constexpr,
              IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
              DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              VARLEN: tl.constexpr = False, LO_SHIFT: tl.constexpr = 0):
    """LO_SHIFT != 0 (fp16 / bf16 training): also store out_lo (see _encode_lo) through Out's strides."""
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
    qk_scale = sm_scale * _LOG2E

    # Visible key blocks: the key-only mask's [lo, hi) range, cut by causality at the block's last row
    # (keys j <= start_m + BLOCK_M - 1 + causal_offset). hi <= lo (every row of the block has
    # i + causal_offset < 0, or the mask leaves no key): no iteration, the epilogue stores out = 0, lse = -inf.
    lo, hi = _kv_range(KVRange, b, h, stride_rb, stride_rh, S, KEYS_ONLY)
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
                               HEAD_DIM, HEAD_DIM_V, BLOCK_E, BLOCK_EV, MASK_KIND, KEYS_ONLY,
                               DROPOUT, UPCAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, IS_CAUSAL)

    # Rows that saw no visible key: out = 0, lse = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if DROPOUT:
        acc = acc * (drop_scale / l_safe)[:, None]
    else:
        acc = acc * (1.0 / l_safe)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
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


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------
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


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attn_bwd_dkdv(Q, K, V, Mask, KVRange, DO, Lse, Delta, DK, DV, CuQ, CuK,
                   stride_qb, stride_qh, stride_qm, stride_qe,
                   stride_kb, stride_kh, stride_kn, stride_ke,
                   stride_vb, stride_vh, stride_vn, stride_ve,
                   stride_mb, stride_mh, stride_mm, stride_mn,
                   stride_rb, stride_rh,
                   stride_dob, stride_doh, stride_dom, stride_doe,
                   stride_dkb, stride_dkh, stride_dkn, stride_dke,
                   stride_dvb, stride_dvh, stride_dvn, stride_dve,
                   stride_lb, stride_lh,
                   H, GROUP, L, S, causal_offset, sm_scale, seed_lo, seed_hi, drop_threshold, drop_scale,
                   TUNE_HEAD, TUNE_LEN,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_EV: tl.constexpr, MASK_KIND: tl.constexpr, KEYS_ONLY: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   VARLEN: tl.constexpr = False):
    """dV = sum_h (P o Z)^T dO, dK = scale * sum_h dS^T Q for one key block, summed over the GQA group's
    query heads in order (deterministic, no atomics). Tiles are (key, query): no transposes of P/dS."""
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
    qk_scale = sm_scale * _LOG2E
    q_off = rows[:, None] * stride_qm + offs_e[None, :] * stride_qe
    do_off = rows[:, None] * stride_dom + offs_ev[None, :] * stride_doe

    for g in range(GROUP):
        h = hk * GROUP + g
        Q_bh = Q + b * stride_qb + h * stride_qh + q0 * stride_qm
        DO_bh = DO + b * stride_dob + h * stride_doh + q0 * stride_dom
        M_col = Mask + b * stride_mb + h * stride_mh + start_n.to(tl.int64) * stride_mn
        off_bhl = b * stride_lb + h * stride_lh + q0
        # Query blocks that see this key block: causal skips those above the diagonal (the first query
        # that sees key start_n is start_n - causal_offset, clamped at 0 before the division so it rounds
        # down the same way compiled and interpreted); a key-only mask that hides the whole block skips them
        # all. lo >= hi: no query sees the block, dk = dv = 0 are stored.
        lo = 0
        hi = L
        if KEYS_ONLY:
            klo, khi = _kv_range(KVRange, b, h, stride_rb, stride_rh, S, KEYS_ONLY)
            if (start_n >= khi) | (start_n + BLOCK_N <= klo):
                hi = 0
        if IS_CAUSAL:
            lo = tl.minimum((tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M, hi)
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
            pt, pdt, dpt = _recompute_p(k, tl.trans(q), v, tl.trans(do), M_col + m64 * stride_mm, lse2, b, h,
                                        rows, cols, offs_m, offs_n, start_n, in_m, in_n, qk_scale,
                                        stride_mm, stride_mn, causal_offset, seed_lo, seed_hi, drop_threshold,
                                        drop_scale, MASK_KIND, KEYS_ONLY, IS_CAUSAL, DROPOUT, True, UPCAST_DOT,
                                        DOT_PRECISION, BLOCK_M, BLOCK_N)
            dv = _dot(pdt.to(do.dtype), do, dv, UPCAST_DOT, DOT_PRECISION)
            dst = _ds(pt, dpt, delta, True)
            dk = _dot(dst.to(q.dtype), q, dk, UPCAST_DOT, DOT_PRECISION)

    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + n64 * stride_dkn
             + cols[:, None] * stride_dkn + offs_e[None, :] * stride_dke,
             dk.to(DK.dtype.element_ty), mask=in_n[:, None] & (offs_e[None, :] < HEAD_DIM))
    tl.store(DV + b * stride_dvb + hk * stride_dvh + n64 * stride_dvn
             + cols[:, None] * stride_dvn + offs_ev[None, :] * stride_dve,
             dv.to(DV.dtype.element_ty), mask=in_n[:, None] & (offs_ev[None, :] < HEAD_DIM_V))


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attn_bwd_dq(Q, K, V, Mask, KVRange, DO, Lse, Delta, DQ, DMask, CuQ, CuK,
                 stride_qb, stride_qh, stride_qm, stride_qe,
                 stride_kb, stride_kh, stride_kn, stride_ke,
                 stride_vb, stride_vh, stride_vn, stride_ve,
                 stride_mb, stride_mh, stride_mm, stride_mn,
                 stride_rb, stride_rh,
                 stride_dob, stride_doh, stride_dom, stride_doe,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqe,
                 stride_dmb, stride_dmh, stride_dmm, stride_dmn,
                 stride_lb, stride_lh,
                 H, GROUP, L, S, causal_offset, sm_scale, seed_lo, seed_hi, drop_threshold, drop_scale,
                 TUNE_HEAD, TUNE_LEN,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_E: tl.constexpr,
                 BLOCK_EV: tl.constexpr, MASK_KIND: tl.constexpr, KEYS_ONLY: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, STORE_DS: tl.constexpr,
                 UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr = False):
    """dQ = scale * dS K for one query block, dS = P o (dP - delta); with STORE_DS also writes dS as
    the gradient of a (non-broadcast) float mask."""
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
    qk_scale = sm_scale * _LOG2E

    lo, hi = _kv_range(KVRange, b, h, stride_rb, stride_rh, S, KEYS_ONLY)
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
        p, _, dp = _recompute_p(q, kt, do, vt, M_row + n64 * stride_mn, lse2, b, h, rows, cols, offs_m, offs_n,
                                start_n, in_m, in_n, qk_scale, stride_mm, stride_mn, causal_offset, seed_lo,
                                seed_hi, drop_threshold, drop_scale, MASK_KIND, KEYS_ONLY, IS_CAUSAL, DROPOUT, False,
                                UPCAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N)
        ds = _ds(p, dp, delta, False)
        if STORE_DS:
            tl.store(DM_row + n64 * stride_dmn + rows[:, None] * stride_dmm + cols[None, :] * stride_dmn,
                     ds.to(DMask.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])
        dq = _dot(ds.to(kt.dtype), tl.trans(kt), dq, UPCAST_DOT, DOT_PRECISION)
    dq = dq * sm_scale
    in_m = rows < L - start_m  # recomputed after the loop, as in the forward's epilogue
    tl.store(DQ + b * stride_dqb + h * stride_dqh + (q0 + m64) * stride_dqm
             + rows[:, None] * stride_dqm + offs_e[None, :] * stride_dqe,
             dq.to(DQ.dtype.element_ty), mask=in_m[:, None] & (offs_e[None, :] < HEAD_DIM))


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attn_bwd_dmask(Q, K, V, Mask, DO, Lse, Delta, DMask, CuQ, CuK,
                    stride_qb, stride_qh, stride_qm, stride_qe,
                    stride_kb, stride_kh, stride_kn, stride_ke,
                    stride_vb, stride_vh, stride_vn, stride_ve,
                    stride_mb, stride_mh, stride_mm, stride_mn,
                    stride_dob, stride_doh, stride_dom, stride_doe,
                    stride_dmb, stride_dmh, stride_dmm, stride_dmn,
                    stride_lb, stride_lh,
                    B, H, GROUP, L, S, Hm, causal_offset, sm_scale, seed_lo, seed_hi, drop_threshold, drop_scale,
                    TUNE_HEAD, TUNE_LEN,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_E: tl.constexpr,
                    BLOCK_EV: tl.constexpr, BCAST_B: tl.constexpr, BCAST_H: tl.constexpr,
                    BCAST_M: tl.constexpr, BCAST_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr = False):
    """Gradient of a broadcast float mask: one program per dmask tile (row / column / element when the
    query / key dim is broadcast) sums dS = P o (dP - delta) over the broadcast b, h, i, j in a fixed
    order, recomputing P and dP (no atomics: deterministic)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    bm = pid_bh // Hm
    hm = pid_bh % Hm
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    qk_scale = sm_scale * _LOG2E
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
                for start_n in range(n_lo, n_end, BLOCK_N):
                    n64 = tl.cast(start_n, tl.int64)
                    offs_n = start_n + cols
                    in_n = offs_n < Sb
                    kt = tl.load(K_bh + n64 * stride_kn + cols[None, :] * stride_kn + offs_e[:, None] * stride_ke,
                                 mask=in_n[None, :] & (offs_e[:, None] < HEAD_DIM), other=0.0)
                    vt = tl.load(V_bh + n64 * stride_vn + cols[None, :] * stride_vn + offs_ev[:, None] * stride_ve,
                                 mask=in_n[None, :] & (offs_ev[:, None] < HEAD_DIM_V), other=0.0)
                    p, _, dp = _recompute_p(q, kt, do, vt, M_bh + m64 * stride_mm + n64 * stride_mn, lse2, b64,
                                            h64, rows, cols, offs_m, offs_n, start_n, in_m, in_n, qk_scale,
                                            stride_mm, stride_mn, causal_offset, seed_lo, seed_hi, drop_threshold,
                                            drop_scale, 2, False, IS_CAUSAL, DROPOUT, False, UPCAST_DOT,
                                            DOT_PRECISION, BLOCK_M, BLOCK_N)
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
    return name == "bwd_dmask" or bool(args.get("DROPOUT")) or args.get("MASK_KIND") == _FLOAT_MASK


def candidate_configs(name: str, head: int, dtype: torch.dtype, heavy: bool) -> list[TileConfig]:
    """The CONFIGS rows the autotuner may pick for kernel ``name`` with these features."""
    rows = CONFIGS[name][(head, dtype_class(dtype))]
    return [c for c in rows if c.features == "all" or not heavy]


def _make_tuned(name: str):
    fn = KERNELS[name]
    unique = list(dict.fromkeys(c for rows in CONFIGS[name].values() for c in rows))
    by_tile = {c: _triton_config(c) for c in unique}

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        dtype = args["Q"].dtype if "Q" in args else args["Out"].dtype
        return [by_tile[c] for c in candidate_configs(name, args["TUNE_HEAD"], dtype, _heavy(name, args))]

    key = [k for k in ("TUNE_HEAD", "TUNE_LEN", "IS_CAUSAL", "MASK_KIND", "DROPOUT", "VARLEN") if k in fn.arg_names]
    return triton.autotune(list(by_tile.values()), key=key, prune_configs_by={"early_config_prune": prune})(fn)


def _interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return _INTERPRETED


def _is_interpreted(fn) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - older layouts
        return False
    return isinstance(fn, InterpretedFunction)


_INTERPRETED = _is_interpreted(_attn_fwd)


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


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _mask_strides(mask: torch.Tensor) -> tuple[int, int, int, int]:
    # Size-1 dims broadcast: read with stride 0 whatever their stored stride.
    return tuple(0 if n == 1 else st for n, st in zip(mask.shape, mask.stride()))  # type: ignore[return-value]


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

    def common(self, scale: float) -> dict:
        return dict(H=self.H, GROUP=self.H // self.Hk, L=self.L, S=self.S, causal_offset=self.causal_offset,
                    sm_scale=scale, seed_lo=self.seed_lo, seed_hi=self.seed_hi, drop_threshold=self.drop_threshold,
                    drop_scale=self.drop_scale, TUNE_HEAD=head_bucket(self.E, self.Ev),
                    TUNE_LEN=len_bucket(max(self.L, self.S)))


def _kv_range_of(mask: torch.Tensor, S: int) -> torch.Tensor:
    """(Bm, Hm, 2) int32: [first, last + 1) of the keys a query-broadcast mask leaves visible per
    (b, h); (0, 0) when none. Key blocks outside it are skipped (padding costs nothing)."""
    rows = mask[:, :, 0, :]
    visible = rows if rows.dtype == torch.bool else rows > float("-inf")
    if visible.shape[-1] != S:  # key dim broadcast: all or nothing
        visible = visible.expand(*visible.shape[:-1], S)
    idx = torch.arange(S, device=mask.device, dtype=torch.int32)
    hi = torch.where(visible, idx + 1, 0).amax(-1)
    lo = torch.where(visible, idx, S).amin(-1)
    lo = torch.minimum(lo, hi)
    return torch.stack([lo, hi], -1).to(torch.int32).contiguous()


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


def _causal_offset(causal_offset: int, is_causal: bool, L: int, S: int) -> int:
    """The kernels' causal_offset: 0 without causality, else clamped to [-L, S]. Exact: with offset >= S - 1
    every query sees every key, with offset <= -L none sees any; the clamp keeps offs_m + causal_offset and
    start_m + BLOCK_M + causal_offset in int32."""
    off = operator.index(causal_offset)
    return min(max(off, -L), S) if is_causal else 0


def _problem(q, k, v, mask, is_causal: bool, dropout_p: float, seed: int, vl: _Varlen | None = None,
             causal_offset: int = 0) -> _Problem:
    B, H, Hk, L, S, E, Ev = _dims(q, k, v, vl)
    if E > 256 or Ev > 256:
        raise ValueError(f"the Triton kernels support head dims up to 256, got E={E}, Ev={Ev}")
    if H % Hk:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hk})")
    if mask is None:
        mask_kind, mask_t, mstr, keys_only = _NO_MASK, q, (0, 0, 0, 0), False
    else:
        if mask.dim() != 4:
            raise ValueError(f"mask must be 4-D (B|1, H|1, L|1, S|1), got shape {tuple(mask.shape)}")
        mask_kind = _BOOL_MASK if mask.dtype == torch.bool else _FLOAT_MASK
        mask_t, mstr = mask, _mask_strides(mask)
        keys_only = mask.shape[2] == 1
    if keys_only:
        kv_range = _kv_range_of(mask_t, S)
        rstr = (kv_range.stride(0) if kv_range.shape[0] > 1 else 0,
                kv_range.stride(1) if kv_range.shape[1] > 1 else 0)
    else:
        kv_range, rstr = torch.zeros(2, dtype=torch.int32, device=q.device), (0, 0)
    dropout = dropout_p > 0.0
    if dropout:
        seed_lo, seed_hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
        threshold = min(int(math.floor(dropout_p * 2.0**32)), 0xFFFFFFFF)
        drop_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    else:
        seed_lo = seed_hi = threshold = 0
        drop_scale = 1.0
    if q.dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:
        precision = "ieee"
    constexprs = dict(HEAD_DIM=E, HEAD_DIM_V=Ev, BLOCK_E=_pad_dim(E), BLOCK_EV=_pad_dim(Ev),
                      IS_CAUSAL=bool(is_causal), DROPOUT=dropout,
                      UPCAST_DOT=_interpreting() and q.dtype == torch.bfloat16, DOT_PRECISION=precision)
    return _Problem(B, H, Hk, L, S, E, Ev, mask_t, mask_kind, mstr, keys_only, kv_range, rstr,
                    seed_lo, seed_hi, threshold, drop_scale, _causal_offset(causal_offset, is_causal, L, S),
                    constexprs)


@dataclass
class _Launch:
    """One kernel launch: table name, grid as a function of (BLOCK_M, BLOCK_N), keyword arguments."""
    name: str
    grid: object
    args: dict


# K of the out_lo code (module doc; csrc/common.h explains the choice): |O - out| < one ulp of out, 2^(e-7)
# (bf16) or 2^(e-10) (fp16, normal out), whatever the rounding (the interpreter truncates to bf16), so
# |out_lo| < 2^15 and out + out_lo * 2^(e-K) is O to ~2^-23 relative.
_LO_SHIFT = {torch.bfloat16: 22, torch.float16: 25}


def _lo_args(out: torch.Tensor, out_lo: torch.Tensor | None) -> dict:
    """OutLo / LO_SHIFT of the forward and preprocess kernels (out stands in for an absent out_lo)."""
    if out_lo is None:
        return dict(OutLo=out, LO_SHIFT=0)
    return dict(OutLo=out_lo, LO_SHIFT=_LO_SHIFT[out.dtype])


def _lo_like(out: torch.Tensor) -> torch.Tensor:
    """An int16 out_lo buffer in out's strides (the return_lo forwards' third output)."""
    if out.dtype not in _LO_SHIFT:
        raise TypeError(f"return_lo needs float16 or bfloat16 inputs, got {out.dtype}")
    return torch.empty_like(out, dtype=torch.int16)  # out is dense: its strides are kept


def _lo_as_out(out_lo: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor | None:
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
              vl: _Varlen | None = None, out_lo: torch.Tensor | None = None, causal_offset: int = 0) -> list[_Launch]:
    """Launches of the forward; ``vl``: q/k/v/out are packed (see _Varlen), lse is (H, total_q). ``out_lo``
    (int16, out's strides): also store the residual code there."""
    B, H, _, L, _, _, _ = _dims(q, k, v, vl)
    pb = _problem(q, k, v, mask, is_causal, dropout_p, seed, vl, causal_offset)
    return [_Launch("fwd", lambda bm, bn: (triton.cdiv(L, bm), B * H), dict(
        Q=q, K=k, V=v, Mask=pb.mask, KVRange=pb.kv_range, Out=out, Lse=lse, **_lo_args(out, out_lo),
        **_named_strides("q", _strides4(q, vl)), **_named_strides("k", _strides4(k, vl)),
        **_named_strides("v", _strides4(v, vl)),
        **_named_strides("m", pb.mask_strides), stride_rb=pb.kv_range_strides[0],
        stride_rh=pb.kv_range_strides[1], **_named_strides("o", _strides4(out, vl)),
        **_seq_args(lse, vl, pb.kv_range),
        **pb.common(scale), **pb.constexprs, MASK_KIND=pb.mask_kind, KEYS_ONLY=pb.keys_only))]


def _bwd_plan(dout, q, k, v, out, lse, mask, dq, dk, dv, dmask, delta, *, scale, is_causal, dropout_p,
              seed, vl: _Varlen | None = None, out_lo: torch.Tensor | None = None,
              causal_offset: int = 0) -> list[_Launch]:
    """Launches of the backward; ``vl``: packed tensors, lse and delta (H, total_q). ``out_lo``: the forward's
    (out's strides), or None."""
    B, H, Hk, L, S, _, Ev = _dims(q, k, v, vl)
    pb = _problem(q, k, v, mask, is_causal, dropout_p, seed, vl, causal_offset)
    common = pb.common(scale)
    seq = _seq_args(lse, vl, pb.kv_range)
    do_st = _strides4(dout, vl)
    plan = [_Launch("bwd_preprocess", lambda bm, bn: (triton.cdiv(L, bm), B * H), dict(
        Out=out, DO=dout, Delta=delta, **_named_strides("o", _strides4(out, vl)), **_lo_args(out, out_lo),
        stride_db=do_st[0], stride_dh=do_st[1], stride_dm=do_st[2], stride_de=do_st[3],
        H=H, L=L, TUNE_HEAD=common["TUNE_HEAD"], TUNE_LEN=common["TUNE_LEN"],
        HEAD_DIM_V=Ev, BLOCK_EV=pb.constexprs["BLOCK_EV"], CuQ=seq["CuQ"], stride_lb=seq["stride_lb"],
        stride_lh=seq["stride_lh"], VARLEN=seq["VARLEN"]))]
    # Arguments shared by the dK/dV, dQ and dmask kernels.
    shared = dict(Q=q, K=k, V=v, Mask=pb.mask, DO=dout, Lse=lse, Delta=delta,
                  **_named_strides("q", _strides4(q, vl)), **_named_strides("k", _strides4(k, vl)),
                  **_named_strides("v", _strides4(v, vl)),
                  **_named_strides("m", pb.mask_strides), **_named_strides("do", do_st),
                  **common, **pb.constexprs, **seq)
    masked = dict(KVRange=pb.kv_range, stride_rb=pb.kv_range_strides[0], stride_rh=pb.kv_range_strides[1],
                  MASK_KIND=pb.mask_kind, KEYS_ONLY=pb.keys_only)
    plan.append(_Launch("bwd_dkdv", lambda bm, bn: (triton.cdiv(S, bn), B * Hk), dict(
        **shared, **masked, DK=dk, DV=dv, **_named_strides("dk", _strides4(dk, vl)),
        **_named_strides("dv", _strides4(dv, vl)))))
    # dS comes straight from the dQ kernel when every (b, h, i, j) owns its mask element; a broadcast
    # mask's gradient is a reduction, done by the dmask kernel.
    bcast = [n == 1 and full > 1 for n, full in zip(mask.shape, (B, H, L, S))] if dmask is not None else []
    store_ds = dmask is not None and not any(bcast)
    plan.append(_Launch("bwd_dq", lambda bm, bn: (triton.cdiv(L, bm), B * H), dict(
        **shared, **masked, DQ=dq, DMask=dmask if store_ds else dq, **_named_strides("dq", _strides4(dq, vl)),
        **_named_strides("dm", _mask_strides(dmask) if store_ds else (0, 0, 0, 0)), STORE_DS=store_ds)))
    if dmask is not None and not store_ds:
        Bm, Hm, Lm, Sm = mask.shape
        plan.append(_Launch("bwd_dmask", lambda bm, bn: (triton.cdiv(Lm, bm), triton.cdiv(Sm, bn), Bm * Hm), dict(
            **shared, DMask=dmask, **_named_strides("dm", _mask_strides(dmask)), B=B, Hm=Hm,
            BCAST_B=bcast[0], BCAST_H=bcast[1], BCAST_M=bcast[2], BCAST_N=bcast[3])))
    return plan


def _named_strides(prefix: str, t) -> dict[str, int]:
    names = {"q": "qb qh qm qe", "k": "kb kh kn ke", "v": "vb vh vn ve", "o": "ob oh om oe",
             "do": "dob doh dom doe", "dq": "dqb dqh dqm dqe", "dk": "dkb dkh dkn dke",
             "dv": "dvb dvh dvn dve", "m": "mb mh mm mn", "dm": "dmb dmh dmm dmn"}[prefix].split()
    st = t.stride() if isinstance(t, torch.Tensor) else t
    return {f"stride_{n}": int(x) for n, x in zip(names, st)}


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                  scale: float, is_causal: bool, dropout_p: float, seed: int, return_lo: bool = False,
                  causal_offset: int = 0):
    """Attention forward: (out (B, H, L, Ev) in q's dtype, lse (B, H, L) float32), and out_lo (int16, out's
    layout) last with ``return_lo`` (fp16 / bf16 training). ``causal_offset`` (with ``is_causal``): key j is
    visible to query i iff j <= i + causal_offset (S - L: lower-right). See the module doc."""
    B, H, L, _ = q.shape
    S, Ev = k.shape[2], v.shape[3]
    out = empty_output(q, v, dropout_p)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    lo = _lo_like(out) if return_lo else None
    res = (out, lse) if lo is None else (out, lse, lo)
    if B * H * L == 0:
        return res
    if S == 0:  # every row sees no key
        out.zero_()
        lse.fill_(float("-inf"))
        if lo is not None:
            lo.zero_()
        return res
    for launch in _fwd_plan(q, k, v, mask, out, lse, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
                            seed=seed, out_lo=lo, causal_offset=causal_offset):
        _launch(launch.name, launch.grid, **launch.args)
    return res


def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, mask: torch.Tensor | None, *, scale: float, is_causal: bool,
                  dropout_p: float, seed: int, mask_needs_grad: bool, out_lo: torch.Tensor | None = None,
                  causal_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Attention backward: (dq, dk, dv, dmask or None), contiguous. dk/dv are summed over each GQA group;
    dmask (float masks, when ``mask_needs_grad``) has the mask's shape and dtype, broadcast dims summed.
    ``out_lo``: the forward's residual code (``return_lo``), for delta from the fp32 output. ``causal_offset``:
    the forward's. Deterministic: no atomics, fixed reduction order."""
    out_lo = _lo_as_out(out_lo, out)
    B, H, L, _ = q.shape
    S = k.shape[2]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dmask = None
    if mask_needs_grad and mask is not None and mask.dtype != torch.bool:
        # Zeros: tiles the dQ kernel skips (hidden by causality or padding) have dS = 0.
        dmask = torch.zeros(mask.shape, dtype=mask.dtype, device=mask.device)
    if B * H * L == 0 or S == 0:
        for t in (dq, dk, dv):
            t.zero_()
        return dq, dk, dv, dmask
    lse = lse.contiguous()  # (B, H, L) float32, indexed as (b * H + h) * L + i; a no-op when it is
    delta = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    for launch in _bwd_plan(dout, q, k, v, out, lse, mask, dq, dk, dv, dmask, delta, scale=scale,
                            is_causal=is_causal, dropout_p=dropout_p, seed=seed, out_lo=out_lo,
                            causal_offset=causal_offset):
        _launch(launch.name, launch.grid, **launch.args)
    return dq, dk, dv, dmask


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
    lo = _lo_like(out) if return_lo else None
    res = (out, lse) if lo is None else (out, lse, lo)
    if total_q * H == 0:
        return res
    if k.shape[0] == 0 or max_k == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        if lo is not None:
            lo.zero_()
        return res
    vl = _Varlen(cu_q, cu_k, cu_q.numel() - 1, int(max_q), int(max_k))
    for launch in _fwd_plan(q, k, v, mask, out, lse, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
                            seed=seed, vl=vl, out_lo=lo):
        _launch(launch.name, launch.grid, **launch.args)
    return res


def varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
               mask: torch.Tensor | None, *, scale: float, is_causal: bool, dropout_p: float, seed: int,
               mask_needs_grad: bool, out_lo: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`varlen_fwd`: (dq, dk, dv, dmask or None), contiguous, deterministic. ``out_lo``:
    as for :func:`attention_bwd`."""
    out_lo = _lo_as_out(out_lo, out)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dmask = None
    if mask_needs_grad and mask is not None and mask.dtype != torch.bool:
        dmask = torch.zeros(mask.shape, dtype=mask.dtype, device=mask.device)
    if q.shape[0] * q.shape[1] == 0 or k.shape[0] == 0 or max_q == 0 or max_k == 0:
        for t in (dq, dk, dv):
            t.zero_()
        return dq, dk, dv, dmask
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    vl = _Varlen(cu_q, cu_k, cu_q.numel() - 1, int(max_q), int(max_k))
    for launch in _bwd_plan(dout, q, k, v, out, lse, mask, dq, dk, dv, dmask, delta, scale=scale,
                            is_causal=is_causal, dropout_p=dropout_p, seed=seed, vl=vl, out_lo=out_lo):
        _launch(launch.name, launch.grid, **launch.args)
    return dq, dk, dv, dmask
