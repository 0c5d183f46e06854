"""Checked public arguments -> the ops' arguments: 4-D views, 4-D masks, scale and seed, the out_lo decision,
and the result of a call with nothing to compute. Shared by every public function (after fastattn._validation).

The ops take 4-D (B, H, L, E) tensors and a 4-D mask whose every dim is either full or 1 (read through stride
0); nothing here copies a tensor: leading dims are merged by views where the strides allow it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastattn._validation import heads

# The seed tensor of dropout-free op calls (never read, never written).
_ZERO_SEED = torch.zeros((), dtype=torch.int64)


def to_4d(t: Tensor) -> Tensor:
    """(..., H, N, D) -> (B, H, N, D), and (N, D) -> (1, 1, N, D), as a view when the leading dims allow it."""
    if t.dim() == 4:
        return t
    if t.dim() < 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t.reshape(-1, *t.shape[-3:])


def mask_to_4d(mask: Tensor, lead: tuple[int, ...]) -> Tensor:
    """A mask broadcastable to the scores (*lead, L, S) as 4-D, every dim either full or 1, without expanding
    L, S or H. ``lead``: the query's dims before (L, E) (batch dims, then heads). Only more than one batch dim
    is merged (after expanding the mask's partially broadcast batch dims), so a 4-D call never branches on the
    sizes: a dynamic batch stays dynamic under torch.export."""
    nd = max(len(lead) + 2, 4)
    if mask.dim() < nd:
        mask = mask.reshape((1,) * (nd - mask.dim()) + tuple(mask.shape))
    if nd == 4:
        return mask
    batch, mlead = lead[:-1], tuple(mask.shape[: len(lead) - 1])
    if all(d == 1 for d in mlead):
        return mask.reshape(1, *mask.shape[-3:])
    if mlead != batch:
        mask = mask.expand(*batch, *mask.shape[-3:])
    return mask.reshape(-1, *mask.shape[-3:])


def broadcast_qkv(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple[int, ...]]:
    """(q, k, v, lead): the inputs with their batch dims broadcast to one shape (stride-0 views, nothing copied)
    and a single query head repeated over the key/value heads; ``lead`` = the output's dims before (L, Ev).
    A single key/value head needs nothing: the kernels read it as grouped-query attention (Hk = 1)."""
    qs, ks = tuple(query.shape), tuple(key.shape)
    if qs[:-2] == ks[:-2]:
        return query, key, value, qs[:-2]
    if len(qs) == len(ks) == 2:
        return query, key, value, ()
    batch = torch.broadcast_shapes(qs[:-3], ks[:-3])
    hq, hk = heads(qs), heads(ks)
    H = hk if hq == 1 else hq
    q = query.expand(*batch, H, *qs[-2:])
    k, v = (t.expand(*batch, hk, *t.shape[-2:]) for t in (key, value))
    return q, k, v, (*batch, H)


def default_scale(E: int, scale) -> float:
    """scale, or 1/sqrt(E) for None."""
    return 1.0 / math.sqrt(E) if scale is None else float(scale)


def scale_and_seed(E: int, scale, dropout_p) -> tuple[float, float, Tensor | None]:
    """(scale, dropout_p, seed): scale defaults to 1/sqrt(E); with dropout, an int64 Philox seed drawn from
    torch's default generator (so torch.manual_seed reproduces the mask), else None."""
    dropout_p = float(dropout_p)
    seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64) if dropout_p > 0.0 else None
    return default_scale(E, scale), dropout_p, seed


def op_seed(seed: Tensor | None) -> Tensor:
    """The ops' ``seed`` argument: the drawn seed, or an unused zero for dropout-free calls (a fresh tensor
    while torch.compile traces, which would otherwise capture the module constant)."""
    if seed is not None:
        return seed
    return _ZERO_SEED if not torch.compiler.is_compiling() else torch.zeros((), dtype=torch.int64)


def needs_out_lo(dtype: torch.dtype, *tensors: Tensor | None) -> bool:
    """fp16 / bf16 with a gradient to come: the forward op also returns its output's rounding residual for
    the backward's delta (fastattn/_ops/attention.py). Inference, float32 and float64 never pay for it."""
    if dtype not in (torch.float16, torch.bfloat16) or not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def connected_zeros(like: Tensor, shape: tuple[int, ...], *inputs: Tensor) -> Tensor:
    """The output of a call with nothing to compute (a size is 0): zeros of ``shape`` in like's dtype and device.
    When an input requires grad the zeros are made to depend on every input (0 * sum), so that backward
    through them gives zero gradients."""
    out = like.new_zeros(shape)
    if any(t.requires_grad for t in inputs):
        total = inputs[0].sum()
        for t in inputs[1:]:
            total = total + t.sum()
        out = out + 0 * total
    return out


def no_key_lse(like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The float32 log-sum-exp of rows that see no key: -inf."""
    return like.new_full(shape, float("-inf"), dtype=torch.float32)
