"""The decoder variants of the attention scores, shared by the attention kernels (kernels/attention_fwd.py,
kernels/attention_bwd.py, through ``_masking._scores``) and the decode kernel (kernels/decode.py).

On the score s = scale * q_i . k_j of query row i at position i' and key j, in this order (the contract of
``fastattn.reference.scaled_dot_product_attention``):

* soft-capping  s -> softcap * tanh(s / softcap)             (``_tanh``; backward: ds / ds_raw = 1 - t^2)
* ALiBi         s += slope * (j - i')
* the mask, causality
* window        key j hidden unless i' - left <= j <= i' + right   (``_window_visible``)
* sinks         the softmax denominator also holds exp(sink)        (``_fold_sink``, once per row at the end)

Scores are in log2 units in every kernel (log2(e) folded into the scale, the slope, the cap and the sink).
Each variant is a constexpr switch of its kernel: off, none of its code is compiled.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._tile import LOG2E


@triton.jit
def _tanh(x):
    """tanh(x) = sign(x) (1 - t) / (1 + t), t = exp(-2 |x|) in (0, 1]: no overflow for any x."""
    t = tl.math.exp2(tl.abs(x) * (-2.0 * LOG2E))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _variant_scales(sm_scale, softcap, SOFTCAP: tl.constexpr):
    """(qk_scale, cap2) of the score tile: with SOFTCAP the scores are cap2 * tanh(qk_scale * q.k), the scale
    inside the tanh and log2(e) outside (qk_scale = scale / softcap, cap2 = softcap * log2(e)); else
    qk_scale = scale * log2(e) (cap2 unused)."""
    if SOFTCAP:
        qk_scale = sm_scale / softcap
        cap2 = softcap * LOG2E
    else:
        qk_scale = sm_scale * LOG2E
        cap2 = 1.0
    return qk_scale, cap2


@triton.jit
def _alibi_slope(Alibi, b, h, stride_ab, stride_ah, ALIBI: tl.constexpr):
    """The ALiBi slope of (b, h) in log2 units, read at Alibi + b * stride_ab + h * stride_ah (0.0 without
    ALIBI: the score tile never reads it then)."""
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(Alibi + b * stride_ab + h * stride_ah) * LOG2E
    return slope2


@triton.jit
def _window_visible(kpos, qpos, window_left, window_right):
    """Key positions kpos visible from query positions qpos (broadcast against each other) under the sliding
    window: qpos - window_left <= kpos <= qpos + window_right (both bounds finite: the launchers turn an
    unbounded side into one no key reaches)."""
    return (kpos >= qpos - window_left) & (kpos <= qpos + window_right)


@triton.jit
def _fold_sink(acc, m_i, l_i, sink2):
    """The sink joins a row's softmax denominator (sink2 in log2 units, one per row): rescale the running
    (acc, m, l) to m' = max(m, sink2) and add exp2(sink2 - m'). A row that saw no key ends with l = 1 at
    m' = sink2 (out 0, lse = sink); a sink of -inf adds nothing."""
    m_new = tl.maximum(m_i, sink2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.math.exp2(sink2 - m_safe)
    acc = acc * alpha[:, None]
    return acc, m_new, l_i
