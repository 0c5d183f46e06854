"""Decoder attention in Triton: a few new query rows per sequence against a long KV cache (flash-decoding).

Shape legend: B batch, L new query rows per sequence (decode: 1..16, any L works), H query heads, Hk
key/value heads (H % Hk == 0, GQA group G = H // Hk), E query/key head dim, Ev value head dim (both 1..256).

Launcher contract:

    decode_fwd(q, k_cache, v_cache, cache_seqlens, *, block_table=None, mask=None, scale=None, causal=True,
               window=(-1, -1), softcap=0.0, sinks=None, alibi_slopes=None, num_splits=None, out=None)
        -> (out, lse)

q (B, L, H, E); k_cache / v_cache (B, S_max, Hk, E / Ev) per sequence, or paged (num_blocks, page, Hk, E / Ev)
read through block_table (B, max_blocks) int32; cache_seqlens (B,) int32; mask (contiguous caches only) bool or
float, broadcastable to (B, H, L, S_max); out (B, L, H, Ev) in q's dtype (``out=``: written in place, any
strides), lse (B, H, L) float32 (natural log). Every tensor is read and written through its strides (a mask's
size-1 dims with stride 0). The math (causal lower-right within the new rows, sliding window, soft-capping,
ALiBi, the mask, sinks, rows with no visible key) is stated once, in fastattn/reference/decode.py, the naive
reference the kernels are tested against.

Kernels (program ids cast to int64 before pointer arithmetic, fp32 accumulation, scores in log2 units):

* ``_decode_fwd``    one program per (b, kv head, query-row block, key split). The row block packs the query rows
  of every head of the GQA group, row r = i * G + g (query row i, head hk * G + g), so the group shares each
  key/value block it loads: tl.dot needs at least 16 rows, and a single head with L = 1 would fill one.
  Online softmax over the split's key blocks. One split: stores out and lse. Several: stores the split's
  normalised partial output and its lse (log2) in float32 scratch, and the merge kernel finishes.
* ``_decode_merge``  one program per (b, h, query-row block): out = sum_s exp(lse_s - lse) out_s with
  lse = log(sum_s exp(lse_s) [+ exp(sink)]), the splits taken in order 0, 1, ... (deterministic).

Key range. A row block whose rows i_min..i_max sit at absolute positions n - L + i sees keys
[max(0, n - L + i_min - left), min(n, n - L + i_max + 1 (causal), n - L + i_max + right + 1)); key blocks outside
it are never loaded (a sliding window reads only its window). The range, aligned down to BLOCK_N, is cut into
``num_splits`` runs of whole key blocks; a split whose run is empty stores lse = -inf. Within a block, keys are
masked per element (past n, causal, window, the mask).

Feature switches are constexprs (IS_CAUSAL, WINDOW, SOFTCAP, ALIBI, MASK_KIND, SINKS, PAGED, SPLIT): a plain
call compiles without any of their code. Tile sizes live in kernels/configs.py (``DECODE_CONFIGS``);
``kernels/aot.py`` compiles every row for sm_80 / sm_90 and checks registers, spills and shared memory. Under TRITON_INTERPRET=1 the kernels run on CPU tensors
with ``DECODE_INTERPRETER_CONFIG`` (small tiles, so short test caches span several key blocks and row blocks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastattn._normalise import default_scale
from fastattn._validation import check_decode_launch

from ._host import import_in_current_mode

# The shared @triton.jit helpers, decorated in the current TRITON_INTERPRET mode (kernels/_host.py).
import_in_current_mode(__package__, ("_tile", "_variants"))

from ._masking import mask_args  # noqa: E402
from ._tile import LN2, LOG2E, _dot  # noqa: E402
from ._variants import _fold_sink, _tanh, _variant_scales, _window_visible  # noqa: E402
from .configs import (DECODE_CONFIGS, DECODE_INTERPRETER_CONFIG, DECODE_MERGE_CONFIG, HEAD_BUCKETS,  # noqa: E402
                      DecodeConfig, dtype_class, head_bucket, pad_dim)

__all__ = ["decode_fwd", "KERNELS", "num_splits_heuristic", "aot_cases", "aot_launch"]

# Plain runtime ints: the JIT would otherwise turn a value of 1 into a constexpr and mark multiples of 16 as
# divisible, compiling another variant per value.
_RUNTIME_INTS = ["L", "num_splits", "window_left", "window_right"]

MAX_SPLITS = 128


def _block_m(rows: int, table: dict[int, DecodeConfig]) -> int:
    """Query rows per program for G * L packed rows: the smallest of the table's row blocks that holds them
    (at least 16: tl.dot's minimum), else the largest."""
    return next((m for m in sorted(table) if m >= rows), max(table))


# ----------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _normalise(acc, m, l):
    """(acc / l, m + log2(l)): a row's output and lse (log2 units) from its running max m, denominator l and
    accumulator; a row with l = 0 (no visible key) gives out = 0 and lse = -inf."""
    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    return acc * (1.0 / l_safe)[:, None], tl.where(empty, float("-inf"), m + tl.math.log2(l_safe))


@triton.jit
def _row_range(n, L, start_m, window_left, window_right,
               GROUP: tl.constexpr, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[lo, hi): the keys any row of the block [start_m, start_m + BLOCK_M) of packed rows can see."""
    i_min = start_m // GROUP
    i_max = (tl.minimum(start_m + BLOCK_M, GROUP * L) - 1) // GROUP + 1  # one past the block's last row
    lo = 0
    hi = n
    if IS_CAUSAL:
        hi = tl.minimum(hi, n - L + i_max)
    if WINDOW:
        lo = tl.maximum(lo, n - L + i_min - window_left)
        hi = tl.minimum(hi, n - L + i_max + window_right)
    return lo, hi


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _decode_fwd(Q, K, V, BlockTable, SeqLens, Alibi, Mask, Sinks, Out, Lse, PartOut, PartLse,
                stride_qb, stride_qm, stride_qh, stride_qe,
                stride_kp, stride_kn, stride_kh, stride_ke,
                stride_vp, stride_vn, stride_vh, stride_ve,
                stride_tb, stride_ab, stride_ah,
                stride_mb, stride_mh, stride_mm, stride_mn,
                stride_ob, stride_om, stride_oh, stride_oe,
                stride_lb, stride_lh,
                H, L, num_splits, window_left, window_right, sm_scale, softcap,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
                IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                MASK_KIND: tl.constexpr, SINKS: tl.constexpr, SPLIT: tl.constexpr, UPCAST_DOT: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """stride_kp / stride_vp: the batch stride of a contiguous cache, the page stride of a paged one.
    window_left / window_right: the launcher's clamped bounds (never negative). Mask: (B, H, L, S_max) through
    stride_m* (0 along broadcast dims), MASK_KIND NO_MASK / BOOL_MASK (True = attend) / FLOAT_MASK (added after
    scale, soft-cap and ALiBi). SPLIT: store the split's
    partial out (normalised) and lse (log2) in PartOut (B, H, L, num_splits, Ev) / PartLse (B, H, L,
    num_splits), contiguous float32; else out and lse (sinks included)."""
    tl.static_assert(BLOCK_E >= HEAD_DIM)
    tl.static_assert(BLOCK_EV >= HEAD_DIM_V)
    pid_bhk = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    split = tl.program_id(2)
    Hk = H // GROUP
    b = pid_bhk // Hk
    hk = pid_bhk % Hk
    n = tl.load(SeqLens + b)

    rows = start_m + tl.arange(0, BLOCK_M)  # packed rows r = i * GROUP + g
    in_m = rows < GROUP * L
    i = rows // GROUP
    h = hk * GROUP + rows % GROUP
    qpos = n - L + i  # absolute position of query row i
    cols = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)

    q = tl.load(Q + b * stride_qb + i[:, None] * stride_qm + h[:, None] * stride_qh + offs_e[None, :] * stride_qe,
                mask=in_m[:, None] & (offs_e[None, :] < HEAD_DIM), other=0.0)
    # softcap * tanh(scale * qk / softcap) in log2 units: the scale goes inside, log2(e) outside.
    qk_scale, cap2 = _variant_scales(sm_scale, softcap, SOFTCAP)
    if ALIBI:
        slope2 = tl.load(Alibi + b * stride_ab + h * stride_ah, mask=in_m, other=0.0) * LOG2E
    if MASK_KIND != 0:
        M_rows = Mask + b * stride_mb + h * stride_mh + i * stride_mm  # (BLOCK_M,) pointers: row (i, h)'s mask

    # This split's run of whole key blocks in the block's visible range.
    lo, hi = _row_range(n, L, start_m, window_left, window_right, GROUP, BLOCK_M, IS_CAUSAL, WINDOW)
    lo = (lo // BLOCK_N) * BLOCK_N
    per_split = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N), num_splits) * BLOCK_N
    split_lo = lo + split * per_split
    split_hi = tl.minimum(split_lo + per_split, hi)

    K_h = K + hk * stride_kh
    V_h = V + hk * stride_vh
    if not PAGED:
        K_h += b * stride_kp
        V_h += b * stride_vp
    kt_e = offs_e[:, None] * stride_ke
    v_e = offs_ev[None, :] * stride_ve

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_EV), dtype=tl.float32)
    for start_n in range(split_lo, split_hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + cols
        in_n = offs_n < n
        if PAGED:
            # Key j in page block_table[b, j // PAGE_SIZE], slot j % PAGE_SIZE; int64: page * stride can
            # exceed 2**31.
            page = tl.load(BlockTable + b * stride_tb + offs_n // PAGE_SIZE, mask=in_n, other=0).to(tl.int64)
            slot = offs_n % PAGE_SIZE
            K_blk = K_h + (page * stride_kp + slot * stride_kn)[None, :]
            V_blk = V_h + (page * stride_vp + slot * stride_vn)[:, None]
        else:
            # The block's base from an int64 scalar; offsets inside the tile stay int32.
            n64 = start_n.to(tl.int64)
            K_blk = K_h + n64 * stride_kn + cols[None, :] * stride_kn
            V_blk = V_h + n64 * stride_vn + cols[:, None] * stride_vn
        kt = tl.load(K_blk + kt_e, mask=in_n[None, :] & (offs_e[:, None] < HEAD_DIM), other=0.0)
        s = _dot(q, kt, None, UPCAST_DOT, DOT_PRECISION) * qk_scale
        if SOFTCAP:
            s = _tanh(s) * cap2
        if ALIBI:
            s += slope2[:, None] * (offs_n[None, :] - qpos[:, None]).to(tl.float32)
        visible = in_n[None, :]
        if MASK_KIND != 0:
            mv = tl.load(M_rows[:, None] + offs_n[None, :] * stride_mn, mask=in_m[:, None] & in_n[None, :], other=0)
            if MASK_KIND == 1:
                visible &= mv != 0
            else:
                s += mv.to(tl.float32) * LOG2E
        if IS_CAUSAL:
            visible &= offs_n[None, :] <= qpos[:, None]
        if WINDOW:
            visible &= _window_visible(offs_n[None, :], qpos[:, None], window_left, window_right)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only hidden keys keeps m = -inf; subtract 0 there (p = 0, not NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_blk + v_e, mask=in_n[:, None] & (offs_ev[None, :] < HEAD_DIM_V), other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST_DOT, DOT_PRECISION)
        m_i = m_new

    if SPLIT:
        # Partial results of this split; the merge kernel adds the sinks.
        o, lse2 = _normalise(acc, m_i, l_i)
        part = ((b * H + h) * L + i) * num_splits + split
        tl.store(PartLse + part, lse2, mask=in_m)
        tl.store(PartOut + part[:, None] * HEAD_DIM_V + offs_ev[None, :], o,
                 mask=in_m[:, None] & (offs_ev[None, :] < HEAD_DIM_V))
    else:
        if SINKS:
            # The sink joins the denominator (see _fold_sink).
            sink2 = tl.load(Sinks + h, mask=in_m, other=float("-inf")) * LOG2E
            acc, m_i, l_i = _fold_sink(acc, m_i, l_i, sink2)
        o, lse2 = _normalise(acc, m_i, l_i)
        tl.store(Lse + b * stride_lb + h * stride_lh + i, lse2 * LN2, mask=in_m)
        tl.store(Out + b * stride_ob + i[:, None] * stride_om + h[:, None] * stride_oh + offs_ev[None, :] * stride_oe,
                 o.to(Out.dtype.element_ty), mask=in_m[:, None] & (offs_ev[None, :] < HEAD_DIM_V))


@triton.jit(do_not_specialize=["L", "num_splits"])
def _decode_merge(PartOut, PartLse, Sinks, Out, Lse,
                  stride_ob, stride_om, stride_oh, stride_oe,
                  stride_lb, stride_lh,
                  H, L, num_splits,
                  HEAD_DIM_V: tl.constexpr, BLOCK_EV: tl.constexpr, SINKS: tl.constexpr, BLOCK_M: tl.constexpr):
    """out = sum_s w_s out_s / sum_s w_s, w_s = exp2(lse_s - m), m = max_s lse_s (and the sink), lse =
    log(sum_s exp(lse_s) [+ exp(sink)]); splits summed in index order. Rows whose splits saw no key (and no
    sink): out = 0, lse = -inf."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = i < L
    offs_ev = tl.arange(0, BLOCK_EV)
    part = (pid_bh * L + i) * num_splits  # row (b, h, i)'s first split

    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for s in range(num_splits):
        m = tl.maximum(m, tl.load(PartLse + part + s, mask=in_m, other=float("-inf")))
    if SINKS:
        sink2 = tl.load(Sinks + h) * LOG2E
        m = tl.maximum(m, sink2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_EV), dtype=tl.float32)
    o_msk = in_m[:, None] & (offs_ev[None, :] < HEAD_DIM_V)
    for s in range(num_splits):
        w = tl.math.exp2(tl.load(PartLse + part + s, mask=in_m, other=float("-inf")) - m_safe)
        o = tl.load(PartOut + (part + s)[:, None] * HEAD_DIM_V + offs_ev[None, :], mask=o_msk, other=0.0)
        acc += w[:, None] * o
        l_i += w
    if SINKS:
        l_i += tl.math.exp2(sink2 - m_safe)
    o, lse2 = _normalise(acc, m_safe, l_i)
    tl.store(Lse + b * stride_lb + h * stride_lh + i, lse2 * LN2, mask=in_m)
    tl.store(Out + b * stride_ob + i[:, None] * stride_om + h * stride_oh + offs_ev[None, :] * stride_oe,
             o.to(Out.dtype.element_ty), mask=o_msk)


KERNELS = {"decode": _decode_fwd, "decode_merge": _decode_merge}


def _is_interpreted(fn) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - older layouts
        return False
    return isinstance(fn, InterpretedFunction)


_INTERPRETED = _is_interpreted(_decode_fwd)


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------
def num_splits_heuristic(programs: int, num_sms: int, key_blocks: int, max_splits: int = MAX_SPLITS) -> int:
    """Key splits for ``programs`` (b, kv head, row block) programs over ``key_blocks`` key blocks.
    One split when the programs nearly fill the GPU (80% of its SMs). Otherwise, of the split counts
    that change the number of blocks per split, the smallest whose wave efficiency (programs * splits /
    num_sms over the whole waves it takes) is within 85% of the best: more splits cost more partial
    results to write and merge (flash-attention's rule)."""
    if programs >= 0.8 * num_sms:
        return 1
    max_splits = max(1, min(max_splits, num_sms, key_blocks))

    def distinct(s: int) -> bool:  # s splits give fewer blocks per split than s - 1
        return s == 1 or -(-key_blocks // s) != -(-key_blocks // (s - 1))

    def efficiency(s: int) -> float:
        waves = programs * s / num_sms
        return waves / math.ceil(waves)

    candidates = [s for s in range(1, max_splits + 1) if distinct(s)]
    best = max(efficiency(s) for s in candidates)
    return next(s for s in candidates if efficiency(s) >= 0.85 * best)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: a small machine, so test-sized problems take the split path too


def _check_inputs(q, k_cache, v_cache, cache_seqlens, block_table, mask, window, softcap, sinks, alibi_slopes,
                  num_splits, out) -> None:
    """ValueError / TypeError naming the argument, what was expected and what came (fastattn/_validation.py)."""
    check_decode_launch(q, k_cache, v_cache, cache_seqlens, block_table, mask, window, softcap, sinks, alibi_slopes,
                        num_splits, out, cpu=False, max_head_dim=256)


@dataclass
class _Launch:
    """One kernel launch: table name, grid, keyword arguments (block sizes, warps and stages included)."""
    name: str
    grid: tuple
    args: dict


def _plan(q, k_cache, v_cache, cache_seqlens, out, lse, *, block_table, mask, scale, causal, window, softcap, sinks,
          alibi_slopes, num_splits, interpreting: bool) -> list[_Launch]:
    """The launches of one call (checked inputs; out / lse allocated). Scratch for the split path is
    allocated here."""
    B, L, H, E = q.shape
    Hk, Ev = k_cache.shape[2], v_cache.shape[3]
    G = H // Hk
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    if interpreting:
        table = {16: DECODE_INTERPRETER_CONFIG}
    else:
        table = DECODE_CONFIGS[(head_bucket(E, Ev), dtype_class(q.dtype))]
    block_m = _block_m(G * L, table)
    cfg = table[block_m]
    row_blocks = triton.cdiv(G * L, block_m)
    # Unbounded window sides become bounds that every key of the cache satisfies (kept in int32).
    left, right = window
    left = capacity if left < 0 else min(left, capacity)
    right = capacity + L if right < 0 else min(right, capacity + L)
    windowed = window[0] >= 0 or window[1] >= 0
    if num_splits is None:
        span = min(capacity, window[0] + L) if window[0] >= 0 else capacity  # keys a row block can see
        num_splits = num_splits_heuristic(B * Hk * row_blocks, _num_sms(q.device), triton.cdiv(span, cfg.block_n))
    split = num_splits > 1
    f32 = dict(dtype=torch.float32, device=q.device)
    part_out = torch.empty(B, H, L, num_splits, Ev, **f32) if split else lse
    part_lse = torch.empty(B, H, L, num_splits, **f32) if split else lse
    dummy = cache_seqlens
    alibi = alibi_slopes.to(torch.float32) if alibi_slopes is not None else None
    sinks32 = sinks.to(torch.float32).contiguous() if sinks is not None else None
    mask_t, mask_st, mask_kind = mask_args(mask, dummy)
    if q.dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:
        precision = "ieee"
    out_strides = dict(stride_ob=out.stride(0), stride_om=out.stride(1), stride_oh=out.stride(2),
                       stride_oe=out.stride(3), stride_lb=lse.stride(0), stride_lh=lse.stride(1))
    launches = [_Launch("decode", (B * Hk, row_blocks, num_splits), dict(
        Q=q, K=k_cache, V=v_cache, BlockTable=block_table if paged else dummy, SeqLens=cache_seqlens,
        Alibi=alibi if alibi is not None else dummy, Mask=mask_t, Sinks=sinks32 if sinks32 is not None else dummy,
        Out=out, Lse=lse, PartOut=part_out, PartLse=part_lse,
        **{f"stride_q{d}": st for d, st in zip("bmhe", q.stride())},
        **{f"stride_k{d}": st for d, st in zip("pnhe", k_cache.stride())},
        **{f"stride_v{d}": st for d, st in zip("pnhe", v_cache.stride())},
        stride_tb=block_table.stride(0) if paged else 0,
        stride_ab=alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0,
        stride_ah=alibi.stride(-1) if alibi is not None else 0,
        **{f"stride_m{d}": st for d, st in zip("bhmn", mask_st)},
        **out_strides, H=H, L=L, num_splits=num_splits, window_left=left, window_right=right,
        sm_scale=scale, softcap=float(softcap) if softcap > 0 else 1.0,
        GROUP=G, HEAD_DIM=E, HEAD_DIM_V=Ev, BLOCK_E=pad_dim(E), BLOCK_EV=pad_dim(Ev), PAGED=paged,
        PAGE_SIZE=k_cache.shape[1] if paged else 1, IS_CAUSAL=bool(causal), WINDOW=windowed,
        SOFTCAP=softcap > 0, ALIBI=alibi is not None, MASK_KIND=mask_kind, SINKS=sinks is not None, SPLIT=split,
        UPCAST_DOT=interpreting and q.dtype == torch.bfloat16, DOT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages))]
    if split:
        mcfg = DECODE_MERGE_CONFIG
        rows = min(mcfg.block_n, triton.next_power_of_2(L))
        launches.append(_Launch("decode_merge", (B * H, triton.cdiv(L, rows)), dict(
            PartOut=part_out, PartLse=part_lse, Sinks=sinks32 if sinks32 is not None else dummy, Out=out, Lse=lse,
            **out_strides, H=H, L=L, num_splits=num_splits, HEAD_DIM_V=Ev, BLOCK_EV=pad_dim(Ev),
            SINKS=sinks is not None, BLOCK_M=rows, num_warps=mcfg.num_warps, num_stages=mcfg.num_stages)))
    return launches


def decode_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, *,
               block_table: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               scale: float | None = None, causal: bool = True, window: tuple[int, int] = (-1, -1),
               softcap: float = 0.0, sinks: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
               num_splits: int | None = None, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the new query rows q (B, L, H, E) to each sequence's KV cache.

    k_cache / v_cache: (B, S_max, Hk, E / Ev), or paged (num_blocks, page, Hk, E / Ev) with ``block_table``
    (B, max_blocks) int32 (sequence b's key j in page block_table[b, j // page], slot j % page).
    ``cache_seqlens`` (B,) int32: sequence b's keys are 0 .. cache_seqlens[b] - 1, and its L query rows sit at
    the last L positions (values must lie in 0 .. capacity and pages in 0 .. num_blocks - 1: not checked, that
    would wait for the device). ``mask`` (contiguous caches only): bool (True = attend) or float (added to the
    scores after scaling, soft-capping and ALiBi), 4-D broadcastable to (B, H, L, S_max), size-1 dims read with
    stride 0; keys past cache_seqlens[b] stay hidden whatever it says. ``scale``: default 1/sqrt(E).
    ``causal``: query row i sees keys j <= n - L + i (lower-right). ``window`` (left, right): key j visible iff
    i' - left <= j <= i' + right, i' = n - L + i, -1 unbounded. ``softcap`` > 0: scores -> softcap *
    tanh(scores / softcap) after scaling. ``sinks`` (H,): a per-head logit in every row's softmax denominator,
    with no value. ``alibi_slopes`` (H,) or (B, H): score += slope * (j - i'). ``num_splits``: key splits
    (None: from B * Hk and the cache length). ``out``: a preallocated (B, L, H, Ev) tensor of q's dtype, any
    strides, written and returned.

    Returns out (B, L, H, Ev) in q's dtype and lse (B, H, L) float32 (natural log, sinks included; rows with
    no visible key: out 0, lse -inf, or the sink)."""
    _check_inputs(q, k_cache, v_cache, cache_seqlens, block_table, mask, window, softcap, sinks, alibi_slopes,
                  num_splits, out)
    B, L, H, E = q.shape
    if out is None:
        out = torch.empty(B, L, H, v_cache.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    scale = default_scale(E, scale)
    for launch in _plan(q, k_cache, v_cache, cache_seqlens, out, lse, block_table=block_table, mask=mask, scale=scale,
                        causal=causal, window=tuple(window), softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
                        num_splits=num_splits, interpreting=_INTERPRETED):
        KERNELS[launch.name][launch.grid](**launch.args)
    return out, lse


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compilation cases (kernels/aot.py compiles them)
# ----------------------------------------------------------------------------------------------------
# plain: contiguous cache, causal, one split (the hot path); split: the same with key splits (+ merge);
# full: paged, causal, window, softcap, ALiBi and sinks, with splits (every switch on: the most registers);
# mask: split with a float mask (what scaled_dot_product_attention's decode route compiles).
AOT_VARIANTS = ("plain", "split", "full", "mask")


def aot_cases(dtypes=("fp16", "bf16", "fp32")) -> list[tuple[str, int, str, str, int]]:
    """(kernel, head bucket, dtype, variant, BLOCK_M) of every configuration the launcher can pick."""
    cases = []
    for dtype in dtypes:
        for bucket in HEAD_BUCKETS:
            for block_m in DECODE_CONFIGS[(bucket, "32" if dtype == "fp32" else "16")]:
                cases += [("decode", bucket, dtype, v, block_m) for v in AOT_VARIANTS]
            cases.append(("decode_merge", bucket, dtype, "full", DECODE_MERGE_CONFIG.block_n))
    return cases


def aot_launch(kernel: str, bucket: int, dtype: str, variant: str, block_m: int) -> tuple[object, dict, DecodeConfig]:
    """(kernel function, launch arguments, config) of one case, from the launcher's own plan for a problem
    with head dim ``bucket``, 2 kv heads and L = 4 query rows of G = block_m / 4 heads each (``block_m`` packed
    rows); the full variant reads 16-key pages, the mask variant a float (B, 1, L, S) mask."""
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    B, Hk, S, E = 2, 2, 256, bucket
    G = block_m // 4 if block_m > 16 else 4
    L = block_m // G
    H = Hk * G
    full = variant == "full"
    paged = full
    q = torch.empty(B, L, H, E, dtype=dt)
    if paged:
        kc, vc = torch.empty(B * S // 16, 16, Hk, E, dtype=dt), torch.empty(B * S // 16, 16, Hk, E, dtype=dt)
        table = torch.zeros(B, S // 16, dtype=torch.int32)
    else:
        kc, vc, table = torch.empty(B, S, Hk, E, dtype=dt), torch.empty(B, S, Hk, E, dtype=dt), None
    out, lse = torch.empty(B, L, H, E, dtype=dt), torch.empty(B, H, L)
    mask = torch.empty(B, 1, L, S, dtype=dt) if variant == "mask" else None
    plan = _plan(q, kc, vc, torch.zeros(B, dtype=torch.int32), out, lse, block_table=table, mask=mask, scale=E ** -0.5,
                 causal=True, window=(64, 0) if full else (-1, -1), softcap=30.0 if full else 0.0,
                 sinks=torch.zeros(H) if full else None, alibi_slopes=torch.zeros(H) if full else None,
                 num_splits=1 if variant == "plain" else 4, interpreting=False)
    launch = next(x for x in plan if x.name == kernel)
    args = dict(launch.args)
    if dtype == "fp32":
        args["DOT_PRECISION"] = "tf32"  # the tensor-core path (allow_tf32); ieee runs on the FMA units
    cfg = DecodeConfig(args.get("BLOCK_N", args["BLOCK_M"]), args.pop("num_warps"), args.pop("num_stages"))
    return KERNELS[kernel], args, cfg
