"""Naive decoder attention against a KV cache: each sequence on its own, the textbook formula step by step.

Shape legend: B batch, L new query rows per sequence, H query heads, Hk key/value heads (H % Hk == 0, GQA
group G = H // Hk: query head h reads key/value head h // G), E head dim, Ev value head dim.

Cache layouts (the arguments of ``fastattn.kernels.decode.decode_fwd``):

* contiguous: ``k_cache`` (B, S_max, Hk, E), ``v_cache`` (B, S_max, Hk, Ev); sequence b's key j is
  ``k_cache[b, j]`` (flash-attention's ``flash_attn_with_kvcache`` layout);
* paged: ``k_cache`` (num_blocks, page, Hk, E), ``v_cache`` (num_blocks, page, Hk, Ev) with ``block_table``
  (B, max_blocks) int32; sequence b's key j is ``k_cache[block_table[b, j // page], j % page]`` (vLLM's layout).

``cache_seqlens`` (B,) int32: sequence b has keys 0 .. n - 1, n = cache_seqlens[b]. Query row i of L sits at
absolute position i' = n - L + i (the new rows are the last L positions of the sequence). For each (b, h, i):

    s_j   = scale * q_i . k_j                                  j = 0 .. n - 1
    s_j   = softcap * tanh(s_j / softcap)                      softcap > 0
    s_j  += slope_h * (j - i')                                 alibi_slopes (H,) or (B, H)
    s_j  += mask[b, h, i, j]                                   float mask; a bool mask hides j where False
    s_j   = -inf unless j <= i' (causal), and i' - left <= j <= i' + right (window; -1: unbounded)
    lse   = log(sum_j exp(s_j) + exp(sink_h))                  the sink term only with sinks (H,)
    out_i = sum_j exp(s_j - lse) v_j                           the sink joins the denominator, has no value

Rows with no visible key give out = 0 and lse = -inf (lse = sink_h with sinks: the sink alone fills the
denominator). ``mask`` (contiguous caches only): bool (True = attend) or float, 4-D broadcastable to
(B, H, L, S_max); keys j >= n stay hidden whatever it says. ``upcast=True`` computes in float64;
``upcast=False`` in the input's precision.
"""
from __future__ import annotations

import math

import torch

__all__ = ["decode_attention", "gather_cache"]


def gather_cache(cache: torch.Tensor, b: int, n: int, block_table: torch.Tensor | None = None) -> torch.Tensor:
    """Sequence b's first n cache rows (n, Hk, D): ``cache[b, :n]``, or read page by page through
    ``block_table`` (page j // page_size, slot j % page_size)."""
    if block_table is None:
        return cache[b, :n]
    page = cache.shape[1]
    pages = block_table[b, :math.ceil(n / page)].long()
    return cache[pages].reshape(-1, *cache.shape[2:])[:n]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, L, H, E) to each sequence's cached keys/values (see the module doc).

    Returns out (B, L, H, Ev) (float64 if ``upcast``, else q's dtype) and lse (B, H, L) float32 (natural log)."""
    B, L, H, E = q.shape
    Hk, Ev = k_cache.shape[2], v_cache.shape[3]
    dt = torch.float64 if upcast else q.dtype
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    left, right = window
    if mask is not None:
        mask = mask.expand(B, H, L, k_cache.shape[1])
    out = torch.zeros(B, L, H, Ev, dtype=dt, device=q.device)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(cache_seqlens[b])
        k = gather_cache(k_cache, b, n, block_table).to(dt).permute(1, 0, 2)  # (Hk, n, E)
        v = gather_cache(v_cache, b, n, block_table).to(dt).permute(1, 0, 2)  # (Hk, n, Ev)
        k = k.repeat_interleave(H // Hk, dim=0)  # query head h reads key/value head h // G
        v = v.repeat_interleave(H // Hk, dim=0)
        s = (q[b].to(dt).permute(1, 0, 2) @ k.transpose(-2, -1)) * scale  # (H, L, n)
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        qpos = torch.arange(L, device=q.device)[:, None] + (n - L)  # (L, 1): absolute query positions
        j = torch.arange(n, device=q.device)[None, :]  # (1, n)
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
            s = s + slopes.to(dt)[:, None, None] * (j - qpos).to(dt)
        visible = torch.ones(L, n, dtype=torch.bool, device=q.device)
        if mask is not None:
            m = mask[b, :, :, :n]  # (H, L, n)
            if m.dtype == torch.bool:
                visible = visible & m
            else:
                s = s + m.to(dt)
        if causal:
            visible &= j <= qpos
        if left >= 0:
            visible &= j >= qpos - left
        if right >= 0:
            visible &= j <= qpos + right
        s = s.masked_fill(~visible, float("-inf"))
        if sinks is not None:  # one more logit per row, with no value
            s_all = torch.cat([s, sinks.to(dt)[:, None, None].expand(H, L, 1)], dim=-1)
        else:
            s_all = s
        row_lse = torch.logsumexp(s_all, dim=-1) if s_all.shape[-1] else s_all.new_full((H, L), float("-inf"))
        dead = torch.isneginf(row_lse)[..., None]
        p = torch.where(dead, torch.zeros_like(s), torch.exp(s - torch.where(dead, 0.0, row_lse[..., None])))
        out[b] = (p @ v).permute(1, 0, 2)
        lse[b] = row_lse.float()
    return (out if upcast else out.to(q.dtype)), lse
