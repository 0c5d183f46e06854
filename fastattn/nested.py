"""``fastattn.scaled_dot_product_attention`` on ``torch.nested`` jagged tensors (NJT).

The layout torch documents for SDPA on nested tensors: query (B, H, j, E), key (B, Hk, j', E), value
(B, Hk, j', Ev), each the transpose of a jagged tensor (B, j, H, E) built with
``torch.nested.nested_tensor(..., layout=torch.jagged)``, ragged along the sequence dim. Such a tensor
is stored as packed values (total, H, E) and offsets (B + 1,): exactly the packed layout of
:func:`fastattn.varlen_attention`, so the call is one varlen launch on the values, with nothing padded
and nothing copied, and the output is a jagged tensor over the query's offsets:

    out = values_to_njt(varlen_attention(q.values, k.values, v.values, q.offsets, k.offsets, ...))

Autograd flows through the values, to the nested inputs. Also taken: 3-D (B, j, E) jagged tensors (one
head), and 4-D tensors ragged on dim 1 (B, j, L, E) (a ragged batch dim: dense SDPA on the values, as
torch does). Shape legend: B batch, H query heads, Hk key/value heads, j ragged length, E head dim.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import functional as _functional
from fastattn import varlen as _varlen
from fastattn._validation import check_nested

__all__ = ["nested_sdpa"]


def _packed(t: Tensor, ragged: int) -> tuple[Tensor, Tensor, int, Tensor, int | None]:
    """(values with the ragged dim first, int32 cumulative lengths (B + 1,), longest sequence, the offsets, the
    shortest sequence if known) of a jagged
    tensor ragged on dim ``ragged``. A tensor with holes between its sequences (``lengths()`` set, e.g. from
    ``torch.nested.narrow``) is compacted first."""
    if ragged != 1:
        t = t.transpose(1, ragged)
    if t.lengths() is not None:
        t = t.contiguous()
    offsets = t.offsets()
    cu = offsets.to(torch.int32)
    max_len = t._maybe_max_seqlen
    if max_len is None:
        max_len = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
    return t.values(), cu, int(max_len), offsets, t._maybe_min_seqlen


def _to_nested(values: Tensor, offsets: Tensor, min_len, max_len: int, ragged: int) -> Tensor:
    """Packed values (total, ...) over ``offsets`` -> a jagged tensor with the ragged dim moved to ``ragged``."""
    nt = torch.nested.nested_tensor_from_jagged(values, offsets, min_seqlen=min_len, max_seqlen=max_len)
    return nt if ragged == 1 else nt.transpose(1, ragged)


def nested_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
                backend: str | None = None, return_lse: bool = False):
    """Scaled dot-product attention over jagged nested tensors, through :func:`fastattn.varlen_attention`.

    query (B, H, j, E), key (B, Hk, j', E), value (B, Hk, j', Ev) -> (B, H, j, Ev), a jagged tensor over the
    query's sequences; sequence b attends to key/value sequence b only (their lengths may differ). 3-D
    (B, j, E) inputs are one head. ``is_causal``: key j visible to query i iff j <= i within each sequence
    (top-left). ``enable_gqa``: H % Hk == 0; a single key/value head serves every query head without it.
    ``dropout_p``, ``scale``, ``backend`` as for :func:`fastattn.scaled_dot_product_attention`;
    ``return_lse`` adds the float32 log-sum-exp as a jagged (B, H, j) tensor. ``attn_mask`` must be None.
    Differentiable with respect to the nested query, key and value.

    4-D tensors ragged on dim 1, (B, j, L, E), are a ragged batch of dense attention problems: the values
    (total, L, E) go through dense SDPA, as torch does for them.
    """
    check_nested(query, key, value, attn_mask)
    ragged = query._ragged_idx
    if query.dim() == 4 and ragged == 1:
        res = _functional.scaled_dot_product_attention(query.values(), key.values(), value.values(), None,
                                                       dropout_p, is_causal, scale, enable_gqa, backend=backend,
                                                       return_lse=return_lse)
        out, lse = res if return_lse else (res, None)
        min_len, max_len = query._maybe_min_seqlen, query._maybe_max_seqlen
        if query.lengths() is not None:
            raise ValueError("nested query ragged on dim 1 with holes (lengths() set) is not supported; call "
                             ".contiguous() on it first")
        out = torch.nested.nested_tensor_from_jagged(out, query.offsets(), min_seqlen=min_len, max_seqlen=max_len)
        if not return_lse:
            return out
        return out, torch.nested.nested_tensor_from_jagged(lse, query.offsets(), min_seqlen=min_len,
                                                           max_seqlen=max_len)

    q, cu_q, max_q, off_q, min_q = _packed(query, ragged)
    k, cu_k, max_k, _, _ = _packed(key, ragged)
    v, cu_v, _, _, _ = _packed(value, ragged)
    if cu_k is not cu_v and not torch.equal(cu_k, cu_v):
        raise ValueError("key and value must have the same sequence lengths (the same offsets); got key lengths "
                         f"{(cu_k[1:] - cu_k[:-1]).tolist()} and value lengths {(cu_v[1:] - cu_v[:-1]).tolist()}")
    if query.dim() == 3:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    hq, hk = q.shape[1], k.shape[1]
    gqa = enable_gqa
    if hk == 1 and hq != 1 and enable_gqa is False:
        gqa = True  # one key/value head serves every query head, as in the dense function
    res = _varlen.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p, is_causal=is_causal,
                                   scale=scale, enable_gqa=gqa, return_lse=return_lse, backend=backend)
    out, lse = res if return_lse else (res, None)
    if query.dim() == 3:
        out = out.squeeze(1)
    out = _to_nested(out, off_q, min_q, max_q, ragged)
    if not return_lse:
        return out
    lse = lse.transpose(0, 1)  # (H, total_q) -> (total_q, H)
    if query.dim() == 3:
        return out, _to_nested(lse.squeeze(1), off_q, min_q, max_q, 1)
    return out, _to_nested(lse, off_q, min_q, max_q, ragged)
