"""@triton.jit helpers shared by the kernel files: constants, the dot product, row statistics and
varlen bounds. The compiler inlines them: sharing costs nothing at run time.

Indexing: batch/head ids come from program ids cast to int64 and every block's base pointer is formed with
int64 scalars (row * stride can exceed 2**31 in (B, S, H, E) views); offsets *inside* a tile stay int32 (rows
< BLOCK, so they cannot overflow), which keeps address tiles in half the registers.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Dropout key, threshold, causal offset and window bounds are plain runtime ints (the kernels'
# do_not_specialize): the JIT would otherwise turn a value of 1 into a constexpr and mark multiples of 16 as
# divisible (and compile another variant per value).
RUNTIME_INTS = ["seed_lo", "seed_hi", "drop_threshold", "causal_offset", "window_left", "window_right"]


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST: the interpreter's tl.dot mishandles bfloat16
    (it multiplies the raw 16-bit patterns), so interpreted bf16 tiles go through fp32 (exact)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_row_stats(Lse, Delta, off_bhl, offs_m, in_m):
    """(lse in log2 units, delta) of query rows offs_m. Rows with no visible key (lse = -inf) and rows
    past L get lse = +inf, so their probabilities exp2(s - lse) are exactly 0."""
    lse = tl.load(Lse + off_bhl + offs_m, mask=in_m, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(Delta + off_bhl + offs_m, mask=in_m, other=0.0)
    return lse2, delta


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
