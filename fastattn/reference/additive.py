"""Naive additive (Bahdanau) attention reference: the textbook formula, step by step.

    s_ij = sum_d weight[h, d] * tanh(query[..., h, i, d] + key[..., h, j, d])   (no scale)
    -> mask (bool True = attend, float added; ``is_causal``: j <= i) -> softmax -> weighted sum of value.

The scores are built by broadcasting through a (..., H, L, S, D) tensor: memory grows with L x S x D,
which is what the fused kernels avoid. ``upcast=True`` computes in float64 (the ground truth for tests),
``upcast=False`` in the input's precision (what the low-precision tolerance policy compares with).

Shape legend: H heads, L query length, S key length, D hidden (score) dim, Ev value dim; ``...`` any
number of leading batch dims (including none).
"""
from __future__ import annotations

import torch

from fastattn.reference import apply_mask, logsumexp, softmax, weighted_sum

__all__ = ["additive_scores", "additive_attention", "additive_attention_weights"]


def additive_scores(query: torch.Tensor, key: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_d weight[h, d] * tanh(query[..., h, i, d] + key[..., h, j, d])``:
    (..., H, L, D) x (..., H, S, D) x (H, D) -> (..., H, L, S), via a (..., H, L, S, D) intermediate."""
    t = torch.tanh(query.unsqueeze(-2) + key.unsqueeze(-3))
    return (t * weight[:, None, None, :]).sum(-1)


def _prepare(query, key, weight, attn_mask, upcast):
    dt = torch.float64 if upcast else query.dtype
    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(dt)
    return query.to(dt), key.to(dt), weight.to(dt), mask, dt


def additive_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    weight: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    *,
    upcast: bool = True,
    return_lse: bool = False,
):
    """Textbook additive attention (see ``fastattn.additive_attention``): query (..., H, L, D),
    key (..., H, S, D), value (..., H, S, Ev), weight (H, D) -> (..., H, L, Ev); with ``return_lse`` also
    the float32 log-sum-exp (..., H, L). Differentiable (autograd gives the reference gradients)."""
    q, k, w, mask, dt = _prepare(query, key, weight, attn_mask, upcast)
    s = apply_mask(additive_scores(q, k, w), mask, is_causal)
    out = weighted_sum(softmax(s), value.to(dt))
    if return_lse:
        return out, logsumexp(s).float()
    return out


def additive_attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    weight: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """The softmax probabilities (..., H, L, S) of additive attention (rows with no visible key all zero)."""
    q, k, w, mask, _ = _prepare(query, key, weight, attn_mask, upcast)
    return softmax(apply_mask(additive_scores(q, k, w), mask, is_causal))
