"""Naive reference implementations: the textbook formulas, step by step.

Every fastattn kernel is tested against these. Each step is its own function so a test (or a reader)
can follow the math:  scores -> mask -> softmax -> dropout -> weighted sum.

``upcast=True`` computes in float64 (the ground truth for tests); ``upcast=False`` computes in the
input's precision, which is what the tolerance policy compares low-precision kernels with.

Shape legend: B batch, H query heads, Hk key/value heads, L query length, S key length, E head dim,
Ev value head dim. Leading batch dims ``...`` may be any number (including none).
"""
from __future__ import annotations

import math

import torch

from fastattn import _philox

__all__ = [
    "scores",
    "apply_mask",
    "softmax",
    "dropout",
    "weighted_sum",
    "softcap_scores",
    "alibi_bias",
    "window_visible",
    "softmax_with_sinks",
    "scaled_dot_product_attention",
    "attention_weights",
    "dropout_keep_mask",
]


def _compute_dtype(t: torch.Tensor, upcast: bool) -> torch.dtype:
    return torch.float64 if upcast else t.dtype


def scores(query: torch.Tensor, key: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``scale * query @ key^T``: (..., L, E) x (..., S, E) -> (..., L, S); scale defaults to 1/sqrt(E)."""
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    return (query @ key.transpose(-2, -1)) * scale


def apply_mask(s: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
               causal_offset: int = 0) -> torch.Tensor:
    """Bool mask: False hides a key (score -> -inf); float mask: added to the scores.
    ``is_causal``: key j is visible to query i iff j <= i + causal_offset; combines with the mask.
    ``causal_offset`` 0 is top-left alignment (torch's ``is_causal``), S - L lower-right (the query block
    sits at the end of the keys: torch's ``causal_lower_right``)."""
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(s.dtype)
    if is_causal:
        L, S = s.shape[-2], s.shape[-1]
        visible = torch.ones(L, S, dtype=torch.bool, device=s.device).tril(diagonal=causal_offset)
        s = s.masked_fill(~visible, float("-inf"))
    return s


def softcap_scores(s: torch.Tensor, softcap: float) -> torch.Tensor:
    """Logit soft-capping (Gemma 2): ``softcap * tanh(s / softcap)``; softcap 0 leaves s unchanged."""
    return s if not softcap else softcap * torch.tanh(s / softcap)


def _positions(L: int, S: int, causal_offset: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(i', j): query row i's position i' = i + causal_offset as an (L, 1) column, key j as a (1, S) row."""
    i = torch.arange(L, device=device)[:, None] + causal_offset
    return i, torch.arange(S, device=device)[None, :]


def alibi_bias(slopes: torch.Tensor, L: int, S: int, causal_offset: int = 0) -> torch.Tensor:
    """ALiBi: ``slope[b, h] * (j - i')`` with i' = i + causal_offset, as (B, H, L, S) (slopes (B, H)) or
    (H, L, S) (slopes (H,)). Keys before the query's position get a negative bias, growing with the
    distance (the BLOOM / MPT convention; for causal attention it is flash-attention's -slope * |i' - j|)."""
    i, j = _positions(L, S, causal_offset, slopes.device)
    return slopes[..., None, None] * (j - i)


def window_visible(L: int, S: int, window: tuple[int, int], causal_offset: int = 0, device=None) -> torch.Tensor:
    """Sliding window (left, right): key j visible to query i iff i' - left <= j <= i' + right, i' = i +
    causal_offset; -1 leaves that side unbounded. Bool (L, S), True = visible."""
    left, right = window
    i, j = _positions(L, S, causal_offset, device)
    visible = torch.ones(L, S, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    return visible


def softmax_with_sinks(s: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax whose denominator also holds ``exp(sink_h)`` (attention sinks, gpt-oss): s (..., H, L, S),
    sinks (H,). Returns (p, lse): p_ij = exp(s_ij - lse_i), lse_i = log(sum_j exp(s_ij) + exp(sink_h)).
    The sink has no value: a row's probabilities sum to less than 1 (to 0 when every key is hidden)."""
    sink = sinks.to(s.dtype)[:, None, None].expand(*s.shape[:-1], 1)
    lse = torch.logsumexp(torch.cat([s, sink], dim=-1), dim=-1)
    return torch.exp(s - lse.unsqueeze(-1)), lse


def logsumexp(s: torch.Tensor) -> torch.Tensor:
    """Row-wise log(sum_j exp(s_ij)); -inf for rows with no visible key."""
    return torch.logsumexp(s, dim=-1)


def softmax(s: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax; rows whose keys are all hidden (all -inf) give zeros, not NaN."""
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    # Dead rows are computed on zeros and then zeroed, so no exp(-inf - -inf) NaN reaches autograd.
    s = torch.where(dead, torch.zeros_like(s), s)
    p = torch.exp(s - logsumexp(s).unsqueeze(-1))
    return torch.where(dead, torch.zeros_like(p), p)


def dropout_keep_mask(seed: int, shape: tuple[int, ...], p: float, device=None, batch_offset: int = 0) -> torch.Tensor:
    """The exact keep-mask fastattn's kernels draw for ``seed``: bool tensor of ``shape`` (..., H, L, S).
    Leading dims before H are flattened into the kernels' batch index b, counted from ``batch_offset``
    (varlen: sequence b of a packed batch is batch index b)."""
    *batch, H, L, S = shape
    B = math.prod(batch) if batch else 1
    keep = _philox.dropout_keep_mask(seed, batch_offset + B, H, L, S, p, device)[batch_offset:]
    return keep.reshape(shape)


def dropout(p_attn: torch.Tensor, dropout_p: float, seed: int | None, batch_offset: int = 0) -> torch.Tensor:
    """Zero the probabilities fastattn's Philox stream drops for ``seed``, scale the rest by 1/(1-p)."""
    if dropout_p == 0.0:
        return p_attn
    if seed is None:
        raise ValueError("dropout_seed is required to rebuild fastattn's dropout mask when dropout_p > 0")
    keep = dropout_keep_mask(seed, tuple(p_attn.shape), dropout_p, p_attn.device, batch_offset)
    return torch.where(keep, p_attn / (1.0 - dropout_p), torch.zeros_like(p_attn))


def weighted_sum(p_attn: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``p_attn @ value``: (..., L, S) x (..., S, Ev) -> (..., L, Ev)."""
    return p_attn @ value


def _repeat_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool):
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    return key, value


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    upcast: bool = True,
    dropout_seed: int | None = None,
    return_lse: bool = False,
    dropout_batch_offset: int = 0,
    causal_offset: int = 0,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
):
    """Textbook attention with torch SDPA semantics (see ``fastattn.scaled_dot_product_attention``).

    The decoder variants, in this order on the scores s = scale * q . k of query row i (position
    i' = i + causal_offset) and key j: ``softcap`` (s -> softcap * tanh(s / softcap)), ``alibi_slopes``
    (H,) or (B, H) (+ slope * (j - i'), ``alibi_bias``), the mask, causal, ``window`` (left, right)
    (``window_visible``), then the softmax, whose denominator also holds exp(sink_h) with ``sinks`` (H,)
    (``softmax_with_sinks``; the lse then includes the sink).

    Returns the output in float64 when ``upcast`` else in the input dtype; with ``return_lse`` also the
    float32 log-sum-exp (..., L). ``dropout_seed``: the seed fastattn's kernels used (rebuilds their mask);
    ``dropout_batch_offset``: the kernels' batch index of the first item (varlen sequences).
    ``causal_offset``: with ``is_causal``, key j is visible to query i iff j <= i + causal_offset (S - L:
    lower-right). Differentiable (autograd through the formulas), which gives the reference gradients."""
    dt = _compute_dtype(query, upcast)
    q, k, v = query.to(dt), key.to(dt), value.to(dt)
    k, v = _repeat_kv(q, k, v, enable_gqa)
    mask = attn_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dt)
    s = softcap_scores(scores(q, k, scale), softcap)
    L, S = s.shape[-2], s.shape[-1]
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes.to(dt), L, S, causal_offset)  # (H,) or (B, H) against (B, H, L, S)
    s = apply_mask(s, mask, is_causal, causal_offset)
    if tuple(window) != (-1, -1):
        s = s.masked_fill(~window_visible(L, S, window, causal_offset, s.device), float("-inf"))
    if sinks is not None:
        p, lse = softmax_with_sinks(s, sinks)
    else:
        p, lse = softmax(s), logsumexp(s)
    out = weighted_sum(dropout(p, dropout_p, dropout_seed, dropout_batch_offset), v)
    if return_lse:
        return out, lse.float()
    return out


def attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    upcast: bool = True,
    causal_offset: int = 0,
) -> torch.Tensor:
    """The softmax probabilities (..., L, S) (no dropout), rows with no visible key all zero."""
    dt = _compute_dtype(query, upcast)
    q, k = query.to(dt), key.to(dt)
    k, _ = _repeat_kv(q, k, k, enable_gqa)
    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(dt)
    return softmax(apply_mask(scores(q, k, scale), mask, is_causal, causal_offset))


# Naive references of the other operations, one module each, re-exported here.
from fastattn.reference.varlen import *  # noqa: E402,F401,F403
from fastattn.reference.additive import *  # noqa: E402,F401,F403
from fastattn.reference.hard import *  # noqa: E402,F401,F403
from fastattn.reference.layers import *  # noqa: E402,F401,F403
from fastattn.reference.decode import *  # noqa: E402,F401,F403

