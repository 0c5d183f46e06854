"""The additive attention ops: ``fastattn::additive_fwd`` / ``fastattn::additive_bwd``.

q (B, H, L, D), k (B, H, S, D), v (B, H, S, Ev) in any strides, weight (H, D), mask None or 4-D with size-1
dims broadcast. The launchers of the "additive" family (fastattn/_cpu.py, kernels/additive.py) run them; fake
implementations let torch.compile / torch.export trace through; the autograd formula is registered once here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import _launchers


@torch.library.custom_op("fastattn::additive_fwd", mutates_args=())
def additive_fwd(q: Tensor, k: Tensor, v: Tensor, weight: Tensor, mask: Tensor | None, is_causal: bool,
                 backend: str) -> tuple[Tensor, Tensor]:
    """(out, lse): out (B, H, L, Ev) in q's dtype (memory (B, L, H, Ev)), lse (B, H, L) float32 (natural
    log, -inf for rows with no visible key)."""
    launcher = _launchers.launcher_for("additive", backend, q.device)
    return launcher.additive_fwd(q, k, v, weight, mask, is_causal)


@additive_fwd.register_fake
def _(q, k, v, weight, mask, is_causal, backend):
    B, H, L, _ = q.shape
    return (q.new_empty(B, L, H, v.shape[-1]).transpose(1, 2), q.new_empty(B, H, L, dtype=torch.float32))


@torch.library.custom_op("fastattn::additive_bwd", mutates_args=())
def additive_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, weight: Tensor, out: Tensor, lse: Tensor,
                 mask: Tensor | None, is_causal: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dweight), contiguous, in the inputs' dtypes."""
    launcher = _launchers.launcher_for("additive", backend, q.device)
    dq, dk, dv, dw = launcher.additive_bwd(dout, q, k, v, weight, out, lse, mask, is_causal)
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
