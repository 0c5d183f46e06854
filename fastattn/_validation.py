"""Argument checks at the public boundary, for every op: one place that says what each function accepts.

The public functions (``scaled_dot_product_attention``, ``varlen_attention``, nested SDPA,
``additive_attention``, ``hard_attention``, ``attention_weights``, ``attention_with_kvcache``,
``fastattn.patch``) call these before anything else; the ops and launchers behind them assume checked arguments. Errors name the argument and
say what was expected and what came: ``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong
shape, value or device. The C++ eager route (csrc/eager.cpp) never raises: a call it cannot take whole
goes to the Python path, whose checks here raise the errors. The decode launchers' contract
(:func:`check_decode_launch`) is here too, Triton-free, so the C++ and the Triton launcher run one set of checks.

Shape legend: B batch, H query heads, Hk key/value heads, L query length, S key length, E head dim,
Ev value head dim, D additive hidden dim.
"""
from __future__ import annotations

import math
import numbers
import operator
from numbers import Real

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: The dtypes the decode kernels run (no float64 path).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Largest supported ``top_k`` of hard attention (the Triton kernel keeps a (BLOCK_M, next_pow2(top_k)) tile
#: of candidates in registers; the C++ kernel a per-row list on the stack).
MAX_TOP_K = 64


# --------------------------------------------------------------------------------- tensors and scalars
def check_float_tensor(name: str, t) -> None:
    """t is a torch.Tensor of a floating dtype the kernels run."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_matches_query(query: Tensor, *named: tuple[str, Tensor]) -> None:
    """Every (name, tensor) shares the query's dtype and device."""
    for name, t in named:
        if t.dtype != query.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match query dtype {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")


def check_bool(name: str, x) -> None:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")


def check_scalars(dropout_p, is_causal, scale, enable_gqa) -> None:
    """dropout_p a float in [0, 1), is_causal and enable_gqa bools, scale None or a finite float."""
    if (type(dropout_p) is float and 0.0 <= dropout_p < 1.0 and type(is_causal) is bool  # the common case
            and type(enable_gqa) is bool and (scale is None or (type(scale) is float and math.isfinite(scale)))):
        return
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    check_bool("is_causal", is_causal)
    check_bool("enable_gqa", enable_gqa)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, Real):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale}")


def check_gqa_heads(hq: int, hk: int, enable_gqa: bool, dim: str, single_kv_head_ok: bool = False) -> None:
    """Query heads hq against key/value heads hk: equal, or with ``enable_gqa`` a multiple.
    ``single_kv_head_ok`` (dense SDPA, as torch): a single head on either side serves every head."""
    if enable_gqa:
        if hk == 0 or hq % hk != 0:
            raise ValueError(f"enable_gqa=True needs query heads ({hq}) divisible by key/value heads ({hk})")
    elif hq != hk and not (single_kv_head_ok and 1 in (hq, hk)):
        raise ValueError(f"query has {hq} heads ({dim}) but key/value have {hk}; "
                         f"pass enable_gqa=True for grouped-query attention")


# ---------------------------------------------------------------------------- dense query / key / value
def check_like_query(query: Tensor, key: Tensor, value: Tensor, broadcast: bool = False) -> None:
    """query, key, value: dense float tensors sharing query's dtype and device; of >= 3 dims and as many as the
    query, or with ``broadcast`` (SDPA) of >= 2 dims, any number."""
    min_dims = 2 if broadcast else 3
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_float_tensor(name, t)
        if t.dim() < min_dims:
            legend = "(..., L, E)" if min_dims == 2 else "(..., H, L, E)"
            raise ValueError(f"{name} must have at least {min_dims} dims {legend}, got shape {tuple(t.shape)}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    check_matches_query(query, ("key", key), ("value", value))
    if not broadcast:
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise ValueError(f"{name} has {t.dim()} dims but query has {query.dim()} "
                                 f"(query {tuple(query.shape)}, {name} {tuple(t.shape)})")


def heads(shape: tuple[int, ...]) -> int:
    """The head count of a (..., H, N, D) shape; 2-D (N, D) is one head."""
    return shape[-3] if len(shape) > 2 else 1


def check_qkv(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool, broadcast: bool = False) -> None:
    """The shapes of query (..., H, L, E), key (..., Hk, S, E), value (..., Hk, S, Ev). ``broadcast`` (SDPA, as
    torch): the dims before (L, E) broadcast between query and key/value, 2-D inputs included, and a single
    key/value head (or a single query head) serves every head; otherwise they must be equal."""
    check_like_query(query, key, value, broadcast)
    qs, ks, vs = tuple(query.shape), tuple(key.shape), tuple(value.shape)
    if ks[-1] != qs[-1]:
        raise ValueError(f"key head dim {ks[-1]} does not match query head dim {qs[-1]} (query {qs}, key {ks})")
    if ks[-2] != vs[-2]:
        raise ValueError(f"key length {ks[-2]} does not match value length {vs[-2]} (key {ks}, value {vs})")
    if ks[:-2] != vs[:-2]:
        raise ValueError(f"key and value batch/head dims differ: key {ks}, value {vs}")
    if qs[-1] == 0:
        raise ValueError(f"query/key head dim (last dim) must be at least 1, got shape {qs}")
    if broadcast:
        try:
            torch.broadcast_shapes(qs[:-3], ks[:-3])
        except RuntimeError:
            raise ValueError(f"key batch dims {ks[:-3]} do not broadcast with query batch dims {qs[:-3]} "
                             f"(query {qs}, key {ks})") from None
    elif ks[:-3] != qs[:-3]:
        raise ValueError(f"key batch dims {ks[:-3]} do not match query batch dims {qs[:-3]}")
    check_gqa_heads(heads(qs), heads(ks), enable_gqa, "dim -3", single_kv_head_ok=broadcast)


def check_mask(attn_mask, query: Tensor, scores: tuple[int, ...], legend: str = "the attention scores shape "
               "(..., L, S)") -> None:
    """attn_mask: None, or a bool (True = attend) / float (added; query's dtype or float32) tensor on the query's
    device that broadcasts to the ``scores`` shape (``legend`` names it in the error)."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (query.dtype, torch.float32):
        raise TypeError(f"attn_mask must be bool (True = attend) or a float mask of the query dtype "
                        f"{query.dtype} (or float32), got {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
    if attn_mask.dim() > len(scores):
        raise ValueError(f"attn_mask shape {tuple(attn_mask.shape)} has more dims than the scores {scores}")
    for m, t in zip(reversed(attn_mask.shape), reversed(scores)):
        if m != t and m != 1:
            raise ValueError(f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to {legend} = {scores}")


def scores_shape(query: Tensor, key: Tensor) -> tuple[int, ...]:
    """(..., H, L, S): the scores of query (..., H, L, E) against key (..., S, E)."""
    return (*query.shape[:-1], key.shape[-2])


# ------------------------------------------------------------------------------------------- additive
def check_additive(query, key, value, weight, is_causal) -> None:
    """query (..., H, L, D), key (..., H, S, D), value (..., H, S, Ev), weight (H, D), one dtype and device."""
    check_like_query(query, key, value)
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key hidden dim {key.shape[-1]} does not match query hidden dim {query.shape[-1]}: "
                         f"additive attention needs query and key projected to the same D "
                         f"(query {tuple(query.shape)}, key {tuple(key.shape)})")
    if query.shape[-1] == 0:
        raise ValueError(f"query/key hidden dim (last dim) must be at least 1, got shape {tuple(query.shape)}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key length {key.shape[-2]} does not match value length {value.shape[-2]} "
                         f"(key {tuple(key.shape)}, value {tuple(value.shape)})")
    if key.shape[:-2] != value.shape[:-2] or key.shape[:-2] != query.shape[:-2]:
        raise ValueError(f"query, key and value batch/head dims differ: query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}, value {tuple(value.shape)}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor (H, D), got {type(weight).__name__}")
    H, D = query.shape[-3], query.shape[-1]
    if weight.dim() != 2 or tuple(weight.shape) != (H, D):
        raise ValueError(f"weight must have shape (H, D) = {(H, D)}, got {tuple(weight.shape)}")
    check_matches_query(query, ("weight", weight))
    check_bool("is_causal", is_causal)


# ----------------------------------------------------------------------------------------------- hard
def check_top_k(top_k) -> int:
    """top_k as an int in [1, MAX_TOP_K]."""
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__} ({top_k!r})")
    top_k = int(top_k)
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be in [1, {MAX_TOP_K}] (MAX_TOP_K), got {top_k}")
    return top_k


# ---------------------------------------------------------------------------------- packed (varlen)
def check_packed(query, key, value, enable_gqa: bool) -> None:
    """query (total_q, H, E), key (total_k, Hk, E), value (total_k, Hk, Ev), one float dtype and device."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_float_tensor(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must be packed 3-D (total, heads, head_dim), got shape {tuple(t.shape)}")
    check_matches_query(query, ("key", key), ("value", value))
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"key head dim {key.shape[2]} does not match query head dim {query.shape[2]} "
                         f"(query {tuple(query.shape)}, key {tuple(key.shape)})")
    if query.shape[2] == 0:
        raise ValueError(f"query/key head dim must be at least 1, got query {tuple(query.shape)}")
    if key.shape[:2] != value.shape[:2]:
        raise ValueError(f"key and value must have the same (total_k, Hk), got key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}")
    check_gqa_heads(query.shape[1], key.shape[1], enable_gqa, "dim 1")


def check_cu_seqlens(name: str, cu, device: torch.device) -> None:
    """cu: a 1-D int32 tensor of B + 1 cumulative lengths on ``device``."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (cumulative sequence lengths), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D of size batch + 1, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but query is on {device}")


def check_max_seqlen(name: str, m) -> int:
    """m as an int >= 0 (a one-element integer tensor is read)."""
    if isinstance(m, bool) or not isinstance(m, int):
        if isinstance(m, Tensor) and m.numel() == 1 and not m.dtype.is_floating_point:
            m = int(m)
        else:
            raise TypeError(f"{name} must be an int, got {type(m).__name__}")
    if m < 0:
        raise ValueError(f"{name} must be >= 0, got {m}")
    return int(m)


def check_cu_values(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int, max_q: int, max_k: int) -> None:
    """cu[0] == 0, non-decreasing, cu[-1] == total, lengths <= max_seqlen. One host copy of both arrays
    (a device sync on CUDA; the caller skips it while torch.compile traces)."""
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


# ------------------------------------------------------------------------------------- nested (jagged)
def _describe(t) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    if not t.is_nested:
        return f"a dense tensor of shape {tuple(t.shape)}"
    return f"a nested tensor of layout {t.layout}"


def check_nested(query: Tensor, key, value, attn_mask) -> None:
    """Jagged query/key/value of one dtype, device and batch, ragged on the same dim: (B, H, j, E) (ragged dim
    2), (B, j, E) or (B, j, L, E) (ragged dim 1); no attn_mask."""
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, Tensor) or not t.is_nested:
            raise TypeError(f"query is a nested tensor, so {name} must be one too (jagged layout, the same "
                            f"batch); got {_describe(t)}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.layout != torch.jagged:
            raise TypeError(f"fastattn takes nested tensors of layout torch.jagged; {name} has layout {t.layout} "
                            f"(convert with torch.nested.nested_tensor(list(x.unbind()), layout=torch.jagged))")
        check_float_tensor(name, t)
    check_matches_query(query, ("key", key), ("value", value))
    for name, t in (("key", key), ("value", value)):
        if t.dim() != query.dim():
            raise ValueError(f"{name} has {t.dim()} dims but query has {query.dim()} (query {tuple(query.shape)}, "
                             f"{name} {tuple(t.shape)})")
        if t._ragged_idx != query._ragged_idx:
            raise ValueError(f"query, key and value must be ragged on the same dim; query is ragged on dim "
                             f"{query._ragged_idx}, {name} on dim {t._ragged_idx}")
        if t.size(0) != query.size(0):
            raise ValueError(f"query has a batch of {query.size(0)} sequences but {name} has {t.size(0)}")
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported with nested query/key/value (nor by torch's nested SDPA): "
                         "the ragged lengths already say which keys exist. Use is_causal, or "
                         "fastattn.varlen_attention(..., attn_mask=...) on the packed values for other masks")
    if query.dim() not in (3, 4):
        raise ValueError(f"nested query/key/value must be 4-D (B, H, j, E) or 3-D (B, j, E), got {query.dim()}-D "
                         f"query {tuple(query.shape)}")
    ragged = query._ragged_idx
    if (query.dim(), ragged) not in ((4, 2), (4, 1), (3, 1)):
        raise ValueError(f"nested query/key/value must be ragged along the sequence dim, (B, H, j, E) (ragged dim "
                         f"2, e.g. nested_tensor([...(j, H, E)...], layout=torch.jagged).transpose(1, 2)) or "
                         f"(B, j, E); got query {tuple(query.shape)} ragged on dim {ragged}")


# --------------------------------------------------------------------------------------- decode (KV cache)
def check_decode_window(window) -> None:
    """window: (left, right) ints >= -1, -1 meaning unbounded on that side."""
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)):
        raise ValueError(f"window must be (left, right), ints >= -1 (-1: unbounded), got {window!r}")


def check_variants(query: Tensor, lead: tuple[int, ...], window, softcap, sinks, alibi_slopes, lower_right
                   ) -> tuple[int, int, float]:
    """scaled_dot_product_attention's decoder-variant keywords, for a query whose dims before (L, E) are
    ``lead`` (batch dims, then heads H): window None or (left, right) ints >= -1; softcap None or a finite
    float >= 0; sinks None or a floating (H,) tensor; alibi_slopes None or a floating (H,) or (*lead) tensor;
    lower_right a bool. Returns (window_left, window_right, softcap) with -1, -1, 0.0 for "off"."""
    check_bool("lower_right", lower_right)
    if window is None:
        window = (-1, -1)
    check_decode_window(window)
    if softcap is None:
        softcap = 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, Real) or not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be None or a finite float >= 0 (0: off), got {softcap!r}")
    H = lead[-1] if lead else 1
    for name, t, shapes in (("sinks", sinks, [(H,)]), ("alibi_slopes", alibi_slopes, [(H,), tuple(lead)])):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor of shape {' or '.join(map(str, shapes))}, "
                            f"got {shape_or_type(t)}")
        if tuple(t.shape) not in shapes:
            raise ValueError(f"{name} must have shape {' or '.join(map(str, dict.fromkeys(shapes)))} (the query's "
                             f"heads{'' if name == 'sinks' else ', or its dims before (L, E)'}), got {tuple(t.shape)}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes carry no gradient in fastattn (they are fixed per head): pass "
                         "alibi_slopes.detach()")
    return int(window[0]), int(window[1]), float(softcap)


def check_launch_window_softcap(window, softcap) -> tuple[int, int, float]:
    """The attention launchers' window and softcap (both devices): (left, right) ints >= -1 (-1: unbounded),
    softcap finite >= 0 (0: off). Returns (left, right, softcap)."""
    window = tuple(operator.index(w) for w in window)
    if len(window) != 2 or min(window) < -1:
        raise ValueError(f"window must be (left, right) with each side >= -1 (-1: unbounded), got {window}")
    softcap = float(softcap)
    if not softcap >= 0.0 or softcap == float("inf"):
        raise ValueError(f"softcap must be a finite float >= 0 (0: off), got {softcap}")
    return window[0], window[1], softcap


def check_launch_sinks(sinks: Tensor | None, q: Tensor, H: int) -> None:
    """The attention launchers' sinks (both devices): None or a contiguous float32 (H,) tensor on q's device."""
    if sinks is not None and (sinks.dtype != torch.float32 or tuple(sinks.shape) != (H,)
                              or sinks.device != q.device or not sinks.is_contiguous()):
        raise ValueError(f"sinks must be a contiguous float32 ({H},) tensor on {q.device}, got {sinks.dtype} "
                         f"{tuple(sinks.shape)} on {sinks.device}")


def check_num_splits(num_splits) -> None:
    """num_splits: None (the launcher chooses) or an int >= 1."""
    if num_splits is not None and (not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1):
        raise ValueError(f"num_splits must be None (chosen by the launcher) or an int >= 1, got {num_splits!r}")


def check_head_vectors(B: int, H: int, sinks, alibi_slopes, device: torch.device | None = None) -> None:
    """sinks None or floating (H,); alibi_slopes None or floating (H,) or (B, H); each on ``device`` when given."""
    for name, t, shapes in (("sinks", sinks, [(H,)]), ("alibi_slopes", alibi_slopes, [(H,), (B, H)])):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point() or tuple(t.shape) not in shapes:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating tensor of shape {' or '.join(map(str, shapes))}, got {got}")
        if device is not None and t.device != device:
            raise ValueError(f"{name} must be on q's device {device}, got {t.device}")


def check_decode_launch(q, k_cache, v_cache, cache_seqlens, block_table, mask, window, softcap, sinks,
                        alibi_slopes, num_splits, out, *, cpu: bool, max_head_dim: int | None = None) -> None:
    """The decode launchers' contract (kernels/decode.py's module doc), for both devices: q (B, L, H, E),
    caches (B or pages, S_max or page size, Hk, E / Ev) of q's kernel dtype, and the rest as
    ``fastattn.attention_with_kvcache`` hands them on. ``cpu``: every tensor must be a CPU tensor (the C++
    kernel), else every tensor must be on q's device. ``max_head_dim``: E and Ev must be 1..max_head_dim
    (the Triton kernel's register tiles). ValueError / TypeError naming the argument, what was expected and
    what came."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor, got {got}")
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    B, L, H, E = q.shape
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"k_cache and v_cache must have q's dtype {q.dtype}, got {k_cache.dtype} and {v_cache.dtype}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache and v_cache must agree in their first three dims, got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    Hk = k_cache.shape[2]
    if k_cache.shape[3] != E:
        raise ValueError(f"k_cache's head dim must be q's ({E}), got {k_cache.shape[3]}")
    if Hk == 0 or H % Hk:
        raise ValueError(f"q's heads ({H}) must be a multiple of the cache's key/value heads ({Hk})")
    if max_head_dim is not None and not (1 <= E <= max_head_dim and 1 <= v_cache.shape[3] <= max_head_dim):
        raise ValueError(f"head dims must be 1..{max_head_dim}, got E={E}, Ev={v_cache.shape[3]}")
    named = (("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens),
             ("block_table", block_table), ("mask", mask), ("sinks", sinks), ("alibi_slopes", alibi_slopes),
             ("out", out))
    for name, t in ((("q", q),) + named if cpu else named):
        if not isinstance(t, Tensor):
            continue
        if cpu and t.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor for the CPU kernel, got {t.device}")
        if not cpu and t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.shape != (B,) or cache_seqlens.dtype != torch.int32:
        got = (f"{tuple(cache_seqlens.shape)} {cache_seqlens.dtype}" if isinstance(cache_seqlens, Tensor)
               else type(cache_seqlens).__name__)
        raise ValueError(f"cache_seqlens must be an int32 tensor of shape ({B},), got {got}")
    if block_table is None:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache's batch dim must be q's ({B}) without block_table, got {k_cache.shape[0]}")
    elif (not isinstance(block_table, Tensor) or block_table.dim() != 2 or block_table.shape[0] != B
          or block_table.dtype != torch.int32):
        got = (f"{tuple(block_table.shape)} {block_table.dtype}" if isinstance(block_table, Tensor)
               else type(block_table).__name__)
        raise ValueError(f"block_table must be an int32 tensor of shape ({B}, max_blocks), got {got}")
    check_decode_window(window)
    if not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite float >= 0 (0: off), got {softcap!r}")
    check_head_vectors(B, H, sinks, alibi_slopes)
    check_num_splits(num_splits)
    if mask is not None:
        if block_table is not None:
            raise ValueError("mask is supported with a contiguous cache only, not with block_table")
        want = (B, H, L, k_cache.shape[1])
        if (not isinstance(mask, Tensor) or mask.dim() != 4
                or any(m not in (1, w) for m, w in zip(mask.shape, want))):
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a 4-D tensor broadcastable to (B, H, L, S_max) = {want}, got {got}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask must be bool (True = attend) or floating (added to the scores), got {mask.dtype}")
    if out is not None:
        want = (B, L, H, v_cache.shape[3])
        if not isinstance(out, Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"out must be a tensor of shape (B, L, H, Ev) = {want}, got {got}")
        if out.dtype != q.dtype:
            raise TypeError(f"out must have q's dtype {q.dtype}, got {out.dtype}")


# ------------------------------------------------------------------ fastattn.attention_with_kvcache


def shape_or_type(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def check_cache_tensor(name: str, t, q: Tensor | None = None) -> None:
    """t is a 4-D float tensor of a kernel dtype (q's, and on q's device, when q is given)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
    if q is None:
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        return
    if t.dtype != q.dtype:
        raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")


def check_inference_only(**tensors: Tensor | None) -> None:
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.requires_grad:
            raise ValueError(f"{name} requires grad, but attention_with_kvcache is inference only (no backward): "
                             f"call it under torch.no_grad() / torch.inference_mode(), or pass {name}.detach()")


def check_kvcache_scalars(B: int, H: int, q: Tensor, window, softcap, sinks, alibi_slopes, scale, num_splits) -> None:
    check_decode_window(window)
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not (math.isfinite(softcap)
                                                                                 and softcap >= 0):
        raise ValueError(f"softcap must be a finite float >= 0 (0: off), got {softcap!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be None (1 / sqrt(E)) or a finite float, got {scale!r}")
    check_num_splits(num_splits)
    check_head_vectors(B, H, sinks, alibi_slopes, device=q.device)


def check_cache_seqlens(cache_seqlens, B: int, device: torch.device) -> Tensor:
    """cache_seqlens as a (B,) int64 tensor on ``device``."""
    if isinstance(cache_seqlens, bool):
        raise TypeError("cache_seqlens must be an int or a (B,) int32/int64 tensor, got bool")
    if isinstance(cache_seqlens, int):
        return torch.full((B,), cache_seqlens, dtype=torch.int64, device=device)
    if not isinstance(cache_seqlens, Tensor):
        raise TypeError(f"cache_seqlens must be an int or a (B,) int32/int64 tensor, got "
                        f"{type(cache_seqlens).__name__}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"cache_seqlens must have shape (B,) = ({B},), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens must be on q's device {device}, got {cache_seqlens.device}")
    return cache_seqlens.to(torch.int64)


def check_cache_values(lens: Tensor, L_new: int, capacity: int, block_table: Tensor | None, page: int,
                  num_blocks: int) -> None:
    """The lengths (before appending) are >= 0 and leave room for L_new more keys; the block-table entries the
    sequences use after appending lie in [0, num_blocks). Reads both to the host (a sync on a CUDA device)."""
    host = lens.cpu()
    if host.numel() and int(host.min()) < 0:
        b = int(torch.nonzero(host < 0)[0])
        raise ValueError(f"cache_seqlens must be >= 0, got cache_seqlens[{b}] = {int(host[b])}")
    after = host + L_new
    if after.numel() and int(after.max()) > capacity:
        b = int(torch.argmax(after))
        what = "max_blocks * page_size" if block_table is not None else "S_max"
        raise ValueError(f"cache_seqlens[{b}] = {int(host[b])} plus {L_new} new keys exceeds the cache capacity "
                         f"({what} = {capacity})")
    if block_table is None:
        return
    table = block_table.cpu()
    used = torch.arange(table.shape[1])[None, :] < ((after + page - 1) // page)[:, None]  # (B, max_blocks)
    bad = used & ((table < 0) | (table >= num_blocks))
    if bad.any():
        b, j = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(table[b, j])} is outside the page pool [0, {num_blocks}) "
                         f"(k_cache has {num_blocks} pages)")
