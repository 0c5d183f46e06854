"""Naive references of the layers in ``fastattn.layers``: the papers' formulas, written out.

Each function takes the layer's parameters explicitly, computes in float64 when ``upcast`` (the ground
truth for tests) or in the input's precision otherwise (what the tolerance policy compares low-precision
results with), and is differentiable by autograd. Softmax rows with no visible key give zeros
(:func:`fastattn.reference.softmax`).

Shape legend: B batch, L query length, S key length; T total words, n sentences, N documents.
"""
from __future__ import annotations

import torch

from fastattn.reference import softmax

__all__ = ["multiplicative_attention", "hierarchical_attention", "coattention"]


def _dt(t: torch.Tensor, upcast: bool) -> torch.dtype:
    return torch.float64 if upcast else t.dtype


def _additive(mask: torch.Tensor | None, dt: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dt, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dt)


def multiplicative_attention(query, key, value, weight, bias=None, attn_mask=None, key_padding_mask=None, *,
                             upcast: bool = True):
    """Luong's "general" attention: ``softmax((query W + b) key^T + mask) value`` (unscaled).

    query (B, L, Eq), key (B, S, Ek), value (B, S, Ev), weight (Eq, Ek), bias (Ek,) or None;
    attn_mask broadcastable to (B, L, S) (bool True = attend, or float added); key_padding_mask (B, S) bool
    True = real key. Returns (out (B, L, Ev), weights (B, L, S))."""
    dt = _dt(query, upcast)
    q, k, v, w = query.to(dt), key.to(dt), value.to(dt), weight.to(dt)
    qw = q @ w
    if bias is not None:
        qw = qw + bias.to(dt)
    s = qw @ k.transpose(-2, -1)
    m = _additive(attn_mask, dt)
    if m is not None:
        s = s + m
    if key_padding_mask is not None:
        s = s + _additive(key_padding_mask, dt).unsqueeze(-2)
    p = softmax(s)
    return p @ v, p


def _attend_level(h, lengths, proj_w, proj_b, context, dt):
    """One level of Yang et al.: u_t = tanh(W h_t + b), alpha = softmax_t(u_t . u), pooled = sum alpha_t h_t,
    segment by segment (``lengths`` sums to h.shape[0])."""
    pooled, weights = [], []
    start = 0
    for n in lengths:
        x = h[start:start + n]
        u = torch.tanh(x @ proj_w.to(dt).T + (0 if proj_b is None else proj_b.to(dt)))
        s = u @ context.to(dt)
        a = softmax(s) if n else s
        pooled.append(a @ x if n else h.new_zeros(h.shape[1], dtype=dt))
        weights.append(a)
        start += n
    return (torch.stack(pooled) if pooled else h.new_zeros(0, h.shape[1], dtype=dt)), torch.cat(
        weights) if weights else h.new_zeros(0, dtype=dt)


def hierarchical_attention(words, word_lengths, sentence_lengths, word_weight, word_bias, word_context,
                           sentence_weight, sentence_bias, sentence_context, between_weight=None,
                           between_bias=None, *, upcast: bool = True):
    """Hierarchical attention (Yang et al. 2016), attention part, one sentence / document at a time.

    words (T, D); word_lengths: words per sentence (list of n ints, sum T); sentence_lengths: sentences per
    document (list of N ints, sum n). Word level with (word_weight, word_bias, word_context), optional
    ``tanh(between_weight s + between_bias)`` on each sentence vector, then the sentence level.
    Returns (docs (N, D'), word_weights (T,), sentence_weights (n,))."""
    dt = _dt(words, upcast)
    h = words.to(dt)
    sent, ww = _attend_level(h, word_lengths, word_weight, word_bias, word_context, dt)
    if between_weight is not None:
        sent = torch.tanh(sent @ between_weight.to(dt).T + (0 if between_bias is None else between_bias.to(dt)))
    docs, sw = _attend_level(sent, sentence_lengths, sentence_weight, sentence_bias, sentence_context, dt)
    return docs, ww, sw


def coattention(a, b, weight=None, mask_a=None, mask_b=None, *, upcast: bool = True):
    """Co-attention: affinity ``A = a W b^T`` (``a b^T`` when ``weight`` is None), unscaled;
    a_attended = softmax_rows(A + mask_b) b, b_attended = softmax_rows(A^T + mask_a) a.

    a (B, La, Da), b (B, Lb, Db), weight (Da, Db); masks (B, La) / (B, Lb) bool True = token.
    Returns (a_attended (B, La, Db), b_attended (B, Lb, Da), a_weights (B, La, Lb), b_weights (B, Lb, La))."""
    dt = _dt(a, upcast)
    x, y = a.to(dt), b.to(dt)
    A = (x if weight is None else x @ weight.to(dt)) @ y.transpose(-2, -1)
    s_ab, s_ba = A, A.transpose(-2, -1)
    if mask_b is not None:
        s_ab = s_ab + _additive(mask_b.bool(), dt).unsqueeze(-2)
    if mask_a is not None:
        s_ba = s_ba + _additive(mask_a.bool(), dt).unsqueeze(-2)
    p_ab, p_ba = softmax(s_ab), softmax(s_ba)
    return p_ab @ y, p_ba @ x, p_ab, p_ba
