"""The varlen custom ops: ``fastattn::varlen_fwd`` / ``fastattn::varlen_bwd`` (packed batches).

Same shape as the attention ops (fastattn/_ops/attention.py): one forward and one backward op, the CPU (C++)
and Triton launchers of the "attention" family behind them (``varlen_fwd`` / ``varlen_bwd`` of fastattn/_cpu.py
and kernels/attention.py), fake implementations for torch.compile / torch.export, and the autograd formula
registered once here.

Packed layout (B sequences, H query heads, Hk key/value heads): q (total_q, H, E), k (total_k, Hk, E),
v (total_k, Hk, Ev), int32 cu_q / cu_k (B + 1) on q's device; mask None or 4-D with every dim 1 or full
(B, H, max_q, max_k). Outputs: out (total_q, H, Ev) in q's dtype, lse (H, total_q) float32, and for fp16 /
bf16 training (``return_lo``) out_lo (total_q, H, Ev) int16, saved for the backward's delta (see
fastattn/_ops/attention.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import _launchers
from fastattn._ops.attention import contiguous_grad, lo_or_none, no_lo


@torch.library.custom_op("fastattn::varlen_fwd", mutates_args=())
def varlen_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    max_q: int,
    max_k: int,
    mask: Tensor | None,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    seed: Tensor,
    backend: str,
    return_lo: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out (total_q, H, Ev), lse (H, total_q) float32, natural log, -inf for rows with no visible key,
    out_lo (total_q, H, Ev) int16 when ``return_lo`` else empty). ``seed``: int64 scalar tensor on the CPU
    (Philox key; ignored if dropout_p == 0)."""
    launcher = _launchers.launcher_for("attention", backend, q.device)
    res = launcher.varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, mask, scale=scale, is_causal=is_causal,
                              dropout_p=dropout_p, seed=int(seed.item()), return_lo=return_lo)
    return res if return_lo else (*res, no_lo(q))


@varlen_fwd.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, mask, scale, is_causal, dropout_p, seed, backend, return_lo):
    total_q, H, _ = q.shape
    lo = q.new_empty(total_q, H, v.shape[2], dtype=torch.int16) if return_lo else no_lo(q)
    return q.new_empty(total_q, H, v.shape[2]), q.new_empty(H, total_q, dtype=torch.float32), lo


@torch.library.custom_op("fastattn::varlen_bwd", mutates_args=())
def varlen_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    out_lo: Tensor | None,
    cu_q: Tensor,
    cu_k: Tensor,
    max_q: int,
    max_k: int,
    mask: Tensor | None,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    seed: Tensor,
    backend: str,
    mask_needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask), contiguous; dmask has the mask's 4-D shape when ``mask_needs_grad`` else is
    empty. ``out_lo``: the forward's (``return_lo``), or None (or empty)."""
    launcher = _launchers.launcher_for("attention", backend, q.device)
    dq, dk, dv, dmask = launcher.varlen_bwd(
        dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, mask, scale=scale, is_causal=is_causal,
        dropout_p=dropout_p, seed=int(seed.item()), mask_needs_grad=mask_needs_grad, out_lo=lo_or_none(out_lo))
    if dmask is None:
        dmask = q.new_empty(0)
    return contiguous_grad(dq), contiguous_grad(dk), contiguous_grad(dv), dmask


@varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, out_lo, cu_q, cu_k, max_q, max_k, mask, scale, is_causal, dropout_p, seed,
      backend, mask_needs_grad):
    dmask = torch.empty_like(mask, memory_format=torch.contiguous_format) if mask_needs_grad else q.new_empty(0)
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device), dmask)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, mask, scale, is_causal, dropout_p, seed, backend, return_lo = inputs
    out, lse, out_lo = output
    ctx.save_for_backward(q, k, v, out, lse, out_lo if return_lo else None, cu_q, cu_k, mask, seed)
    ctx.params = (max_q, max_k, scale, is_causal, dropout_p, backend)
    ctx.mark_non_differentiable(lse, out_lo)  # as in fastattn::attention_fwd: no gradient through these


def _backward(ctx, dout, _dlse, _dlo):
    q, k, v, out, lse, out_lo, cu_q, cu_k, mask, seed = ctx.saved_tensors
    max_q, max_k, scale, is_causal, dropout_p, backend = ctx.params
    mask_needs_grad = mask is not None and ctx.needs_input_grad[7]
    dq, dk, dv, dmask = varlen_bwd(dout, q, k, v, out, lse, out_lo, cu_q, cu_k, max_q, max_k, mask, scale,
                                   is_causal, dropout_p, seed, backend, mask_needs_grad)
    return (dq, dk, dv, None, None, None, None, (dmask if mask_needs_grad else None), None, None, None, None,
            None, None)


varlen_fwd.register_autograd(_backward, setup_context=_setup_context)
