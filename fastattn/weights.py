"""``fastattn.attention_weights``: the softmax probabilities, from the fused kernels' log-sum-exp.

Fused attention never forms the (L, S) probability matrix, which is why fused libraries refuse to return
it. Interpretability (and ``need_weights=True`` / ``output_attentions=True``) needs exactly that matrix, so
this module computes it in two passes with no second (L, S) tensor:

1. the fused forward gives ``lse_i = log sum_j exp(s_ij)`` (with a value head dim of 1: the P @ V work
   is negligible and no (L, S) tensor is formed);
2. the scores are written straight into the one (..., L, S) output buffer (``baddbmm(out=...)``), the
   additive mask is added in place, ``lse`` subtracted in place and ``exp_`` applied in place; hidden keys,
   the causal triangle and rows with no visible key are zeroed in place.

Row i of the result is ``exp(s_i - lse_i)`` = ``softmax(s_i)``, with the normaliser computed by the same
kernels that compute the attention output. The backward (``dS = P o (dP - rowsum(dP o P))``) needs one
(L, S) buffer.

Shape legend: B batch, H query heads, Hk key heads, L query length, S key length, E head dim.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastattn import _ops, _philox, functional, reference

__all__ = ["attention_weights"]


def attention_weights(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
) -> Tensor:
    """The attention probabilities ``softmax(scale * Q K^T + mask)``, shape (..., H, L, S), dtype of query.

    The arguments mean what they mean for :func:`fastattn.scaled_dot_product_attention` (same shapes, mask
    conventions, causal alignment, GQA and backends): query (..., H, L, E), key (..., Hk, S, E); attn_mask
    broadcastable to (..., H, L, S), bool True = attend or float added to the scores; scale defaults to
    1 / sqrt(E). No dropout is applied. Rows whose keys are all hidden are all zero (never NaN).

    The normaliser comes from the fused forward kernel (its log-sum-exp); the probabilities are written
    directly into the returned buffer, with no other (L, S) intermediate. Differentiable with respect to
    query, key and a float attn_mask.
    """
    functional._check_qkv(query, key, key, enable_gqa)
    functional._check_mask(attn_mask, query, key)
    functional._check_scalars(0.0, is_causal, scale, enable_gqa)
    E = query.shape[-1]
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    backend = functional._pick_backend(backend, query.device, query.dtype)

    batch = tuple(query.shape[:-3])
    H, L, S = query.shape[-3], query.shape[-2], key.shape[-2]
    q4, k4 = functional._to_4d(query), functional._to_4d(key)
    mask4 = None if attn_mask is None else functional._mask_to_4d(attn_mask, (*batch, H))

    if min(q4.shape[0], H, L, S) == 0:
        p4 = query.new_zeros(q4.shape[0], H, L, S)
        if query.requires_grad or key.requires_grad:  # keep the graph connected (zero gradients)
            p4 = p4 + 0 * (q4.sum() + k4.sum())
    else:
        p4 = _attention_weights_op(q4, k4, mask4, scale, is_causal, backend)
    return p4.reshape(*batch, H, L, S) if batch else p4[0]


# ---------------------------------------------------------------------------------------------- op
_NO_SEED = torch.zeros((), dtype=torch.int64)


def _grouped(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, int]:
    """q (B, H, L, E) -> (B*Hk, G*L, E), k (B, Hk, S, E) -> (B*Hk, S, E): query head h = g + G*hk uses
    key head hk, so one batched matmul covers every group (a view where the strides allow it)."""
    B, H, L, E = q.shape
    Hk, S = k.shape[1], k.shape[2]
    G = H // Hk
    return q.reshape(B * Hk, G * L, E), k.reshape(B * Hk, S, E), G


@torch.library.custom_op("fastattn::attention_weights", mutates_args=())
def _attention_weights_op(q: Tensor, k: Tensor, mask: Tensor | None, scale: float, is_causal: bool,
                          backend: str) -> Tensor:
    """(B, H, L, S) probabilities for 4-D q (B, H, L, E), k (B, Hk, S, E) and a 4-D broadcast mask."""
    B, H, L, _ = q.shape
    S = k.shape[2]
    v = k[..., :1]  # value head dim 1: the forward then only costs its QK^T and softmax statistics
    if backend == "reference":
        _, lse = reference.scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, scale, H != k.shape[1],
                                                        upcast=False, return_lse=True)
    else:
        _, lse, _ = _ops.attention_fwd(q, k, v, mask, scale, is_causal, False, 0.0, _NO_SEED, backend, False)

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


@_attention_weights_op.register_fake
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


_attention_weights_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------ dropout helpers
def draw_seed_and_attend(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
                         dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool,
                         backend: str | None, need_seed: bool = True) -> tuple[Tensor, int | None]:
    """``fastattn.scaled_dot_product_attention`` plus the Philox seed its dropout used (None when
    dropout_p == 0 or not ``need_seed``).

    The public function draws one int64 from torch's default CPU generator for its seed; replaying the
    generator state on a private generator recovers it without disturbing the global stream. Modules
    need it to return the dropped-out weights (what torch's MultiheadAttention and HF's eager attention
    return in training mode). Reading the generator state is not traceable by torch.compile: that one
    case (weights requested, dropout on) breaks the graph; everything else traces."""
    if dropout_p == 0.0 or not need_seed:
        out = functional.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                      enable_gqa, backend=backend)
        return out, None
    state = torch.get_rng_state()
    out = functional.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                  enable_gqa, backend=backend)
    g = torch.Generator()
    g.set_state(state)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=g))
    return out, seed


def apply_dropout(weights: Tensor, dropout_p: float, seed: int) -> Tensor:
    """``weights`` (..., H, L, S) with the probabilities fastattn's kernels dropped for ``seed`` zeroed and
    the kept ones scaled by 1 / (1 - p): what the kernels multiplied P by. The keep mask is rebuilt from
    the Philox specification (``fastattn._philox``), one batch entry at a time to bound its int64
    temporaries. Differentiable (a product with a constant factor)."""
    if dropout_p == 0.0:
        return weights
    *_, H, L, S = weights.shape
    w4 = weights.reshape(-1, H, L, S)
    factor = torch.empty_like(w4)
    thr = _philox.threshold(dropout_p)
    n4 = (S + 3) // 4
    ar = lambda n: torch.arange(n, dtype=torch.int64, device=weights.device)  # noqa: E731
    c2, c1, c0 = ar(H).view(H, 1, 1), ar(L).view(1, L, 1), ar(n4).view(1, 1, n4)
    shape = (H, L, n4)
    for b in range(w4.shape[0]):
        words = _philox.philox4x32(c0.expand(shape), c1.expand(shape), c2.expand(shape),
                                   torch.full(shape, b, dtype=torch.int64, device=weights.device), seed)
        keep = torch.stack(words, dim=-1).reshape(H, L, 4 * n4)[..., :S] >= thr
        factor[b] = keep
    factor.mul_(1.0 / (1.0 - dropout_p))
    return (w4 * factor).view(weights.shape)
