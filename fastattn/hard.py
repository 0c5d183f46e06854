"""Hard (top-k) attention: each query attends to its ``top_k`` best-scoring visible keys only.

One path, as for SDPA: :func:`hard_attention` (validate, normalise to 4-D, pick the backend) -> custom ops
``fastattn::hard_fwd`` / ``fastattn::hard_bwd`` (fastattn/_ops/hard.py: fake impls + one autograd formula)
-> launcher (fastattn/_cpu.py, kernels/hard.py; the contract is stated in fastattn/_ops/hard.py) -> kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import _launchers, reference
from fastattn import _validation as check
from fastattn._normalise import connected_zeros, default_scale, mask_to_4d, to_4d
from fastattn._ops.hard import hard_fwd
from fastattn._validation import MAX_TOP_K  # noqa: F401 - public here (the kernels' limit on top_k)

__all__ = ["hard_attention", "MAX_TOP_K"]


# ============================================================================================ public API
def hard_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    top_k: int = 1,
    *,
    enable_gqa: bool = False,
    backend: str | None = None,
    return_indices: bool = False,
):
    """Fused hard attention: each query takes the ``top_k`` best-scoring visible keys, softmax over those only.

    Shapes (B... any number of leading batch dims, H heads, L query length, S key length, E head dim,
    Ev value head dim, K = top_k): query (..., H, L, E), key (..., Hk, S, E), value (..., Hk, S, Ev)
    -> (..., H, L, Ev). Hk == H unless ``enable_gqa`` (then query head h uses kv head h // (H // Hk)).

    Scores ``s = scale * q.k + mask`` (scale defaults to 1/sqrt(E)). ``attn_mask`` broadcasts to
    (..., H, L, S): bool True = attend, float values are added (-inf hides). ``is_causal``: key j is
    visible to query i iff j <= i (top-left aligned, as SDPA); combines with the mask.

    * ``top_k = 1``: out_i = v_j of the best visible key (ties: lowest index j).
    * ``top_k > 1``: softmax over the K best visible keys (ordered by score, ties by lowest index); rows
      with fewer visible keys use those; rows with none give zeros. 1 <= top_k <= MAX_TOP_K (64).

    One fused pass keeps a running top-k per query row; no (L, S) score matrix is stored. Scores are
    compared in float32 (float64 for float64 inputs), so keys whose scores tie or nearly tie in that
    precision may be ranked differently from an exact computation. NaN scores are never selected.

    Gradients: the selection is piecewise constant and is not differentiated. For top_k = 1 the output
    is v_j itself, so query and key get zero gradients and value gets dout scattered onto the chosen rows.
    For top_k > 1 gradients flow through the softmax of the selected scores to query, key and value, and
    to a float ``attn_mask`` (its gradient is built through a dense (B, H, L, S) buffer: O(L * S) memory,
    only when the mask requires grad). The CPU backward is deterministic (owner-computes, no atomics);
    the Triton backward is deterministic too (key-block programs scan the saved indices).

    Args:
        backend: None (CPU tensors -> "cpu", CUDA -> "triton", CUDA float64 -> "reference"), "cpu",
            "triton" or "reference" (the naive formulas, in the input precision).
        return_indices: also return the selected key indices (..., H, L, K) int64, best first, -1 for
            unused slots (they carry no gradient).
    """
    check.check_qkv(query, key, value, enable_gqa)
    check.check_mask(attn_mask, query, check.scores_shape(query, key))
    check.check_scalars(0.0, is_causal, scale, enable_gqa)
    top_k = check.check_top_k(top_k)
    check.check_bool("return_indices", return_indices)
    scale = default_scale(query.shape[-1], scale)
    backend = _launchers.choose_backend(backend, query.device, query.dtype)

    if backend == "reference":
        return reference.hard_attention(query, key, value, attn_mask, is_causal, scale, top_k, enable_gqa,
                                        upcast=False, return_indices=return_indices)

    batch = tuple(query.shape[:-3])
    H, L = query.shape[-3], query.shape[-2]
    S, Ev = key.shape[-2], value.shape[-1]
    q4, k4, v4 = to_4d(query), to_4d(key), to_4d(value)
    mask4 = None if attn_mask is None else mask_to_4d(attn_mask, (*batch, H))

    if min(q4.shape[0], H, L, Ev) == 0 or S == 0:
        out4 = connected_zeros(query, (q4.shape[0], H, L, Ev), q4, k4, v4)
        idx4 = torch.full((q4.shape[0], H, L, top_k), -1, dtype=torch.int32, device=query.device)
    else:
        out4, idx4, _ = hard_fwd(q4, k4, v4, mask4, scale, is_causal, top_k, backend)

    out = out4.reshape(*batch, H, L, Ev) if batch else out4[0]
    if return_indices:
        idx = idx4.long().reshape(*batch, H, L, top_k) if batch else idx4[0].long()
        return out, idx
    return out
