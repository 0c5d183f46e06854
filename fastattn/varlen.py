"""Variable-length (packed) attention and the pad/unpad helpers (issue 5).

Packed layout (as flash-attention's ``flash_attn_varlen_func`` and torch's ``varlen_attn``): the
sequences of a batch are concatenated along the token dim, query (total_q, H, E), key (total_k, Hk, E),
value (total_k, Hk, Ev), with int32 cumulative lengths ``cu_seqlens_q`` / ``cu_seqlens_k`` of size B + 1.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import reference

__all__ = ["varlen_attention", "unpad", "pad"]


def varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    backend: str | None = None,
):
    """PLACEHOLDER (runs the reference) until the fused kernels land: see fastattn.reference.varlen."""
    return reference.varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                      enable_gqa=enable_gqa, upcast=False, return_lse=return_lse)


def unpad(x: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Padded -> packed. ``x`` (B, S, ...), ``attention_mask`` (B, S) bool or 0/1 integers (True/1 = real
    token, as HuggingFace's ``attention_mask``). Returns ``(x_packed (total, ...), indices (total,) int64
    into the flattened (B*S) token dim, cu_seqlens (B+1,) int32, max_seqlen)``. Differentiable in ``x``."""
    if not isinstance(x, Tensor) or not isinstance(attention_mask, Tensor):
        raise TypeError("unpad(x, attention_mask) takes two tensors")
    if attention_mask.dim() != 2 or x.dim() < 2 or tuple(x.shape[:2]) != tuple(attention_mask.shape):
        raise ValueError(f"attention_mask must be (B, S) matching x's first two dims, got attention_mask "
                         f"{tuple(attention_mask.shape)} and x {tuple(x.shape)}")
    if attention_mask.dtype.is_floating_point or attention_mask.is_complex():
        raise TypeError(f"attention_mask must be bool or integer (1 = token), got {attention_mask.dtype}")
    keep = attention_mask.bool()
    seqlens = keep.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    cu = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=x.device)
    if keep.shape[0]:
        cu[1:] = torch.cumsum(seqlens, 0, dtype=torch.int32)
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    packed = x.reshape(-1, *x.shape[2:]).index_select(0, indices)
    return packed, indices, cu, max_seqlen


def pad(x: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Packed -> padded: ``x`` (total, ...) and the ``indices`` from :func:`unpad` give (batch, seqlen, ...)
    with zeros at the padding positions. Differentiable in ``x``."""
    if not isinstance(x, Tensor) or not isinstance(indices, Tensor):
        raise TypeError("pad(x, indices, batch, seqlen) takes tensors x and indices")
    if indices.dim() != 1 or indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices must be 1-D with one entry per row of x ({x.shape[0]}), got "
                         f"{tuple(indices.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= batch * seqlen):
        raise ValueError(f"indices must lie in [0, batch*seqlen) = [0, {batch * seqlen})")
    out = x.new_zeros(batch * seqlen, *x.shape[1:])
    out = out.index_put((indices,), x)
    return out.reshape(batch, seqlen, *x.shape[1:])
