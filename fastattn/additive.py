"""Fused additive (Bahdanau) attention: ``additive_attention`` and the ``AdditiveAttention`` layer.

    s_ij = sum_d weight[h, d] * tanh(query[..., h, i, d] + key[..., h, j, d])      (no scale)
    out_i = sum_j softmax_j(s_ij + mask_ij) value_j

The kernels (C++ on CPU, Triton on CUDA) never form the (..., L, S, D) tanh tensor nor the (L, S) score
matrix: memory grows with L + S. Forward returns (out, lse); the backward recomputes the scores from lse.

Layers (same as the SDPA path): public function (validate, normalise to 4-D, pick the backend)
-> custom ops ``fastattn::additive_fwd`` / ``fastattn::additive_bwd`` (fake impls + one autograd formula)
-> launcher (CPU: below; Triton: ``fastattn.kernels.additive``) -> kernel (csrc/additive.cpp,
kernels/additive.py).

Shape legend: B batch (``...``: any number of leading dims), H heads, L query length, S key length,
D hidden (score) dim per head, Ev value dim per head.
"""
from __future__ import annotations

import importlib
import math

import torch
from torch import Tensor

from fastattn import _cpu, reference
from fastattn.functional import _check_like_query, _check_mask, _mask_to_4d, _pick_backend, _to_4d

__all__ = ["additive_attention", "AdditiveAttention"]


# ============================================================================================ launchers
def _cpu_fwd(mod, q: Tensor, k: Tensor, v: Tensor, weight: Tensor, mask: Tensor | None,
             is_causal: bool) -> tuple[Tensor, Tensor]:
    """C++ forward with an explicit kernel module (tests run every ISA). q (B, H, L, D), k (B, H, S, D),
    v (B, H, S, Ev) in any strides; weight (H, D). Returns out (B, H, L, Ev) (memory (B, L, H, Ev)) and
    lse (B, H, L) float32."""
    _cpu._check(q, k, v, mask)
    B, H, L, D = q.shape
    S, Ev = k.shape[2], v.shape[3]
    out = q.new_empty(B, L, H, Ev).transpose(1, 2)
    lse = q.new_empty(B, H, L, dtype=torch.float32)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if S == 0 or Ev == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    p = _cpu.make_params(mod, q, k, v, mask, scale=1.0, is_causal=is_causal, dropout_p=0.0, seed=0)
    p.out, p.lse = _cpu._t4(mod, out), _cpu._t4(mod, lse)
    w = _kernel_weight(weight, q.dtype)
    mod.additive_fwd(p, w.data_ptr())
    return out, lse


def _cpu_bwd(mod, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, weight: Tensor, out: Tensor, lse: Tensor,
             mask: Tensor | None, is_causal: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """C++ backward: (dq, dk, dv, dweight), contiguous, in the inputs' dtypes. Deterministic (no shared
    accumulators; dweight summed from per-row partials in a fixed order)."""
    _cpu._check(q, k, v, mask)
    dq = torch.empty(q.shape, dtype=q.dtype)
    dk = torch.empty(k.shape, dtype=k.dtype)
    dv = torch.empty(v.shape, dtype=v.dtype)
    if min(q.shape[0], q.shape[1], q.shape[2], k.shape[2], v.shape[3]) == 0:
        for g in (dq, dk, dv):
            g.zero_()
        return dq, dk, dv, torch.zeros_like(weight)
    p = _cpu.make_params(mod, q, k, v, mask, scale=1.0, is_causal=is_causal, dropout_p=0.0, seed=0)
    p.out, p.dout, p.lse = _cpu._t4(mod, out), _cpu._t4(mod, dout), _cpu._t4(mod, lse)
    p.dq, p.dk, p.dv = _cpu._t4(mod, dq), _cpu._t4(mod, dk), _cpu._t4(mod, dv)
    w = _kernel_weight(weight, q.dtype)
    dw = torch.empty_like(w)
    mod.additive_bwd(p, w.data_ptr(), dw.data_ptr())
    return dq, dk, dv, dw.to(weight.dtype)


def _kernel_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    # The kernels compute in float32 (float64 for float64 inputs) and read a contiguous (H, D) weight.
    return weight.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).contiguous()


def _launch_fwd(backend, q, k, v, weight, mask, is_causal):
    if q.device.type == "cuda" or backend == "triton":
        return importlib.import_module("fastattn.kernels.additive").additive_fwd(q, k, v, weight, mask, is_causal)
    if backend == "cpu":
        return _cpu_fwd(_cpu.module(), q, k, v, weight, mask, is_causal)
    raise ValueError(f"backend {backend!r} has no additive attention kernel for device {q.device}")


def _launch_bwd(backend, dout, q, k, v, weight, out, lse, mask, is_causal):
    if q.device.type == "cuda" or backend == "triton":
        return importlib.import_module("fastattn.kernels.additive").additive_bwd(
            dout, q, k, v, weight, out, lse, mask, is_causal)
    if backend == "cpu":
        return _cpu_bwd(_cpu.module(), dout, q, k, v, weight, out, lse, mask, is_causal)
    raise ValueError(f"backend {backend!r} has no additive attention kernel for device {q.device}")


# ================================================================================================ ops
@torch.library.custom_op("fastattn::additive_fwd", mutates_args=())
def additive_fwd(q: Tensor, k: Tensor, v: Tensor, weight: Tensor, mask: Tensor | None, is_causal: bool,
                 backend: str) -> tuple[Tensor, Tensor]:
    """(out, lse): out (B, H, L, Ev) in q's dtype (memory (B, L, H, Ev)), lse (B, H, L) float32 (natural
    log, -inf for rows with no visible key)."""
    return _launch_fwd(backend, q, k, v, weight, mask, is_causal)


@additive_fwd.register_fake
def _(q, k, v, weight, mask, is_causal, backend):
    B, H, L, _ = q.shape
    return (q.new_empty(B, L, H, v.shape[-1]).transpose(1, 2), q.new_empty(B, H, L, dtype=torch.float32))


@torch.library.custom_op("fastattn::additive_bwd", mutates_args=())
def additive_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, weight: Tensor, out: Tensor, lse: Tensor,
                 mask: Tensor | None, is_causal: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dweight), contiguous, in the inputs' dtypes."""
    dq, dk, dv, dw = _launch_bwd(backend, dout, q, k, v, weight, out, lse, mask, is_causal)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dw.contiguous()


@additive_bwd.register_fake
def _(dout, q, k, v, weight, out, lse, mask, is_causal, backend):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v, weight))


def _setup_context(ctx, inputs, output):
    q, k, v, weight, mask, is_causal, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, weight, out, lse, mask)
    ctx.params = (is_causal, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, weight, out, lse, mask = ctx.saved_tensors
    is_causal, backend = ctx.params
    dq, dk, dv, dw = additive_bwd(dout, q, k, v, weight, out, lse, mask, is_causal, backend)
    return dq, dk, dv, dw, None, None, None


additive_fwd.register_autograd(_backward, setup_context=_setup_context)


# ========================================================================================= public API
def _check_inputs(query, key, value, weight, is_causal) -> None:
    _check_like_query(query, key, value)
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key hidden dim {key.shape[-1]} does not match query hidden dim {query.shape[-1]}: "
                         f"additive attention needs query and key projected to the same D "
                         f"(query {tuple(query.shape)}, key {tuple(key.shape)})")
    if query.shape[-1] == 0:
        raise ValueError(f"query/key hidden dim (last dim) must be at least 1, got shape {tuple(query.shape)}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key length {key.shape[-2]} does not match value length {value.shape[-2]} "
                         f"(key {tuple(key.shape)}, value {tuple(value.shape)})")
    if key.shape[:-2] != value.shape[:-2] or key.shape[:-2] != query.shape[:-2]:
        raise ValueError(f"query, key and value batch/head dims differ: query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}, value {tuple(value.shape)}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor (H, D), got {type(weight).__name__}")
    H, D = query.shape[-3], query.shape[-1]
    if weight.dim() != 2 or tuple(weight.shape) != (H, D):
        raise ValueError(f"weight must have shape (H, D) = {(H, D)}, got {tuple(weight.shape)}")
    if weight.dtype != query.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match query dtype {query.dtype}")
    if weight.device != query.device:
        raise ValueError(f"weight is on {weight.device} but query is on {query.device}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")


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
    _check_inputs(query, key, value, weight, is_causal)
    _check_mask(attn_mask, query, key)
    backend = _pick_backend(backend, query.device, query.dtype)
    if backend == "reference":
        return reference.additive_attention(query, key, value, weight, attn_mask, is_causal, upcast=False,
                                            return_lse=return_lse)

    batch = tuple(query.shape[:-3])
    H, L = query.shape[-3], query.shape[-2]
    S, Ev = key.shape[-2], value.shape[-1]
    q4, k4, v4 = _to_4d(query), _to_4d(key), _to_4d(value)
    mask4 = None if attn_mask is None else _mask_to_4d(attn_mask, (*batch, H))
    if min(q4.shape[0], H, L, S, Ev) == 0:
        out4 = query.new_zeros(q4.shape[0], H, L, Ev)
        lse4 = query.new_full((q4.shape[0], H, L), float("-inf"), dtype=torch.float32)
        if any(t.requires_grad for t in (query, key, value, weight)):  # zero gradients, graph connected
            out4 = out4 + 0 * (q4.sum() + k4.sum() + v4.sum() + weight.sum())
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
