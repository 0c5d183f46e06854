"""Public functional API: validate, normalise to 4-D views, pick the backend, call the op."""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor
from torch.nn.attention.bias import CausalBias, CausalVariant
from torch.overrides import handle_torch_function, has_torch_function

from fastattn import _launchers, reference
from fastattn._ops import attention_fwd

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------- validation
def _check_tensor(name: str, t, min_dims: int = 3) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() < min_dims:
        legend = "(..., L, E)" if min_dims == 2 else "(..., H, L, E)"
        raise ValueError(f"{name} must have at least {min_dims} dims {legend}, got shape {tuple(t.shape)}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def _check_like_query(query: Tensor, key: Tensor, value: Tensor, broadcast: bool = False) -> None:
    """query, key, value: float tensors sharing query's dtype and device; of >= 3 dims and as many as the query,
    or with ``broadcast`` (SDPA) of >= 2 dims, any number."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t, 2 if broadcast else 3)
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match query dtype {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
        if not broadcast and t.dim() != query.dim():
            raise ValueError(f"{name} has {t.dim()} dims but query has {query.dim()} "
                             f"(query {tuple(query.shape)}, {name} {tuple(t.shape)})")


def _heads(shape: tuple[int, ...]) -> int:
    return shape[-3] if len(shape) > 2 else 1  # 2-D (N, D): one head


def _check_qkv(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool, broadcast: bool = False) -> None:
    """The shapes of query (..., H, L, E), key (..., Hk, S, E), value (..., Hk, S, Ev). ``broadcast`` (SDPA, as
    torch): the dims before (L, E) broadcast between query and key/value, 2-D inputs included, and a single
    key/value head (or a single query head) serves every head; otherwise they must be equal."""
    _check_like_query(query, key, value, broadcast)
    qs, ks, vs = tuple(query.shape), tuple(key.shape), tuple(value.shape)
    if ks[-1] != qs[-1]:
        raise ValueError(f"key head dim {ks[-1]} does not match query head dim {qs[-1]} (query {qs}, key {ks})")
    if ks[-2] != vs[-2]:
        raise ValueError(f"key length {ks[-2]} does not match value length {vs[-2]} (key {ks}, value {vs})")
    if ks[:-2] != vs[:-2]:
        raise ValueError(f"key and value batch/head dims differ: key {ks}, value {vs}")
    if qs[-1] == 0:
        raise ValueError(f"query/key head dim (last dim) must be at least 1, got shape {qs}")
    hq, hk = _heads(qs), _heads(ks)
    if broadcast:
        try:
            torch.broadcast_shapes(qs[:-3], ks[:-3])
        except RuntimeError:
            raise ValueError(f"key batch dims {ks[:-3]} do not broadcast with query batch dims {qs[:-3]} "
                             f"(query {qs}, key {ks})") from None
    elif ks[:-3] != qs[:-3]:
        raise ValueError(f"key batch dims {ks[:-3]} do not match query batch dims {qs[:-3]}")
    if enable_gqa:
        if hk == 0 or hq % hk != 0:
            raise ValueError(f"enable_gqa=True needs query heads ({hq}) divisible by key/value heads ({hk})")
    elif hq != hk and not (broadcast and 1 in (hq, hk)):
        raise ValueError(f"query has {hq} heads (dim -3) but key/value have {hk}; "
                         f"pass enable_gqa=True for grouped-query attention")


def _broadcast_qkv(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple[int, ...]]:
    """(q, k, v, lead): the inputs with their batch dims broadcast to one shape (stride-0 views, nothing copied)
    and a single query head repeated over the key/value heads; ``lead`` = the output's dims before (L, Ev).
    A single key/value head needs nothing: the kernels read it as grouped-query attention (Hk = 1)."""
    qs, ks = tuple(query.shape), tuple(key.shape)
    if qs[:-2] == ks[:-2]:
        return query, key, value, qs[:-2]
    if len(qs) == len(ks) == 2:
        return query, key, value, ()
    batch = torch.broadcast_shapes(qs[:-3], ks[:-3])
    hq, hk = _heads(qs), _heads(ks)
    H = hk if hq == 1 else hq
    q = query.expand(*batch, H, *qs[-2:])
    k, v = (t.expand(*batch, hk, *t.shape[-2:]) for t in (key, value))
    return q, k, v, (*batch, H)


def _check_mask(attn_mask, query: Tensor, key: Tensor) -> None:
    """attn_mask: None, or bool / float broadcastable to the scores (*query.shape[:-1], S)."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (query.dtype, torch.float32):
        raise TypeError(f"attn_mask must be bool (True = attend) or a float mask of the query dtype "
                        f"{query.dtype} (or float32), got {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
    target = (*query.shape[:-1], key.shape[-2])
    if attn_mask.dim() > len(target):
        raise ValueError(f"attn_mask shape {tuple(attn_mask.shape)} has more dims than the scores {target}")
    for m, t in zip(reversed(attn_mask.shape), reversed(target)):
        if m != t and m != 1:
            raise ValueError(f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to the attention "
                             f"scores shape (..., L, S) = {target}")


def _check_scalars(dropout_p, is_causal, scale, enable_gqa) -> None:
    if (type(dropout_p) is float and 0.0 <= dropout_p < 1.0 and type(is_causal) is bool  # the common case
            and type(enable_gqa) is bool and (scale is None or (type(scale) is float and math.isfinite(scale)))):
        return
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, Real):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale}")


# ------------------------------------------------------------------------------------ normalisation
def _to_4d(t: Tensor) -> Tensor:
    """(..., H, N, D) -> (B, H, N, D), and (N, D) -> (1, 1, N, D), as a view when the leading dims allow it."""
    if t.dim() == 4:
        return t
    if t.dim() < 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t.reshape(-1, *t.shape[-3:])


def _mask_to_4d(mask: Tensor, lead: tuple[int, ...]) -> Tensor:
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


def _pick_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    if torch.compiler.is_compiling():
        # Availability was established when the model ran eagerly / at import; dynamo cannot trace
        # the import probes, and the op itself raises a clear error if a kernel is missing.
        if backend is not None:
            return backend
        if device.type == "cuda" and dtype == torch.float64:
            return "reference"
        return "cpu" if device.type == "cpu" else "triton"
    if backend is not None:
        if backend not in _launchers.BACKENDS:
            raise ValueError(f"backend must be one of {_launchers.BACKENDS} or None, got {backend!r}")
        if backend == "cpu":
            if device.type != "cpu":
                raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
            ok, why = _launchers.cpu_available()
            if not ok:
                raise RuntimeError(f"backend='cpu' is unavailable: {why}")
        elif backend == "triton":
            ok, why = _launchers.triton_available()
            if not ok:
                raise RuntimeError(f"backend='triton' is unavailable: {why}")
            if device.type == "cpu" and not _launchers.triton_interpreting():
                raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the "
                                 "Triton interpreter on CPU tensors)")
            if device.type not in ("cpu", "cuda"):
                raise ValueError(f"backend='triton' supports CUDA tensors, got {device}")
            if dtype == torch.float64 and device.type == "cuda":
                raise TypeError("backend='triton' supports float16, bfloat16 and float32, not float64")
        return backend
    if device.type == "cpu":
        ok, why = _launchers.cpu_available()
        if not ok:
            raise RuntimeError(f"no fastattn kernel for CPU tensors: {why}")
        return "cpu"
    if device.type == "cuda":
        if dtype == torch.float64:
            return "reference"  # exact float64 math; Triton has no float64 tensor cores
        ok, why = _launchers.triton_available()
        if not ok:
            raise RuntimeError(f"no fastattn kernel for CUDA tensors: {why}")
        return "triton"
    raise ValueError(f"fastattn supports CPU and CUDA tensors, got {device}")


def _scale_and_seed(E: int, scale, dropout_p) -> tuple[float, float, Tensor | None]:
    """(scale, dropout_p, seed): scale defaults to 1/sqrt(E); with dropout, an int64 Philox seed drawn from
    torch's default generator (so torch.manual_seed reproduces the mask), else None."""
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64) if dropout_p > 0.0 else None
    return scale, dropout_p, seed


# ------------------------------------------------------------------------------------ eager fast path
_ZERO_SEED = torch.zeros((), dtype=torch.int64)  # the (unused) seed of dropout-free calls; never written


def _plain_eager_inference(*tensors: Tensor | None) -> bool:
    """True when calling the launcher directly is indistinguishable from calling the op: no gradient
    is needed, nothing traces or compiles, no dispatch mode or functorch transform is active, and the
    tensors are plain torch.Tensor (not fake, meta or a subclass)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not Tensor or t.is_meta or (grad and t.requires_grad):
            return False
    return True


def _needs_out_lo(dtype: torch.dtype, *tensors: Tensor | None) -> bool:
    """fp16 / bf16 with a gradient to come: the forward op also returns its output's rounding residual for
    the backward's delta (fastattn/_ops.py). Inference, float32 and float64 never pay for it."""
    if dtype not in (torch.float16, torch.bfloat16) or not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------------------- public API
def _causal_bias(bias: CausalBias, query: Tensor, key: Tensor, is_causal) -> bool:
    """A ``torch.nn.attention.bias.CausalBias`` attn_mask read as the causal flag it stands for (no mask is
    built from it): True for lower-right alignment (key j visible to query i iff j <= i + S - L), False for
    upper-left (``is_causal=True``). Its lengths must be the query's and the key's."""
    if is_causal is True:
        raise ValueError("attn_mask is a CausalBias, which already makes the attention causal: "
                         "pass is_causal=False with it")
    for name, t in (("query", query), ("key", key)):
        if not isinstance(t, Tensor) or t.dim() < 2:
            raise TypeError(f"{name} must be a torch.Tensor of at least 2 dims (..., L, E), got {type(t).__name__}"
                            + (f" of shape {tuple(t.shape)}" if isinstance(t, Tensor) else ""))
    L, S = query.shape[-2], key.shape[-2]
    if (bias.seq_len_q, bias.seq_len_kv) != (L, S):
        raise ValueError(f"attn_mask is a CausalBias for (L, S) = ({bias.seq_len_q}, {bias.seq_len_kv}), but the "
                         f"query has L = {L} and the key S = {S}")
    return bias.variant == CausalVariant.LOWER_RIGHT and L != S


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
    return_lse: bool = False,
):
    """Fused scaled dot-product attention, a drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Shapes (B... any number of leading batch dims, H heads, L query length, S key length, E head dim,
    Ev value head dim): query (..., H, L, E), key (..., Hk, S, E), value (..., Hk, S, Ev) -> (..., H, L, Ev);
    2-D (L, E) / (S, E) / (S, Ev) inputs are one head of one sequence. Hk == H unless ``enable_gqa`` (then
    H % Hk == 0 and query head h uses key/value head h // (H // Hk)).

    Args:
        attn_mask: broadcastable to (..., H, L, S). Bool: True means the key takes part in attention.
            Float (query dtype or float32): added to the scaled scores (-inf hides a key).
            A ``torch.nn.attention.bias.CausalBias`` (``causal_upper_left(L, S)`` / ``causal_lower_right(L, S)``)
            runs the kernels' causal mode with that alignment; no (L, S) mask is built.
        dropout_p: probability of dropping an attention probability (inside the fused kernel). The mask
            comes from a Philox stream keyed by a seed drawn from torch's default generator, so
            ``torch.manual_seed`` reproduces it; ``fastattn.reference.dropout_keep_mask`` rebuilds it.
        is_causal: key j visible to query i iff j <= i (top-left aligned, as torch). Combines with attn_mask.
        scale: defaults to 1 / sqrt(E).
        backend: None (auto: CPU tensors -> "cpu", CUDA tensors -> "triton"), "cpu", "triton", "reference".
        return_lse: also return the float32 log-sum-exp of the scores, (..., H, L) (natural log; -inf for
            rows with no visible key). It carries no gradient.

    The output is laid out as torch lays out its own (like the query when Ev == E and there is no dropout,
    else contiguous; ``fastattn._ops.empty_output``). Rows whose keys are all hidden give zeros (and zero
    gradients), never NaN. Tensor subclasses with ``__torch_function__`` are offered the call first, as torch's
    functions do. Inputs are never modified.
    """
    if not torch.compiler.is_compiling():
        # Plain eager CPU inference: the whole call in C++ (~50 us of cold Python less per call; B16 H12 L64
        # E32 bf16 takes ~0.6 ms). None for every other case, which takes the path below.
        eager = _launchers.cpu_eager()
        if eager is not None:
            res = eager(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend, return_lse)
            if res is not None:
                return res
    if isinstance(query, Tensor) and query.is_nested:
        # Jagged (B, H, j, E) nested tensors run the varlen kernels (fastattn/nested.py); checked before the
        # __torch_function__ protocol, which torch.nested's tensors also take part in.
        from fastattn.nested import nested_sdpa
        return nested_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend=backend,
                           return_lse=return_lse)
    lower_right = False
    if isinstance(attn_mask, CausalBias):
        # Read before the __torch_function__ protocol: CausalBias's own handler only knows torch's function
        # and would hand the call back with its (uninitialised) storage as a float mask.
        lower_right = _causal_bias(attn_mask, query, key, is_causal)
        attn_mask, is_causal = None, True
    elif has_torch_function((query, key, value, attn_mask)):
        return handle_torch_function(
            scaled_dot_product_attention, (query, key, value, attn_mask), query, key, value, attn_mask=attn_mask,
            dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, backend=backend,
            return_lse=return_lse)
    _check_qkv(query, key, value, enable_gqa, broadcast=True)
    query, key, value, lead = _broadcast_qkv(query, key, value)
    _check_mask(attn_mask, query, key)
    _check_scalars(dropout_p, is_causal, scale, enable_gqa)
    scale, dropout_p, seed = _scale_and_seed(query.shape[-1], scale, dropout_p)
    backend = _pick_backend(backend, query.device, query.dtype)
    L, S = query.shape[-2], key.shape[-2]

    if backend == "reference":
        return reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, upcast=False,
            dropout_seed=None if seed is None else int(seed), return_lse=return_lse,
            causal_offset=S - L if lower_right else 0)

    q4, k4, v4 = _to_4d(query), _to_4d(key), _to_4d(value)
    mask4 = None if attn_mask is None else _mask_to_4d(attn_mask, lead)
    B4, H = q4.shape[0], q4.shape[1]
    Ev = value.shape[-1]

    if any(n == 0 for n in (B4, H, L, S, Ev)):  # (min() would compare sizes: a guard under torch.export)
        out4 = query.new_zeros(B4, H, L, Ev)
        lse4 = query.new_full((B4, H, L), float("-inf"), dtype=torch.float32)
        # Keep the graph connected so .backward() through an empty attention gives zero gradients.
        if query.requires_grad or key.requires_grad or value.requires_grad:
            out4 = out4 + 0 * (q4.sum() + k4.sum() + v4.sum())
    elif _plain_eager_inference(q4, k4, v4, mask4):
        # Same launcher the op calls, minus the op's dispatch (~20 us per call; BERT-size calls take
        # ~0.5 ms): only when nothing (autograd, tracing, a mode or a subclass) needs to see the op.
        out4, lse4 = _launchers.get(backend, q4.device).attention_fwd(
            q4, k4, v4, mask4, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
            seed=0 if seed is None else int(seed), causal_offset=S - L if lower_right else 0)
    else:
        if seed is None:
            seed = _ZERO_SEED if not torch.compiler.is_compiling() else torch.zeros((), dtype=torch.int64)
        out4, lse4, _ = attention_fwd(q4, k4, v4, mask4, scale, is_causal, lower_right, dropout_p, seed, backend,
                                      _needs_out_lo(q4.dtype, q4, k4, v4, mask4))

    if query.dim() == 4:  # out4 / lse4 already have the caller's shape and the query's layout
        return (out4, lse4) if return_lse else out4
    # Other dims: torch returns a contiguous output (its math path), as reshape gives it here.
    out = out4.reshape(*lead, L, Ev).contiguous()
    if return_lse:
        return out, lse4.reshape(*lead, L)
    return out
