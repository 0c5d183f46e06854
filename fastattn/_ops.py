"""The custom ops: one forward and one backward op, each with a CPU and a CUDA kernel registered.

``fastattn::attention_fwd`` / ``fastattn::attention_bwd`` take 4-D tensors (B, H, L, E) in any
strides and an optional 4-D mask whose size-1 dims broadcast. ``backend`` selects the launcher on
CPU tensors ("cpu": the C++ kernel; "triton": the Triton kernel under TRITON_INTERPRET=1); CUDA
tensors always run Triton. Fake implementations let torch.compile / torch.export trace through;
the autograd formula is registered once, here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import _launchers


def _out_like(q: Tensor, v: Tensor) -> Tensor:
    # Output memory layout is (B, L, H, Ev) viewed as (B, H, L, Ev): what both kernels write,
    # so a module can reshape it to (B, L, H*Ev) without a copy.
    B, H, L, _ = q.shape
    return q.new_empty(B, L, H, v.shape[-1]).transpose(1, 2)


@torch.library.custom_op("fastattn::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    seed: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(out, lse): out (B, H, L, Ev) in q's dtype, lse (B, H, L) float32 (natural log, -inf for
    fully masked rows). ``seed``: int64 scalar tensor on the CPU (Philox key; ignored if dropout_p == 0)."""
    launcher = _launchers.get(backend, q.device)
    return launcher.attention_fwd(q, k, v, mask, scale=scale, is_causal=is_causal,
                                  dropout_p=dropout_p, seed=int(seed.item()))


@attention_fwd.register_fake
def _(q, k, v, mask, scale, is_causal, dropout_p, seed, backend):
    B, H, L, _ = q.shape
    return _out_like(q, v), q.new_empty(B, H, L, dtype=torch.float32)


@torch.library.custom_op("fastattn::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    seed: Tensor,
    backend: str,
    mask_needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask); dmask has the mask's 4-D shape when ``mask_needs_grad`` else is empty."""
    launcher = _launchers.get(backend, q.device)
    dq, dk, dv, dmask = launcher.attention_bwd(
        dout, q, k, v, out, lse, mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
        seed=int(seed.item()), mask_needs_grad=mask_needs_grad)
    if dmask is None:
        dmask = q.new_empty(0)
    return _contig(dq), _contig(dk), _contig(dv), dmask


def _contig(t: Tensor) -> Tensor:
    # Gradients are returned contiguous on both devices (the fake impl promises that layout).
    return t if t.is_contiguous() else t.contiguous()


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, mask, scale, is_causal, dropout_p, seed, backend, mask_needs_grad):
    dmask = torch.empty_like(mask, memory_format=torch.contiguous_format) if mask_needs_grad else q.new_empty(0)
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device), dmask)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, is_causal, dropout_p, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.params = (scale, is_causal, dropout_p, backend)
    # lse is a by-product for merging partial results; it carries no gradient (its use in a loss
    # would need d lse / d s = P, which the kernels do not fold in).
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    scale, is_causal, dropout_p, backend = ctx.params
    mask_needs_grad = mask is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = attention_bwd(dout, q, k, v, out, lse, mask, scale, is_causal, dropout_p,
                                      seed, backend, mask_needs_grad)
    return dq, dk, dv, (dmask if mask_needs_grad else None), None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
