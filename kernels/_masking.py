"""Masks: how the launchers pass a mask to the kernels (kind, tensor, broadcast strides, the visible key range
of a padding mask) and the @triton.jit helpers that read and apply it, with causality and the decoder variants
(``_scores``: the score tile of the forward and of the backward's recomputation).

A mask is None or 4-D with every dim full or 1, bool (True = attend) or float (added to the scores, -inf
hides). Size-1 dims are read with stride 0 whatever their stored stride (no copy). The MASK_KIND constexpr
of a kernel is NO_MASK, BOOL_MASK or FLOAT_MASK.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tile import LOG2E, _dot
from ._variants import _tanh, _window_visible

NO_MASK, BOOL_MASK, FLOAT_MASK = 0, 1, 2


# ----------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------
def mask_strides(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """The strides the kernels read ``mask`` with: 0 along size-1 (broadcast) dims."""
    return tuple(0 if n == 1 else st for n, st in zip(mask.shape, mask.stride()))  # type: ignore[return-value]


def mask_args(mask: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], int]:
    """(tensor, strides, MASK_KIND) of a kernel's mask arguments; without a mask, ``dummy`` stands in for the
    pointer (never read) with strides 0."""
    if mask is None:
        return dummy, (0, 0, 0, 0), NO_MASK
    return mask, mask_strides(mask), (BOOL_MASK if mask.dtype == torch.bool else FLOAT_MASK)


def kv_range_of(mask: torch.Tensor, S: int) -> torch.Tensor:
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


# ----------------------------------------------------------------------------------------------------
# Device side
# ----------------------------------------------------------------------------------------------------
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
        s = s + mv.to(tl.float32) * LOG2E
    return s


@triton.jit
def _kv_range(KVRange, b, h, stride_rb, stride_rh, S, KEYS_ONLY: tl.constexpr):
    """[lo, hi): the keys a key-only mask leaves visible for (b, h) (padding, see kv_range_of); else [0, S)."""
    if KEYS_ONLY:
        r = KVRange + b * stride_rb + h * stride_rh
        lo = tl.load(r)
        hi = tl.load(r + 1)
    else:
        lo = 0
        hi = S
    return lo, hi


@triton.jit
def _scores(x, yt, M_tile, rows, cols, offs_m, offs_n, in_m, in_n, qk_scale, stride_mm, stride_mn, causal_offset,
            cap2, slope2, window_left, window_right,
            MASK_KIND: tl.constexpr, KEYS_ONLY: tl.constexpr, CAUSAL: tl.constexpr,
            TRANSPOSED: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
            SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr):
    """Scores x @ yt in log2 units (qk_scale has log2(e) folded in), masked (M_tile: see _mask_tile),
    causal (key j hidden from query i unless j <= i + causal_offset) and with keys past the bound hidden:
    a (query, key) tile (x = q, yt = k^T), or with TRANSPOSED a (key, query) tile (x = k, yt = q^T) whose
    keys past the bound are left as they are (the dK/dV kernel never stores those rows).

    The decoder variants (kernels/_variants.py), with query row i at position i + causal_offset: SOFTCAP
    (qk_scale = scale / softcap, cap2 = softcap * log2(e)): s = cap2 * t, t = tanh(scale * x . y / softcap);
    ALIBI: s += slope2 * (j - i') (slope2 = slope * log2(e)); WINDOW: keys outside [i' - window_left,
    i' + window_right] hidden. Returns (s, t); t is s itself without SOFTCAP (the backward's 1 - t^2 needs it)."""
    s = _dot(x, yt, None, UPCAST_DOT, DOT_PRECISION) * qk_scale
    t = s
    if SOFTCAP:
        t = _tanh(s)
        s = t * cap2
    if ALIBI:
        if TRANSPOSED:
            s += slope2 * (offs_n[:, None] - (offs_m + causal_offset)[None, :]).to(tl.float32)
        else:
            s += slope2 * (offs_n[None, :] - (offs_m + causal_offset)[:, None]).to(tl.float32)
    if MASK_KIND != 0:
        mv = _mask_tile(M_tile, rows, cols, in_m, in_n, stride_mm, stride_mn, KEYS_ONLY, TRANSPOSED)
        s = _apply_mask(s, mv, MASK_KIND)
    if WINDOW:
        if TRANSPOSED:
            s = tl.where(_window_visible(offs_n[:, None], (offs_m + causal_offset)[None, :], window_left,
                                         window_right), s, float("-inf"))
        else:
            s = tl.where(_window_visible(offs_n[None, :], (offs_m + causal_offset)[:, None], window_left,
                                         window_right), s, float("-inf"))
    if TRANSPOSED:
        if CAUSAL:
            s = tl.where(offs_n[:, None] <= (offs_m + causal_offset)[None, :], s, float("-inf"))
    elif CAUSAL:
        s = tl.where(in_n[None, :] & (offs_n[None, :] <= (offs_m + causal_offset)[:, None]), s, float("-inf"))
    else:
        s = tl.where(in_n[None, :], s, float("-inf"))
    return s, t
