"""Variable-length (packed) attention and the pad/unpad helpers.

Packed layout (as flash-attention's ``flash_attn_varlen_func`` and torch's ``varlen_attn``): the
sequences of a batch are concatenated along the token dim, query (total_q, H, E), key (total_k, Hk, E),
value (total_k, Hk, Ev), with int32 cumulative lengths ``cu_seqlens_q`` / ``cu_seqlens_k`` of size B + 1. The ops,
``fastattn::varlen_fwd`` / ``fastattn::varlen_bwd``, are in fastattn/_ops/varlen.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import _launchers, reference
from fastattn import _validation as check
from fastattn._normalise import connected_zeros, mask_to_4d, needs_out_lo, no_key_lse, op_seed, scale_and_seed
from fastattn._ops.varlen import varlen_fwd

__all__ = ["varlen_attention", "unpad", "pad"]


# --------------------------------------------------------------------------------------- public API
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
    """Fused attention over a packed batch of variable-length sequences (no padding computed).

    Shapes (B sequences, H query heads, Hk key/value heads, E head dim, Ev value head dim):
    query (total_q, H, E), key (total_k, Hk, E), value (total_k, Hk, Ev) -> (total_q, H, Ev).
    Sequence b is query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key/value rows
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``; it attends only to its own keys (the layout of flash-attn's
    ``flash_attn_varlen_func`` and torch's ``varlen_attn``). Each sequence is one SDPA call:

    Args:
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) cumulative lengths on query's device; [0] == 0,
            non-decreasing, [-1] == total_q / total_k.
        max_seqlen_q, max_seqlen_k: ints >= the longest query / key sequence (they size the launch).
        attn_mask: broadcastable to (B, H, max_seqlen_q, max_seqlen_k); sequence b reads its top-left
            (L_b, S_b) corner. Bool: True = attend; float (query dtype or float32): added to the scores.
        dropout_p: dropout on the probabilities; Philox coordinates (b, h, i, j) with i, j local to the
            sequence, so the same seed drops what padded ``fastattn.scaled_dot_product_attention`` does.
        is_causal: key j visible to query i iff j <= i, top-left aligned within each sequence.
        scale: defaults to 1 / sqrt(E).  enable_gqa: H % Hk == 0, query head h reads kv head h // (H // Hk).
        return_lse: also return the float32 log-sum-exp (H, total_q) (natural log, -inf for rows that see
            no key); it carries no gradient.
        backend: None (CPU tensors -> "cpu", CUDA -> "triton"), "cpu", "triton" or "reference".

    Rows with no visible key (or sequences with no keys) give zeros and zero gradients. Gradients flow to
    query, key, value and a float attn_mask. The cu_seqlens values are checked on the host (one small copy;
    a sync for CUDA tensors) except while torch.compile traces.
    """
    check.check_packed(query, key, value, enable_gqa)
    check.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, query.device)
    check.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, query.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    max_q = check.check_max_seqlen("max_seqlen_q", max_seqlen_q)
    max_k = check.check_max_seqlen("max_seqlen_k", max_seqlen_k)
    check.check_scalars(dropout_p, is_causal, scale, enable_gqa)
    check.check_bool("return_lse", return_lse)
    total_q, H, E = query.shape
    total_k, Ev = key.shape[0], value.shape[2]
    B = cu_seqlens_q.numel() - 1
    if not torch.compiler.is_compiling():
        check.check_cu_values(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_q, max_k)
    check.check_mask(attn_mask, query, (B, H, max_q, max_k), "(B, H, max_seqlen_q, max_seqlen_k)")
    mask4 = None if attn_mask is None else mask_to_4d(attn_mask, (B, H))
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()  # kernels index cu[b]
    scale, dropout_p, seed = scale_and_seed(E, scale, dropout_p)
    backend = _launchers.choose_backend(backend, query.device, query.dtype)

    if backend == "reference":
        return reference.varlen_attention(
            query, key, value, cu_seqlens_q, cu_seqlens_k, max_q, max_k, attn_mask=mask4, dropout_p=dropout_p,
            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, upcast=False,
            dropout_seed=None if seed is None else int(seed), return_lse=return_lse)

    if min(total_q, H, Ev, total_k, max_q, max_k) == 0:
        out = connected_zeros(query, (total_q, H, Ev), query, key, value)
        lse = no_key_lse(query, (H, total_q))
    else:
        out, lse, _ = varlen_fwd(query, key, value, cu_seqlens_q, cu_seqlens_k, max_q, max_k, mask4, scale,
                                 is_causal, dropout_p, op_seed(seed), backend,
                                 needs_out_lo(query.dtype, query, key, value, mask4))
    return (out, lse) if return_lse else out


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
