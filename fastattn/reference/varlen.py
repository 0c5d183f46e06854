"""Naive variable-length (packed) attention: each sequence on its own, through the SDPA reference.

Packed layout: query (total_q, H, E), key (total_k, Hk, E), value (total_k, Hk, Ev); sequence b holds
rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of query and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of key/value.
``attn_mask`` (optional) broadcasts to (B, H, max_seqlen_q, max_seqlen_k); sequence b reads its top-left
(L_b, S_b) corner. ``is_causal`` is top-left aligned per sequence (as SDPA). Dropout coordinates are
(b, h, i, j) with i, j local to the sequence, so the same seed drops the same entries as padded SDPA.
"""
from __future__ import annotations

import torch

__all__ = ["varlen_attention"]


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    upcast: bool = True,
    dropout_seed: int | None = None,
    return_lse: bool = False,
):
    """Packed attention, one sequence at a time. Returns (total_q, H, Ev) (float64 if ``upcast``) and with
    ``return_lse`` also the float32 log-sum-exp (H, total_q) (natural log, -inf for rows with no key)."""
    from fastattn.reference import scaled_dot_product_attention

    B = cu_seqlens_q.numel() - 1
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    H, Ev = query.shape[1], value.shape[2]
    dt = torch.float64 if upcast else query.dtype
    outs, lses = [], []
    for b in range(B):
        q = query[cq[b]:cq[b + 1]].transpose(0, 1)  # (H, Lb, E)
        k = key[ck[b]:ck[b + 1]].transpose(0, 1)
        v = value[ck[b]:ck[b + 1]].transpose(0, 1)
        Lb, Sb = q.shape[1], k.shape[1]
        mask = None
        if attn_mask is not None:
            m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
            mb = m[b if m.shape[0] > 1 else 0]
            mask = mb[:, :Lb if mb.shape[1] > 1 else 1, :Sb if mb.shape[2] > 1 else 1]
        if Lb == 0:
            outs.append(query.new_zeros(0, H, Ev, dtype=dt))
            lses.append(query.new_zeros(H, 0, dtype=torch.float32))
            continue
        o, lse = _sdpa_one(scaled_dot_product_attention, q, k, v, mask, dropout_p, is_causal,
                           scale, enable_gqa, upcast, dropout_seed, b, Sb)
        outs.append(o.transpose(0, 1))
        lses.append(lse)
    out = torch.cat(outs, 0) if outs else query.new_zeros(0, H, Ev, dtype=dt)
    if return_lse:
        return out, (torch.cat(lses, 1) if lses else query.new_zeros(H, 0, dtype=torch.float32))
    return out


def _sdpa_one(sdpa, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, upcast, seed, b, Sb):
    if Sb == 0:
        H, Lb, Ev = q.shape[0], q.shape[1], v.shape[-1]
        dt = torch.float64 if upcast else q.dtype
        return q.new_zeros(H, Lb, Ev, dtype=dt) + 0 * (q.sum() + v.sum()), q.new_full((H, Lb), float("-inf"),
                                                                                     dtype=torch.float32)
    # Dropout keyed by the sequence index b: the kernels' (b, h, i, j) coordinates.
    return sdpa(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, upcast=upcast, return_lse=True,
                dropout_seed=seed, dropout_batch_offset=b)
