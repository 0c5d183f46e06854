"""``fastattn.attention_weights``: the softmax probabilities, from the fused kernels' log-sum-exp.

Fused attention never forms the (L, S) probability matrix, which is why fused libraries refuse to return
it. Interpretability (and ``need_weights=True`` / ``output_attentions=True``) needs exactly that matrix, so
this module computes it in two passes with no second (L, S) tensor:

1. the fused forward gives ``lse_i = log sum_j exp(s_ij)`` (with a value head dim of 1: the P @ V work
   is negligible and no (L, S) tensor is formed);
2. the scores are written straight into the one (..., L, S) output buffer (``baddbmm(out=...)``), the
   additive mask is added in place, ``lse`` subtracted in place and ``exp_`` applied in place; hidden keys,
   the causal triangle and rows with no visible key are zeroed in place.

Row i of the result is ``exp(s_i - lse_i)`` = ``softmax(s_i)``, with the normaliser computed by the same
kernels that compute the attention output. The backward (``dS = P o (dP - rowsum(dP o P))``) needs one
(L, S) buffer. The op, ``fastattn::attention_weights``, and its backward formula are in
fastattn/_ops/weights.py.

Shape legend: B batch, H query heads, Hk key heads, L query length, S key length, E head dim.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import _launchers, _philox, functional
from fastattn import _validation as check
from fastattn._normalise import connected_zeros, default_scale, mask_to_4d, to_4d
from fastattn._ops.weights import attention_weights as attention_weights_op

__all__ = ["attention_weights"]


def attention_weights(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
) -> Tensor:
    """The attention probabilities ``softmax(scale * Q K^T + mask)``, shape (..., H, L, S), dtype of query.

    The arguments mean what they mean for :func:`fastattn.scaled_dot_product_attention` (same shapes, mask
    conventions, causal alignment, GQA and backends): query (..., H, L, E), key (..., Hk, S, E); attn_mask
    broadcastable to (..., H, L, S), bool True = attend or float added to the scores; scale defaults to
    1 / sqrt(E). No dropout is applied. Rows whose keys are all hidden are all zero (never NaN).

    The normaliser comes from the fused forward kernel (its log-sum-exp); the probabilities are written
    directly into the returned buffer, with no other (L, S) intermediate. Differentiable with respect to
    query, key and a float attn_mask.
    """
    check.check_qkv(query, key, key, enable_gqa)
    check.check_mask(attn_mask, query, check.scores_shape(query, key))
    check.check_scalars(0.0, is_causal, scale, enable_gqa)
    scale = default_scale(query.shape[-1], scale)
    backend = _launchers.choose_backend(backend, query.device, query.dtype)

    batch = tuple(query.shape[:-3])
    H, L, S = query.shape[-3], query.shape[-2], key.shape[-2]
    q4, k4 = to_4d(query), to_4d(key)
    mask4 = None if attn_mask is None else mask_to_4d(attn_mask, (*batch, H))

    if min(q4.shape[0], H, L, S) == 0:
        p4 = connected_zeros(query, (q4.shape[0], H, L, S), q4, k4)
    else:
        p4 = attention_weights_op(q4, k4, mask4, scale, is_causal, backend)
    return p4.reshape(*batch, H, L, S) if batch else p4[0]


# ------------------------------------------------------------------------------------ dropout helpers
def draw_seed_and_attend(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
                         dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool,
                         backend: str | None, need_seed: bool = True, **variants) -> tuple[Tensor, int | None]:
    """``fastattn.scaled_dot_product_attention`` plus the Philox seed its dropout used (None when
    dropout_p == 0 or not ``need_seed``). ``variants``: its decoder keywords (window, softcap, sinks,
    alibi_slopes, lower_right), passed through.

    The public function draws one int64 from torch's default CPU generator for its seed; replaying the
    generator state on a private generator recovers it without disturbing the global stream. Modules
    need it to return the dropped-out weights (what torch's MultiheadAttention and HF's eager attention
    return in training mode). Reading the generator state is not traceable by torch.compile: that one
    case (weights requested, dropout on) breaks the graph; everything else traces."""
    if dropout_p == 0.0 or not need_seed:
        out = functional.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                      enable_gqa, backend=backend, **variants)
        return out, None
    state = torch.get_rng_state()
    out = functional.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                  enable_gqa, backend=backend, **variants)
    g = torch.Generator()
    g.set_state(state)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=g))
    return out, seed


def apply_dropout(weights: Tensor, dropout_p: float, seed: int) -> Tensor:
    """``weights`` (..., H, L, S) with the probabilities fastattn's kernels dropped for ``seed`` zeroed and
    the kept ones scaled by 1 / (1 - p): what the kernels multiplied P by. The keep mask is rebuilt from
    the Philox specification (``fastattn._philox``), one batch entry at a time to bound its int64
    temporaries. Differentiable (a product with a constant factor)."""
    if dropout_p == 0.0:
        return weights
    *_, H, L, S = weights.shape
    w4 = weights.reshape(-1, H, L, S)
    factor = torch.empty_like(w4)
    thr = _philox.threshold(dropout_p)
    n4 = (S + 3) // 4
    ar = lambda n: torch.arange(n, dtype=torch.int64, device=weights.device)  # noqa: E731
    c2, c1, c0 = ar(H).view(H, 1, 1), ar(L).view(1, L, 1), ar(n4).view(1, 1, n4)
    shape = (H, L, n4)
    for b in range(w4.shape[0]):
        words = _philox.philox4x32(c0.expand(shape), c1.expand(shape), c2.expand(shape),
                                   torch.full(shape, b, dtype=torch.int64, device=weights.device), seed)
        keep = torch.stack(words, dim=-1).reshape(H, L, 4 * n4)[..., :S] >= thr
        factor[b] = keep
    factor.mul_(1.0 / (1.0 - dropout_p))
    return (w4 * factor).view(weights.shape)
