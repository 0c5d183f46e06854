"""The hard (top-k) attention ops: ``fastattn::hard_fwd`` / ``fastattn::hard_bwd``.

Launcher contract of the "hard" family (fastattn/_cpu.py and kernels/hard.py):

    hard_fwd(q, k, v, mask, *, scale, is_causal, top_k) -> (out, idx, prob)
    hard_bwd(dout, q, k, v, idx, prob, *, scale, top_k, is_causal) -> (dq, dk, dv, ds)

q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev) any strides; mask None or 4-D with size-1 dims
broadcast. out (B, H, L, Ev) in q's dtype; idx (B, H, L, K) int32 (-1 unused), prob and ds (B, H, L, K)
float32 (the C++ kernel: float64 for float64 inputs, ``fastattn._cpu.hard_prob_dtype``), contiguous. The
float mask gradient is built here from ds (see :func:`_dmask_from_ds`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import _cpu, _launchers


@torch.library.custom_op("fastattn::hard_fwd", mutates_args=())
def hard_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, is_causal: bool, top_k: int,
             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(out (B, H, L, Ev), idx (B, H, L, K) int32, prob (B, H, L, K) float32)."""
    launcher = _launchers.launcher_for("hard", backend, q.device)
    return launcher.hard_fwd(q, k, v, mask, scale=scale, is_causal=is_causal, top_k=top_k)


@hard_fwd.register_fake
def _(q, k, v, mask, scale, is_causal, top_k, backend):
    B, H, L, _ = q.shape
    out = q.new_empty(B, L, H, v.shape[-1]).transpose(1, 2)
    prob_dtype = _cpu.hard_prob_dtype(q.dtype) if q.device.type == "cpu" and backend == "cpu" else torch.float32
    return (out, q.new_empty(B, H, L, top_k, dtype=torch.int32), q.new_empty(B, H, L, top_k, dtype=prob_dtype))


@torch.library.custom_op("fastattn::hard_bwd", mutates_args=())
def hard_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, prob: Tensor, scale: float, top_k: int,
             is_causal: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, ds): gradients (contiguous, the inputs' dtypes) and ds (B, H, L, K) float32, the
    gradient of the selected scores (0 for top_k = 1 and for unused slots)."""
    launcher = _launchers.launcher_for("hard", backend, q.device)
    dq, dk, dv, ds = launcher.hard_bwd(dout, q, k, v, idx, prob, scale=scale, top_k=top_k, is_causal=is_causal)
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
