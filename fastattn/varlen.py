"""Variable-length (packed) attention and the pad/unpad helpers (issue 5).

Packed layout (as flash-attention's ``flash_attn_varlen_func`` and torch's ``varlen_attn``): the
sequences of a batch are concatenated along the token dim, query (total_q, H, E), key (total_k, Hk, E),
value (total_k, Hk, Ev), with int32 cumulative lengths ``cu_seqlens_q`` / ``cu_seqlens_k`` of size B + 1.
"""
from __future__ import annotations


import torch
from torch import Tensor

from fastattn import reference
from fastattn.functional import _check_scalars, _FLOAT_DTYPES, _needs_out_lo, _pick_backend, _scale_and_seed

__all__ = ["varlen_attention", "unpad", "pad"]


# ----------------------------------------------------------------------------------------- validation
def _check_packed(query, key, value, enable_gqa: bool) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be packed 3-D (total, heads, head_dim), got shape {tuple(t.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match query dtype {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"key head dim {key.shape[2]} does not match query head dim {query.shape[2]} "
                         f"(query {tuple(query.shape)}, key {tuple(key.shape)})")
    if query.shape[2] == 0:
        raise ValueError(f"query/key head dim must be at least 1, got query {tuple(query.shape)}")
    if key.shape[:2] != value.shape[:2]:
        raise ValueError(f"key and value must have the same (total_k, Hk), got key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}")
    hq, hk = query.shape[1], key.shape[1]
    if enable_gqa:
        if hk == 0 or hq % hk != 0:
            raise ValueError(f"enable_gqa=True needs query heads ({hq}) divisible by key/value heads ({hk})")
    elif hq != hk:
        raise ValueError(f"query has {hq} heads (dim 1) but key/value have {hk}; "
                         f"pass enable_gqa=True for grouped-query attention")


def _check_cu(name: str, cu, device: torch.device) -> None:
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (cumulative sequence lengths), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D of size batch + 1, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but query is on {device}")


def _check_max(name: str, m) -> int:
    if isinstance(m, bool) or not isinstance(m, int):
        if isinstance(m, Tensor) and m.numel() == 1 and not m.dtype.is_floating_point:
            m = int(m)
        else:
            raise TypeError(f"{name} must be an int, got {type(m).__name__}")
    if m < 0:
        raise ValueError(f"{name} must be >= 0, got {m}")
    return int(m)


def _check_cu_values(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int, max_q: int, max_k: int) -> None:
    """cu[0] == 0, non-decreasing, cu[-1] == total, lengths <= max_seqlen. One host copy of both arrays
    (a device sync on CUDA; skipped while torch.compile traces)."""
    both = torch.stack([cu_q, cu_k]).to("cpu", torch.int64)
    for row, name, total, mx, mname in ((both[0], "cu_seqlens_q", total_q, max_q, "max_seqlen_q"),
                                         (both[1], "cu_seqlens_k", total_k, max_k, "max_seqlen_k")):
        if int(row[0]) != 0:
            raise ValueError(f"{name}[0] must be 0, got {int(row[0])}")
        if int(row[-1]) != total:
            raise ValueError(f"{name}[-1] must equal the packed length ({total}), got {int(row[-1])}")
        lens = row[1:] - row[:-1]
        if lens.numel() and int(lens.min()) < 0:
            b = int(torch.nonzero(lens < 0)[0])
            raise ValueError(f"{name} must be non-decreasing, but {name}[{b + 1}] < {name}[{b}]")
        longest = int(lens.max()) if lens.numel() else 0
        if longest > mx:
            raise ValueError(f"{mname} ({mx}) is smaller than the longest sequence ({longest}) in {name}")


def _mask_4d(attn_mask, query: Tensor, B: int, H: int, max_q: int, max_k: int) -> Tensor | None:
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (query.dtype, torch.float32):
        raise TypeError(f"attn_mask must be bool (True = attend) or a float mask of the query dtype "
                        f"{query.dtype} (or float32), got {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
    target = (B, H, max_q, max_k)
    if attn_mask.dim() > 4 or any(m not in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(target))):
        raise ValueError(f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to (B, H, max_seqlen_q, "
                         f"max_seqlen_k) = {target}")
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


# --------------------------------------------------------------------------------------- public API
def varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Fused attention over a packed batch of variable-length sequences (no padding computed).

    Shapes (B sequences, H query heads, Hk key/value heads, E head dim, Ev value head dim):
    query (total_q, H, E), key (total_k, Hk, E), value (total_k, Hk, Ev) -> (total_q, H, Ev).
    Sequence b is query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key/value rows
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``; it attends only to its own keys (the layout of flash-attn's
    ``flash_attn_varlen_func`` and torch's ``varlen_attn``). Each sequence is one SDPA call:

    Args:
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) cumulative lengths on query's device; [0] == 0,
            non-decreasing, [-1] == total_q / total_k.
        max_seqlen_q, max_seqlen_k: ints >= the longest query / key sequence (they size the launch).
        attn_mask: broadcastable to (B, H, max_seqlen_q, max_seqlen_k); sequence b reads its top-left
            (L_b, S_b) corner. Bool: True = attend; float (query dtype or float32): added to the scores.
        dropout_p: dropout on the probabilities; Philox coordinates (b, h, i, j) with i, j local to the
            sequence, so the same seed drops what padded ``fastattn.scaled_dot_product_attention`` does.
        is_causal: key j visible to query i iff j <= i, top-left aligned within each sequence.
        scale: defaults to 1 / sqrt(E).  enable_gqa: H % Hk == 0, query head h reads kv head h // (H // Hk).
        return_lse: also return the float32 log-sum-exp (H, total_q) (natural log, -inf for rows that see
            no key); it carries no gradient.
        backend: None (CPU tensors -> "cpu", CUDA -> "triton"), "cpu", "triton" or "reference".

    Rows with no visible key (or sequences with no keys) give zeros and zero gradients. Gradients flow to
    query, key, value and a float attn_mask. The cu_seqlens values are checked on the host (one small copy;
    a sync for CUDA tensors) except while torch.compile traces.
    """
    _check_packed(query, key, value, enable_gqa)
    _check_cu("cu_seqlens_q", cu_seqlens_q, query.device)
    _check_cu("cu_seqlens_k", cu_seqlens_k, query.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    max_q = _check_max("max_seqlen_q", max_seqlen_q)
    max_k = _check_max("max_seqlen_k", max_seqlen_k)
    _check_scalars(dropout_p, is_causal, scale, enable_gqa)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    total_q, H, E = query.shape
    total_k, Ev = key.shape[0], value.shape[2]
    B = cu_seqlens_q.numel() - 1
    if not torch.compiler.is_compiling():
        _check_cu_values(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_q, max_k)
    mask4 = _mask_4d(attn_mask, query, B, H, max_q, max_k)
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()  # kernels index cu[b]
    scale, dropout_p, seed = _scale_and_seed(E, scale, dropout_p)
    backend = _pick_backend(backend, query.device, query.dtype)

    if backend == "reference":
        return reference.varlen_attention(
            query, key, value, cu_seqlens_q, cu_seqlens_k, max_q, max_k, attn_mask=mask4, dropout_p=dropout_p,
            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, upcast=False,
            dropout_seed=None if seed is None else int(seed), return_lse=return_lse)

    if min(total_q, H, Ev, total_k, max_q, max_k) == 0:
        out = query.new_zeros(total_q, H, Ev)
        lse = query.new_full((H, total_q), float("-inf"), dtype=torch.float32)
        # Keep the graph connected so .backward() gives zero gradients.
        if query.requires_grad or key.requires_grad or value.requires_grad:
            out = out + 0 * (query.sum() + key.sum() + value.sum())
    else:
        from fastattn._varlen_ops import varlen_fwd

        if seed is None:
            seed = torch.zeros((), dtype=torch.int64)
        out, lse, _ = varlen_fwd(query, key, value, cu_seqlens_q, cu_seqlens_k, max_q, max_k, mask4, scale,
                                 is_causal, dropout_p, seed, backend,
                                 _needs_out_lo(query.dtype, query, key, value, mask4))
    return (out, lse) if return_lse else out


def unpad(x: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Padded -> packed. ``x`` (B, S, ...), ``attention_mask`` (B, S) bool or 0/1 integers (True/1 = real
    token, as HuggingFace's ``attention_mask``). Returns ``(x_packed (total, ...), indices (total,) int64
    into the flattened (B*S) token dim, cu_seqlens (B+1,) int32, max_seqlen)``. Differentiable in ``x``."""
    if not isinstance(x, Tensor) or not isinstance(attention_mask, Tensor):
        raise TypeError("unpad(x, attention_mask) takes two tensors")
    if attention_mask.dim() != 2 or x.dim() < 2 or tuple(x.shape[:2]) != tuple(attention_mask.shape):
        raise ValueError(f"attention_mask must be (B, S) matching x's first two dims, got attention_mask "
                         f"{tuple(attention_mask.shape)} and x {tuple(x.shape)}")
    if attention_mask.dtype.is_floating_point or attention_mask.is_complex():
        raise TypeError(f"attention_mask must be bool or integer (1 = token), got {attention_mask.dtype}")
    keep = attention_mask.bool()
    seqlens = keep.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    cu = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=x.device)
    if keep.shape[0]:
        cu[1:] = torch.cumsum(seqlens, 0, dtype=torch.int32)
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    packed = x.reshape(-1, *x.shape[2:]).index_select(0, indices)
    return packed, indices, cu, max_seqlen


def pad(x: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Packed -> padded: ``x`` (total, ...) and the ``indices`` from :func:`unpad` give (batch, seqlen, ...)
    with zeros at the padding positions. Differentiable in ``x``."""
    if not isinstance(x, Tensor) or not isinstance(indices, Tensor):
        raise TypeError("pad(x, indices, batch, seqlen) takes tensors x and indices")
    if indices.dim() != 1 or indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices must be 1-D with one entry per row of x ({x.shape[0]}), got "
                         f"{tuple(indices.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= batch * seqlen):
        raise ValueError(f"indices must lie in [0, batch*seqlen) = [0, {batch * seqlen})")
    out = x.new_zeros(batch * seqlen, *x.shape[1:])
    out = out.index_put((indices,), x)
    return out.reshape(batch, seqlen, *x.shape[1:])
