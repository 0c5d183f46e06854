"""Dropout: counter-based Philox4x32-10 (fastattn/_philox.py is the spec), regenerated in the backward.

Element (b, h, i, j) of the (B, H, L, S) probability matrix is kept iff word j & 3 of
philox((j >> 2, i, h, b), seed) is >= threshold = floor(p * 2^32); kept elements are scaled by 1 / (1 - p).
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

_PHILOX_A = tl.constexpr(0xD2511F53)
_PHILOX_B = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)


def dropout_args(dropout_p: float, seed: int) -> tuple[int, int, int, float]:
    """(seed_lo, seed_hi, threshold, drop_scale) of the kernels: the 64-bit seed as two 32-bit words, the keep
    threshold on a uint32 word and the scale of kept elements; (0, 0, 0, 1.0) without dropout."""
    if not dropout_p > 0.0:
        return 0, 0, 0, 1.0
    seed_lo, seed_hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    threshold = min(int(math.floor(dropout_p * 2.0**32)), 0xFFFFFFFF)
    drop_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    return seed_lo, seed_hi, threshold, drop_scale


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
