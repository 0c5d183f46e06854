"""Hard (top-k) attention (issue 5): each query attends to its ``top_k`` best-scoring visible keys only.

One path, as for SDPA: :func:`hard_attention` (validate, normalise to 4-D, pick the backend) -> custom ops
``fastattn::hard_fwd`` / ``fastattn::hard_bwd`` (fake impls + one autograd formula) -> launcher (the C++
kernel through ``fastattn._C_<isa>.hard_fwd/hard_bwd``, or ``fastattn.kernels.hard``) -> kernel.

Launcher contract (CPU and Triton):

    hard_fwd(q, k, v, mask, *, scale, is_causal, top_k) -> (out, idx, prob)
    hard_bwd(dout, q, k, v, idx, prob, *, scale, top_k, is_causal) -> (dq, dk, dv, ds)

q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev) any strides; mask None or 4-D with size-1 dims
broadcast. out (B, H, L, Ev) in q's dtype; idx (B, H, L, K) int32 (-1 unused), prob and ds (B, H, L, K)
float32 (the C++ kernel: float64 for float64 inputs), contiguous. The float mask gradient is built here
from ds (see :func:`_dmask_from_ds`).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from fastattn import _launchers, reference
from fastattn.functional import _check_mask, _check_qkv, _check_scalars, _mask_to_4d, _pick_backend, _to_4d

__all__ = ["hard_attention", "MAX_TOP_K"]

#: Largest supported ``top_k`` (the Triton kernel keeps a (BLOCK_M, next_pow2(top_k)) tile of candidates
#: in registers; the C++ kernel a per-row list on the stack).
MAX_TOP_K = 64


def _check_top_k(top_k) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__} ({top_k!r})")
    top_k = int(top_k)
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be in [1, {MAX_TOP_K}] (MAX_TOP_K), got {top_k}")
    return top_k


# ============================================================================================ launchers
def _prob_dtype(dtype: torch.dtype) -> torch.dtype:
    """Saved probabilities / ds of the C++ kernel: its accumulator type (float64 only for float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cpu_hard_fwd(q, k, v, mask, *, scale: float, is_causal: bool, top_k: int, mod=None):
    """C++ forward (``mod``: an explicit ISA module, for tests; default the dispatcher's pick)."""
    from fastattn import _cpu

    mod = _cpu.module() if mod is None else mod
    B, H, L, _ = q.shape
    Ev = v.shape[3]
    out = q.new_empty(B, L, H, Ev).transpose(1, 2)
    idx = torch.empty(B, H, L, top_k, dtype=torch.int32)
    prob = torch.empty(B, H, L, top_k, dtype=_prob_dtype(q.dtype))
    if B * H * L == 0:
        return out, idx, prob
    hp = mod.HardParams()
    p = _cpu.make_params(mod, q, k, v, mask, scale=scale, is_causal=is_causal, dropout_p=0.0, seed=0)
    p.out = _cpu._t4(mod, out)
    hp.base = p
    hp.idx, hp.prob = _cpu._t4(mod, idx), _cpu._t4(mod, prob)
    hp.top_k = top_k
    mod.hard_fwd(hp)
    return out, idx, prob


def _cpu_hard_bwd(dout, q, k, v, idx, prob, *, scale: float, top_k: int, is_causal: bool = False, mod=None):
    """C++ backward (``is_causal`` is not needed: the saved selection already respects it)."""
    from fastattn import _cpu

    mod = _cpu.module() if mod is None else mod
    dq = torch.empty(q.shape, dtype=q.dtype)
    dk = torch.empty(k.shape, dtype=k.dtype)
    dv = torch.empty(v.shape, dtype=v.dtype)
    ds = torch.empty(idx.shape, dtype=prob.dtype)
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:
        for g in (dq, dk, dv, ds):
            g.zero_()
        return dq, dk, dv, ds
    idx, prob = idx.contiguous(), prob.contiguous()
    hp = mod.HardParams()
    p = _cpu.make_params(mod, q, k, v, None, scale=scale, is_causal=False, dropout_p=0.0, seed=0)
    p.dout = _cpu._t4(mod, dout)
    p.dq, p.dk, p.dv = _cpu._t4(mod, dq), _cpu._t4(mod, dk), _cpu._t4(mod, dv)
    hp.base = p
    hp.idx, hp.prob, hp.ds = _cpu._t4(mod, idx), _cpu._t4(mod, prob), _cpu._t4(mod, ds)
    hp.top_k = top_k
    mod.hard_bwd(hp)
    return dq, dk, dv, ds


def _launcher(backend: str, device: torch.device):
    """(fwd, bwd) launcher functions of ``backend`` on ``device``."""
    if device.type == "cuda" or backend == "triton":
        from fastattn.kernels import hard as triton_hard

        return triton_hard.hard_fwd, triton_hard.hard_bwd
    if backend == "cpu":
        return _cpu_hard_fwd, _cpu_hard_bwd
    raise ValueError(f"backend {backend!r} has no hard-attention kernel for device {device}")


# ============================================================================================ custom ops
@torch.library.custom_op("fastattn::hard_fwd", mutates_args=())
def hard_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, is_causal: bool, top_k: int,
             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(out (B, H, L, Ev), idx (B, H, L, K) int32, prob (B, H, L, K) float32)."""
    fwd, _ = _launcher(backend, q.device)
    return fwd(q, k, v, mask, scale=scale, is_causal=is_causal, top_k=top_k)


@hard_fwd.register_fake
def _(q, k, v, mask, scale, is_causal, top_k, backend):
    B, H, L, _ = q.shape
    out = q.new_empty(B, L, H, v.shape[-1]).transpose(1, 2)
    prob_dtype = _prob_dtype(q.dtype) if q.device.type == "cpu" and backend == "cpu" else torch.float32
    return (out, q.new_empty(B, H, L, top_k, dtype=torch.int32), q.new_empty(B, H, L, top_k, dtype=prob_dtype))


@torch.library.custom_op("fastattn::hard_bwd", mutates_args=())
def hard_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, prob: Tensor, scale: float, top_k: int,
             is_causal: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, ds): gradients (contiguous, the inputs' dtypes) and ds (B, H, L, K) float32, the
    gradient of the selected scores (0 for top_k = 1 and for unused slots)."""
    _, bwd = _launcher(backend, q.device)
    dq, dk, dv, ds = bwd(dout, q, k, v, idx, prob, scale=scale, top_k=top_k, is_causal=is_causal)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), ds


@hard_bwd.register_fake
def _(dout, q, k, v, idx, prob, scale, top_k, is_causal, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            torch.empty_like(prob))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, is_causal, top_k, backend = inputs
    _, idx, prob = output
    ctx.save_for_backward(q, k, v, idx, prob, mask)
    ctx.params = (scale, top_k, is_causal, backend)
    ctx.mark_non_differentiable(idx, prob)


def _dmask_from_ds(ds: Tensor, idx: Tensor, mask: Tensor, S: int) -> Tensor:
    """d loss / d mask: ds scattered to the selected (b, h, i, j), summed over the mask's broadcast dims.
    Goes through a dense (B, H, L, S) tensor: O(L * S) memory, only when a float mask needs a
    gradient. Each (row, key) is selected at most once, so the scatter has no collisions (deterministic)."""
    # Unused slots (-1) go to an extra column S that is dropped, so no two writes hit one element.
    dense = torch.zeros(*idx.shape[:-1], S + 1, dtype=ds.dtype, device=ds.device)
    dense.scatter_(-1, torch.where(idx >= 0, idx, S).long(), ds)
    dense = dense[..., :S]
    dims = [d for d in range(4) if mask.shape[d] == 1 and dense.shape[d] != 1]
    if dims:
        dense = dense.sum(dim=dims, keepdim=True)
    return dense.to(mask.dtype)


def _backward(ctx, dout, _didx, _dprob):
    q, k, v, idx, prob, mask = ctx.saved_tensors
    scale, top_k, is_causal, backend = ctx.params
    dq, dk, dv, ds = hard_bwd(dout, q, k, v, idx, prob, scale, top_k, is_causal, backend)
    dmask = None
    if mask is not None and ctx.needs_input_grad[3] and mask.dtype != torch.bool:
        dmask = _dmask_from_ds(ds, idx, mask, k.shape[2])
    return dq, dk, dv, dmask, None, None, None, None


hard_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    _check_qkv(query, key, value, enable_gqa)
    _check_mask(attn_mask, query, key)
    _check_scalars(0.0, is_causal, scale, enable_gqa)
    top_k = _check_top_k(top_k)
    if not isinstance(return_indices, bool):
        raise TypeError(f"return_indices must be a bool, got {type(return_indices).__name__}")
    E = query.shape[-1]
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    backend = _pick_backend(backend, query.device, query.dtype)

    if backend == "reference":
        res = reference.hard_attention(query, key, value, attn_mask, is_causal, scale, top_k, enable_gqa,
                                       upcast=False, return_indices=return_indices)
        return res

    batch = tuple(query.shape[:-3])
    H, L = query.shape[-3], query.shape[-2]
    S, Ev = key.shape[-2], value.shape[-1]
    q4, k4, v4 = _to_4d(query), _to_4d(key), _to_4d(value)
    mask4 = None if attn_mask is None else _mask_to_4d(attn_mask, (*batch, H))

    if min(q4.shape[0], H, L, Ev) == 0 or S == 0:
        out4 = query.new_zeros(q4.shape[0], H, L, Ev)
        idx4 = torch.full((q4.shape[0], H, L, top_k), -1, dtype=torch.int32, device=query.device)
        if query.requires_grad or key.requires_grad or value.requires_grad:
            out4 = out4 + 0 * (q4.sum() + k4.sum() + v4.sum())
    else:
        out4, idx4, _ = hard_fwd(q4, k4, v4, mask4, scale, is_causal, top_k, backend)

    out = out4.reshape(*batch, H, L, Ev) if batch else out4[0]
    if return_indices:
        idx = idx4.long().reshape(*batch, H, L, top_k) if batch else idx4[0].long()
        return out, idx
    return out
