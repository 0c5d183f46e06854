"""Naive hard (top-k) attention: full scores, an explicit stable top-k, softmax over the selected keys.

Shape legend: B... leading batch dims, H query heads, Hk key/value heads, L query length, S key length,
E head dim, Ev value head dim, K = top_k.

    s      = scale * q @ k^T + mask                       (..., H, L, S), hidden keys -inf (causal too)
    sel    = the K best visible keys of each row, ordered by (-s, j): ties go to the lowest key index
    p      = softmax over the selected scores only        (top_k = 1: p = 1 for the best key)
    out_i  = sum_t p_it v_{sel_it}                         rows with no visible key: 0

Selection is done by a stable sort of -s (torch.topk's order among equal values is unspecified), so the
tie rule is explicit. NaN scores are never selected. Differentiable through autograd (the gradients flow
through the gathered scores; the selection itself is piecewise constant, so for top_k = 1 the query/key
gradients are 0).
"""
from __future__ import annotations

import torch

__all__ = ["hard_attention", "hard_select"]


def hard_select(s: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, valid): the ``top_k`` best keys of each row of the masked scores ``s`` (..., L, S) as
    int64 (..., L, top_k) ordered by descending score, ties by ascending key index; slots past the number
    of visible (finite-or-+inf, non-NaN, > -inf) keys hold -1 and ``valid`` False."""
    S = s.shape[-1]
    # NaN and -inf both sort last and are never valid.
    key = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # stable: equal scores keep j order
    kk = min(top_k, S)
    idx = order[..., :kk]
    valid = torch.gather(key, -1, idx) > float("-inf")
    if kk < top_k:
        pad = idx.new_zeros(*idx.shape[:-1], top_k - kk)
        idx = torch.cat([idx, pad], -1)
        valid = torch.cat([valid, torch.zeros_like(pad, dtype=torch.bool)], -1)
    idx = torch.where(valid, idx, torch.full_like(idx, -1))
    return idx, valid


def hard_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    top_k: int = 1,
    enable_gqa: bool = False,
    *,
    upcast: bool = True,
    return_indices: bool = False,
    return_probs: bool = False,
):
    """Textbook hard attention (see :func:`fastattn.hard_attention` for the conventions).

    Computes in float64 when ``upcast`` else in the input dtype; returns out (..., H, L, Ev), and with
    ``return_indices`` the int64 indices (..., H, L, top_k) (-1 for unused slots), with ``return_probs``
    the selected probabilities (..., H, L, top_k) (0 for unused slots) in the compute dtype."""
    from fastattn.reference import _repeat_kv, apply_mask, scores  # the SDPA reference's steps

    dt = torch.float64 if upcast else query.dtype
    q, k, v = query.to(dt), key.to(dt), value.to(dt)
    k, v = _repeat_kv(q, k, v, enable_gqa)
    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(dt)
    s = apply_mask(scores(q, k, scale), mask, is_causal)
    with torch.no_grad():
        idx, valid = hard_select(s.detach(), top_k)
    safe = idx.clamp_min(0)
    sel = torch.gather(s, -1, safe)
    # Unused slots: score 0 before masking so no -inf/NaN reaches autograd, then probability 0.
    sel = torch.where(valid, sel, torch.zeros_like(sel))
    m = torch.where(valid, sel, torch.full_like(sel, float("-inf"))).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.where(valid, torch.exp(sel - m), torch.zeros_like(sel))
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    # out_i = sum_t p_it v_{idx_it}: gather the value rows of every slot.
    *lead, L, K = safe.shape
    Ev = v.shape[-1]
    g = torch.gather(v, -2, safe.reshape(*lead, L * K, 1).expand(*lead, L * K, Ev)).reshape(*lead, L, K, Ev)
    out = (p.unsqueeze(-1) * g).sum(-2)
    res = (out,)
    if return_indices:
        res += (idx,)
    if return_probs:
        res += (p,)
    return res[0] if len(res) == 1 else res
