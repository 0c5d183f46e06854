"""The attention weights op: ``fastattn::attention_weights``, the softmax probabilities (B, H, L, S) from the
fused forward's log-sum-exp (fastattn/weights.py explains the two passes), with its backward formula.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import reference
from fastattn._normalise import op_seed
from fastattn._ops.attention import attention_fwd


def _grouped(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, int]:
    """q (B, H, L, E) -> (B*Hk, G*L, E), k (B, Hk, S, E) -> (B*Hk, S, E): query head h = g + G*hk uses
    key head hk, so one batched matmul covers every group (a view where the strides allow it)."""
    B, H, L, E = q.shape
    Hk, S = k.shape[1], k.shape[2]
    G = H // Hk
    return q.reshape(B * Hk, G * L, E), k.reshape(B * Hk, S, E), G


@torch.library.custom_op("fastattn::attention_weights", mutates_args=())
def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None, scale: float, is_causal: bool,
                      backend: str) -> Tensor:
    """(B, H, L, S) probabilities for 4-D q (B, H, L, E), k (B, Hk, S, E) and a 4-D broadcast mask."""
    B, H, L, _ = q.shape
    S = k.shape[2]
    v = k[..., :1]  # value head dim 1: the forward then only costs its QK^T and softmax statistics
    if backend == "reference":
        _, lse = reference.scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, scale, H != k.shape[1],
                                                        upcast=False, return_lse=True)
    else:
        _, lse, _ = attention_fwd(q, k, v, mask, scale, is_causal, False, 0.0, op_seed(None), backend, False)

    # fp16 / bf16: scores in float32 and one rounding at the end. Rounding the scores first costs
    # |s| * 2^-9 (bf16) before the exp: ~3x the naive bf16 softmax's error at unscaled scores |s| ~ 16.
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    p = torch.empty(B, H, L, S, dtype=work, device=q.device)
    q3, k3, G = _grouped(q.to(work), k.to(work))
    p3 = p.view(B * k.shape[1], G * L, S)
    torch.baddbmm(p3, q3, k3.transpose(1, 2), beta=0.0, alpha=scale, out=p3)  # s = scale * q k^T
    if mask is not None and mask.dtype != torch.bool:
        p.add_(mask)
    p.sub_(lse.unsqueeze(-1))  # the float32 lse, also for fp16 / bf16 scores (not rounded first)
    p.exp_()
    # Hidden entries (bool mask, causal triangle) may have overflowed to inf: they are overwritten, not scaled.
    if mask is not None and mask.dtype == torch.bool:
        torch.where(mask, p, p.new_zeros(()), out=p)
    if is_causal:
        p.tril_()
    if p.dtype == torch.float64:
        # lse is float32 (the kernel contract): one row-sum pass restores double accuracy.
        p.div_(p.sum(dim=-1, keepdim=True))
    dead = torch.isneginf(lse)  # rows with no visible key (inf / NaN so far): zeros, as the kernels' rows
    if bool(dead.any()):
        p.masked_fill_(dead.unsqueeze(-1), 0.0)
    return p.to(q.dtype)


@attention_weights.register_fake
def _(q, k, mask, scale, is_causal, backend):
    B, H, L, _ = q.shape
    return q.new_empty(B, H, L, k.shape[2])


def _setup_context(ctx, inputs, output):
    q, k, mask, scale, is_causal, backend = inputs
    ctx.save_for_backward(q, k, mask, output)
    ctx.scale = scale


def _backward(ctx, dp):
    q, k, mask, p = ctx.saved_tensors
    scale = ctx.scale
    # dS = P o (dP - delta), delta_i = sum_j dP_ij P_ij (einsum -> batched dot products, no (L, S) temporary)
    delta = torch.einsum("bhls,bhls->bhl", dp, p).unsqueeze(-1)
    ds = (dp - delta).mul_(p)
    B, H, L, E = q.shape
    Hk, S = k.shape[1], k.shape[2]
    q3, k3, G = _grouped(q, k)
    ds3 = ds.view(B * Hk, G * L, S)
    dq = dk = dmask = None
    if ctx.needs_input_grad[0]:
        dq = torch.bmm(ds3, k3).mul_(scale).view(B, H, L, E)
    if ctx.needs_input_grad[1]:
        dk = torch.bmm(ds3.transpose(1, 2), q3).mul_(scale).view(B, Hk, S, E)  # sums the group's heads
    if mask is not None and mask.dtype != torch.bool and ctx.needs_input_grad[2]:
        dims = [d for d in range(4) if mask.shape[d] == 1 and ds.shape[d] != 1]
        dmask = (ds.sum(dim=dims, keepdim=True) if dims else ds).to(mask.dtype)
    return dq, dk, dmask, None, None, None


attention_weights.register_autograd(_backward, setup_context=_setup_context)
