"""``fastattn.attention_with_kvcache``: decoder attention of a few new query rows against a KV cache, optionally
appending the new keys/values to the cache first (flash-attention's ``flash_attn_with_kvcache``).

The function validates every argument (the values of ``cache_seqlens`` and ``block_table`` included) before it
writes anything, appends k / v in place, then calls the op ``fastattn::decode_fwd`` (fastattn/_ops/decode.py).
A plain eager call on CPU tensors does all of that in the kernel module's C++ entry ``kvcache_fwd``
(csrc/eager.cpp), which declines (returns None, writing nothing) whatever it does not take, so that the Python
path below runs and raises its errors.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import _launchers
from fastattn._normalise import default_scale
from fastattn._ops.decode import decode_fwd, run_decode
from fastattn._validation import (check_cache_seqlens, check_cache_tensor, check_cache_values, check_inference_only,
                                  check_kvcache_scalars, shape_or_type)
from fastattn.reference.decode import decode_attention

__all__ = ["attention_with_kvcache"]

LAYOUTS = ("bshd", "bhsd")


def _append(cache: Tensor, new: Tensor, lens: Tensor, block_table: Tensor | None) -> None:
    """cache[b, lens[b] + t] = new[b, t] (through the block table when paged), in place."""
    B, L_new = new.shape[:2]
    if B == 0 or L_new == 0:
        return
    pos = lens[:, None] + torch.arange(L_new, device=lens.device)  # (B, L_new) absolute positions
    if block_table is None:
        cache[torch.arange(B, device=lens.device)[:, None], pos] = new
    else:
        page = cache.shape[1]
        pages = torch.gather(block_table.to(torch.int64), 1, pos // page)
        cache[pages, pos % page] = new


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor | int,
    k: Tensor | None = None,
    v: Tensor | None = None,
    *,
    block_table: Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    layout: str = "bshd",
    return_lse: bool = False,
    num_splits: int | None = None,
    backend: str | None = None,
):
    """Attention of L new query rows per sequence to its KV cache, after appending the new keys/values.

    Shape legend: B batch, L new query rows, L_new new keys/values, H query heads, Hk key/value heads
    (H % Hk == 0: query head h reads key/value head h // (H // Hk); Hk == H is MHA, Hk == 1 MQA), S_max the
    cache's capacity per sequence, E query/key head dim, Ev value head dim (both 1..256).

    Args:
        q: the new query rows. layout "bshd": (B, L, H, E); "bhsd": (B, H, L, E).
        k_cache, v_cache: the caches, any strides. Contiguous (one region per sequence): "bshd" (B, S_max, Hk, E)
            / (B, S_max, Hk, Ev); "bhsd" (torch's / HuggingFace's layout) (B, Hk, S_max, E) / (B, Hk, S_max, Ev).
            Paged (with ``block_table``, either layout): (num_blocks, page_size, Hk, E) / (..., Ev).
        cache_seqlens: int, or (B,) int32 / int64 tensor on q's device: each sequence's length BEFORE appending.
        k, v: optional new keys / values, both or neither: "bshd" (B, L_new, Hk, E) / (B, L_new, Hk, Ev); "bhsd"
            (B, Hk, L_new, E) / (B, Hk, L_new, Ev). Written into the caches in place at positions
            cache_seqlens[b] .. cache_seqlens[b] + L_new - 1 (through ``block_table`` when paged) before
            attending; attention then uses the lengths after appending. ``cache_seqlens`` itself is not
            modified: the caller advances its own.
        block_table: (B, max_blocks) int32: sequence b's key j lives in page block_table[b, j // page_size],
            slot j % page_size; capacity max_blocks * page_size.
        scale: default 1 / sqrt(E).
        causal: lower-right: with n keys after appending, query row i sits at position i' = n - L + i and
            sees keys j <= i'.
        window: (left, right): key j visible iff i' - left <= j <= i' + right; -1 is unbounded.
        softcap: > 0: scores -> softcap * tanh(scores / softcap) after scaling.
        sinks: (H,) float: a per-head logit joining each row's softmax denominator, with no value.
        alibi_slopes: (H,) or (B, H) float: score += slope * (j - i').
        return_lse: also return the float32 log-sum-exp (B, H, L) (natural log, the sink included; -inf for
            rows with no visible key and no sink).
        num_splits: key splits (None: the launcher chooses; results do not depend on it beyond rounding).
        backend: None (CPU tensors -> "cpu", CUDA -> "triton"), "cpu", "triton" or "reference" (the naive
            formula of fastattn.reference.decode).

    Returns out, "bshd" (B, L, H, Ev) / "bhsd" (B, H, L, Ev) contiguous, in q's dtype (and lse). Rows with
    no visible key give zeros. Inference only: an input that requires grad while grad mode is on raises.

    Every argument is checked before anything is written (ValueError / TypeError naming it; the caches are
    then unchanged), the values of ``cache_seqlens`` and ``block_table`` included: lengths >= 0, lengths plus
    L_new within the capacity, the block-table entries each sequence uses (its first ceil(n / page_size),
    n the length after appending) in [0, num_blocks). Reading those values copies them to the host, which
    waits for a CUDA device (a sync per call); the check is skipped while torch.compile traces.
    """
    if backend in (None, "cpu") and type(q) is Tensor and q.is_cpu and not torch.compiler.is_compiling():
        # A plain eager CPU call: the C++ entry (csrc/eager.cpp kvcache_fwd) makes the checks below, the append
        # and the kernel call in one go, with the same results; None (nothing written) for anything else. What
        # torch's in-place write does besides writing is done here: refusing to write into inference tensors
        # outside inference mode (left to the Python path, which raises), and bumping the caches' version
        # counters (autograd then refuses gradients through values saved before the write).
        route = _launchers.cpu_kvcache()
        appends = isinstance(k, Tensor) and k.dim() == 4 and k.shape[2 if layout == "bhsd" else 1] > 0
        caches = (k_cache, v_cache)
        if appends and not torch.is_inference_mode_enabled() and any(
                isinstance(c, Tensor) and c.is_inference() for c in caches):
            route = None
        if route is not None:
            res = route(q, k_cache, v_cache, cache_seqlens, k, v, block_table, scale, causal, window, softcap, sinks,
                        alibi_slopes, layout, return_lse, num_splits, backend)
            if res is not None:
                if appends:
                    for c in caches:
                        if not c.is_inference():
                            torch.autograd.graph.increment_version(c)
                return res
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new keys and values to append) or both be None")
    check_inference_only(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, sinks=sinks, alibi_slopes=alibi_slopes)
    check_cache_tensor("q", q)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if t is not None:
            check_cache_tensor(name, t, q)
    paged = block_table is not None
    bhsd = layout == "bhsd"
    # Everything below works on (B, L, H, E)-ordered views (no copies).
    q = q.transpose(1, 2) if bhsd else q
    if bhsd and not paged:
        k_cache, v_cache = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    if bhsd and k is not None:
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    B, L, H, E = q.shape
    Hk, Ev = k_cache.shape[2], v_cache.shape[3]
    cache_dims = "(num_blocks, page_size, Hk, E)" if paged else ("(B, Hk, S_max, E)" if bhsd else "(B, S_max, Hk, E)")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache and v_cache must agree in every dim but the head dim ({cache_dims}), got "
                         f"k_cache {shape_or_type(k_cache)} and v_cache {shape_or_type(v_cache)}")
    if k_cache.shape[3] != E:
        raise ValueError(f"k_cache's head dim must be q's ({E}), got {k_cache.shape[3]} (k_cache {cache_dims})")
    if Hk == 0 or H % Hk:
        raise ValueError(f"q's heads ({H}) must be a multiple of the cache's key/value heads ({Hk})")
    if not (1 <= E <= 256 and 1 <= Ev <= 256):
        raise ValueError(f"head dims must be 1..256, got E={E}, Ev={Ev}")
    if paged:
        if (not isinstance(block_table, Tensor) or block_table.dim() != 2 or block_table.shape[0] != B
                or block_table.dtype != torch.int32):
            got = f"{shape_or_type(block_table)} {getattr(block_table, 'dtype', '')}"
            raise ValueError(f"block_table must be an int32 tensor of shape (B, max_blocks) = ({B}, max_blocks), "
                             f"got {got}")
        if block_table.device != q.device:
            raise ValueError(f"block_table must be on q's device {q.device}, got {block_table.device}")
        page, num_blocks = k_cache.shape[1], k_cache.shape[0]
        capacity = block_table.shape[1] * page
    else:
        if k_cache.shape[0] != B:
            raise ValueError(f"the caches' batch dim must be q's ({B}), got {k_cache.shape[0]} (k_cache "
                             f"{cache_dims})")
        page, num_blocks, capacity = 0, 0, k_cache.shape[1]
    L_new = 0
    if k is not None:
        L_new = k.shape[1]
        for name, t, d, dn in (("k", k, E, "E"), ("v", v, Ev, "Ev")):
            if t.shape[0] != B or t.shape[1] != L_new or t.shape[2] != Hk or t.shape[3] != d:
                new_dims = f"(B, Hk, L_new, {dn})" if bhsd else f"(B, L_new, Hk, {dn})"
                want = (B, Hk, L_new, d) if bhsd else (B, L_new, Hk, d)
                raise ValueError(f"{name} must have shape {new_dims} = {want} (k's L_new = {L_new}, the "
                                 f"caches' Hk = {Hk}), got {tuple((t.transpose(1, 2) if bhsd else t).shape)}")
    check_kvcache_scalars(B, H, q, window, softcap, sinks, alibi_slopes, scale, num_splits)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    lens = check_cache_seqlens(cache_seqlens, B, q.device)
    backend = _launchers.choose_backend(backend, q.device, q.dtype)
    if not torch.compiler.is_compiling():
        check_cache_values(lens, L_new, capacity, block_table, page, num_blocks)

    if k is not None:
        _append(k_cache, k, lens, block_table)
        _append(v_cache, v, lens, block_table)
    seqlens = (lens + L_new).to(torch.int32)
    scale = default_scale(E, scale)
    if backend == "reference":
        out, lse = decode_attention(q, k_cache, v_cache, seqlens, block_table=block_table, scale=scale,
                                    causal=causal, window=tuple(window), softcap=float(softcap), sinks=sinks,
                                    alibi_slopes=alibi_slopes, upcast=False)
        out = out.transpose(1, 2).contiguous().transpose(1, 2) if bhsd else out
    else:
        # A plain eager CPU call runs the op's body itself; everything else (torch.compile, export, tracing,
        # dispatch modes, functorch transforms, tensor subclasses, CUDA) goes through the op.
        tensors = (q, k_cache, v_cache, seqlens, block_table, sinks, alibi_slopes)
        plain = (backend == "cpu" and all(t is None or type(t) is Tensor for t in tensors)
                 and not torch.compiler.is_compiling()
                 and not torch._C._is_tracing() and torch._C._len_torch_dispatch_stack() == 0
                 and not torch._C._are_functorch_transforms_active())
        out, lse = (run_decode if plain else decode_fwd)(
            q, k_cache, v_cache, seqlens, block_table, None, scale, bool(causal), int(window[0]), int(window[1]),
            float(softcap), sinks, alibi_slopes, num_splits, backend, "bhsd" if bhsd else "bshd")
    out = out.transpose(1, 2) if bhsd else out
    return (out, lse) if return_lse else out
