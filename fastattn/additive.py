"""Fused additive (Bahdanau) attention: ``additive_attention`` and the ``AdditiveAttention`` layer.

    s_ij = sum_d weight[h, d] * tanh(query[..., h, i, d] + key[..., h, j, d])      (no scale)
    out_i = sum_j softmax_j(s_ij + mask_ij) value_j

The kernels (C++ on CPU, Triton on CUDA) never form the (..., L, S, D) tanh tensor nor the (L, S) score
matrix: memory grows with L + S. Forward returns (out, lse); the backward recomputes the scores from lse.

Layers (same as the SDPA path): public function (validate, normalise to 4-D, pick the backend)
-> custom ops ``fastattn::additive_fwd`` / ``fastattn::additive_bwd`` (fastattn/_ops/additive.py: fake impls
and one autograd formula) -> launcher (fastattn/_cpu.py, kernels/additive.py) -> kernel (csrc/additive.cpp,
kernels/additive.py).

Shape legend: B batch (``...``: any number of leading dims), H heads, L query length, S key length,
D hidden (score) dim per head, Ev value dim per head.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastattn import _launchers, reference
from fastattn import _validation as check
from fastattn._normalise import connected_zeros, mask_to_4d, no_key_lse, to_4d
from fastattn._ops.additive import additive_fwd

__all__ = ["additive_attention", "AdditiveAttention"]


# ========================================================================================= public API
def additive_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    weight: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    *,
    backend: str | None = None,
    return_lse: bool = False,
):
    """Fused additive (Bahdanau) attention.

    ``s_ij = sum_d weight[h, d] * tanh(query[..., h, i, d] + key[..., h, j, d])`` (no scale), masked,
    softmax over keys, weighted sum of value.

    Shapes: query (..., H, L, D), key (..., H, S, D) (both already projected to the same D),
    value (..., H, S, Ev), weight (H, D) -> (..., H, L, Ev). All of one floating dtype and device.

    Args:
        attn_mask: broadcastable to (..., H, L, S). Bool: True means the key takes part in attention.
            Float (query dtype or float32): added to the scores (-inf hides a key). It gets no gradient.
        is_causal: key j visible to query i iff j <= i (top-left aligned). Combines with attn_mask.
        backend: None (auto: CPU tensors -> "cpu", CUDA tensors -> "triton"), "cpu", "triton", "reference".
        return_lse: also return the float32 log-sum-exp of the scores (..., H, L) (-inf for rows with no
            visible key). It carries no gradient.

    Rows whose keys are all hidden give zeros (and zero gradients), never NaN. Memory grows with L + S
    (the kernels recompute scores tile by tile), not with L x S x D. Gradients flow to query, key, value
    and weight; the weight gradient is reduced deterministically. Inputs are never modified.
    """
    check.check_additive(query, key, value, weight, is_causal)
    check.check_mask(attn_mask, query, check.scores_shape(query, key))
    backend = _launchers.choose_backend(backend, query.device, query.dtype)
    if backend == "reference":
        return reference.additive_attention(query, key, value, weight, attn_mask, is_causal, upcast=False,
                                            return_lse=return_lse)

    batch = tuple(query.shape[:-3])
    H, L = query.shape[-3], query.shape[-2]
    S, Ev = key.shape[-2], value.shape[-1]
    q4, k4, v4 = to_4d(query), to_4d(key), to_4d(value)
    mask4 = None if attn_mask is None else mask_to_4d(attn_mask, (*batch, H))
    if min(q4.shape[0], H, L, S, Ev) == 0:
        out4 = connected_zeros(query, (q4.shape[0], H, L, Ev), q4, k4, v4, weight)
        lse4 = no_key_lse(query, (q4.shape[0], H, L))
    else:
        out4, lse4 = additive_fwd(q4, k4, v4, weight, mask4, is_causal, backend)
    out = out4.reshape(*batch, H, L, Ev) if batch else out4[0]
    if return_lse:
        lse = lse4.reshape(*batch, H, L) if batch else lse4[0]
        return out, lse
    return out


# ============================================================================================== layer
class AdditiveAttention(torch.nn.Module):
    """Additive (Bahdanau) attention layer: ``score(q_i, k_j) = w . tanh(W_q q_i + b + W_k k_j)`` per head.

    Args:
        query_dim: Eq, features of the query (decoder state).
        key_dim: Ek, features of the key (encoder state).
        hidden_dim: total hidden size of the projections; split over heads, so each head scores with
            D = hidden_dim // num_heads (hidden_dim must be divisible by num_heads).
        num_heads: H. The value is split over heads too (value_dim // H features each) and the heads'
            outputs are concatenated back to value_dim, so the output has the value's features.
        value_dim: Ev, features of the value; defaults to key_dim (Bahdanau: values are the encoder
            states). Must be divisible by num_heads.
        bias: a bias on the query projection (one bias suffices: a key bias would just add to it).

    Parameters: ``q_proj`` (Linear Eq -> hidden_dim), ``k_proj`` (Linear Ek -> hidden_dim, no bias) and
    ``weight`` (H, D), the score vector of each head. There is no value or output projection.

    forward(query (B, L, Eq), key (B, S, Ek), value (B, S, Ev), attn_mask=None, is_causal=False,
    need_weights=False) -> (B, L, Ev), or ((B, L, Ev), weights (B, H, L, S)) with ``need_weights``.
    ``attn_mask``: a bool (B, S) key-padding mask (True = attend), or any mask broadcastable to
    (B, H, L, S) in :func:`additive_attention`'s convention (bool True = attend, float added). A 2-D bool
    mask of shape (B, S) is always read as key padding: pass an (L, S) mask with L == B as (1, 1, L, S).
    The weights (``need_weights``) are per head, computed by the reference formula over blocks of query
    rows (bounded memory, differentiable); they need a second pass over D, the output does not.
    Unbatched inputs (L, Eq) / (S, Ek) / (S, Ev) are accepted too.
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int, num_heads: int = 1,
                 value_dim: int | None = None, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        for name, n in (("query_dim", query_dim), ("key_dim", key_dim), ("hidden_dim", hidden_dim),
                        ("num_heads", num_heads)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        value_dim = key_dim if value_dim is None else value_dim
        if isinstance(value_dim, bool) or not isinstance(value_dim, int) or value_dim < 1:
            raise ValueError(f"value_dim must be a positive int or None, got {value_dim!r}")
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
        if value_dim % num_heads:
            raise ValueError(f"value_dim ({value_dim}) must be divisible by num_heads ({num_heads})")
        kw = {"device": device, "dtype": dtype}
        self.query_dim, self.key_dim, self.hidden_dim = query_dim, key_dim, hidden_dim
        self.num_heads, self.value_dim, self.head_dim = num_heads, value_dim, hidden_dim // num_heads
        self.q_proj = torch.nn.Linear(query_dim, hidden_dim, bias=bias, **kw)
        self.k_proj = torch.nn.Linear(key_dim, hidden_dim, bias=False, **kw)
        self.weight = torch.nn.Parameter(torch.empty(num_heads, self.head_dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.q_proj.reset_parameters()
        self.k_proj.reset_parameters()
        bound = 1.0 / math.sqrt(self.head_dim)
        torch.nn.init.uniform_(self.weight, -bound, bound)

    def extra_repr(self) -> str:
        return (f"query_dim={self.query_dim}, key_dim={self.key_dim}, hidden_dim={self.hidden_dim}, "
                f"num_heads={self.num_heads}, value_dim={self.value_dim}, bias={self.q_proj.bias is not None}")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                is_causal: bool = False, need_weights: bool = False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if attn_mask is not None and attn_mask.dim() == 1:
                attn_mask = attn_mask.unsqueeze(0)
        for name, t, n in (("query", query, self.query_dim), ("key", key, self.key_dim),
                           ("value", value, self.value_dim)):
            if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != n:
                raise ValueError(f"{name} must be (B, N, {n}) (or unbatched (N, {n})), got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        B, L, _ = query.shape
        S = key.shape[1]
        if key.shape[0] != B or value.shape[:2] != key.shape[:2]:
            raise ValueError(f"query (B, L, Eq), key (B, S, Ek) and value (B, S, Ev) disagree: query "
                             f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
        H, D = self.num_heads, self.head_dim
        q = self.q_proj(query).view(B, L, H, D).transpose(1, 2)
        k = self.k_proj(key).view(B, S, H, D).transpose(1, 2)
        v = value.view(B, S, H, self.value_dim // H).transpose(1, 2)
        mask = attn_mask
        if mask is not None and mask.dim() == 2 and tuple(mask.shape) == (B, S) and mask.dtype == torch.bool:
            mask = mask.view(B, 1, 1, S)
        w = self.weight if self.weight.dtype == q.dtype else self.weight.to(q.dtype)
        out = additive_attention(q, k, v, w, mask, is_causal)
        out = out.transpose(1, 2).reshape(B, L, self.value_dim)
        if unbatched:
            out = out[0]
        if not need_weights:
            return out
        attn = _tiled_weights(q, k, w, mask, is_causal)
        return out, (attn[0] if unbatched else attn)


def _tiled_weights(q: Tensor, k: Tensor, w: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
    """Attention probabilities (B, H, L, S) by the reference formula over blocks of query rows, so the
    (rows, S, D) tanh intermediate stays bounded (~16M elements). Exact and differentiable (the row
    softmax needs only its own row); rows with no visible key are zeros."""
    B, H, L, D = q.shape
    S = k.shape[2]
    rows = max(1, min(L, (1 << 24) // max(1, B * H * S * D)))
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    parts = []
    for i0 in range(0, L, rows):
        i1 = min(L, i0 + rows)
        s = reference.additive_scores(q[:, :, i0:i1], k, w)
        m = None if mask is None else (mask if mask.shape[-2] == 1 else mask[..., i0:i1, :])
        if is_causal:
            vis = torch.arange(i0, i1, device=q.device)[:, None] >= torch.arange(S, device=q.device)[None, :]
            m = vis if m is None else (m & vis if m.dtype == torch.bool else
                                        m.to(s.dtype).masked_fill(~vis, float("-inf")))
        parts.append(reference.softmax(reference.apply_mask(s, m if m is None or m.dtype == torch.bool
                                                            else m.to(s.dtype))))
    return torch.cat(parts, dim=2)
