"""``fastattn.scaled_dot_product_attention``: validate, normalise to 4-D views, pick the backend, call the op.

Three routes take a call:

* CPU eager inference: the whole call in C++. A call whose query is a plain CPU ``torch.Tensor`` and that uses
  none of the decoder variants is offered to ``eager_fwd`` of the C++ kernel module (csrc/eager.cpp, through
  the CPython API, no torch headers). It takes plain eager inference: 4-D query / key / value, no dropout,
  backend None or "cpu", nothing empty, nothing that needs a gradient, no tracing, ``torch.compile``, dispatch
  mode or functorch transform. It reads the tensors, allocates the output as the op does and runs the kernel
  the op would run, so the results are bit-identical: decode-shaped calls (the decode route's rule below) the
  decode kernel with the decode launcher's views, scale, threads and key splits, the others the attention
  kernel. It returns None for every call it cannot take whole, including every call with a bad argument,
  without raising: the checks and their errors are Python's (fastattn/_validation.py).
* Decode: inference on a short query block against many keys (``decode_route``: L <= 16 query rows, S >= 4 L
  keys, no dropout, nothing that needs a gradient, no torch.compile or functorch transform, fp16 / bf16 /
  fp32, head dims <= 256) runs the op ``fastattn::decode_fwd`` (fastattn/_ops/decode.py), which splits the keys
  over programs instead of tiling queries that are not there. q / k / v go as (B, L, H, E)-ordered views
  (nothing copied) with every sequence's length S; the mask (bool or float) through its broadcast strides;
  is_causal (top-left: row i sees keys j <= i) as the decode kernel's lower-right causal over the first L keys
  only (length L: row i sits at position L - L + i = i), a lower-right CausalBias as lower-right causal over all
  S keys; the variants as the decode kernel's own (a window or ALiBi only where the row positions agree:
  lower-right, or top-left causal); the output is laid out as the attention op lays out its own
  (``empty_output``).
* Everything else goes through the custom op ``fastattn::attention_fwd`` (fastattn/_ops/attention.py), which
  autograd, torch.compile, torch.export and opcheck see.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.bias import CausalBias, CausalVariant
from torch.overrides import handle_torch_function, has_torch_function

from fastattn import _launchers, reference
from fastattn import _validation as check
from fastattn._normalise import (broadcast_qkv, connected_zeros, mask_to_4d, needs_out_lo, no_key_lse, op_seed,
                                 scale_and_seed, to_4d)
from fastattn._ops.attention import attention_fwd
from fastattn._ops.decode import decode_fwd

#: The decode route's shape rule: at most this many query rows, against at least DECODE_MIN_KEYS_PER_ROW times
#: as many keys.
DECODE_MAX_QUERY = 16
DECODE_MIN_KEYS_PER_ROW = 4


def decode_shaped(L: int, S: int) -> bool:
    """A short query block against many keys: the shapes the decode route takes (module doc)."""
    return L <= DECODE_MAX_QUERY and S >= DECODE_MIN_KEYS_PER_ROW * L


def _decode_launcher_built(backend: str | None, device: torch.device) -> bool:
    """The decode kernel exists for this call: always in Triton, on the CPU once the C++ launcher is built."""
    if device.type == "cuda" or backend == "triton":
        return True
    return backend in (None, "cpu") and hasattr(_launchers.launcher_for("decode", "cpu", device), "decode_fwd")


def decode_route(q4: Tensor, k4: Tensor, v4: Tensor, mask4: Tensor | None, dropout_p: float,
                 backend: str, *, positioned: bool = False, head_vectors: tuple[Tensor | None, ...] = ()) -> bool:
    """Whether a checked call with 4-D (B, H, L, E) views takes the decode route (module doc). Traced calls
    never do: their sizes may be symbolic, and the rule would put guards on them. ``positioned``: the call
    has a window or ALiBi, which need each row's position i' = i + offset; the decode kernel places row i at
    n - L + i, which is the call's position only for lower-right or top-left causal alignment (the caller
    says, via ``_decode_aligned``). ``head_vectors``: sinks / slopes, which must not need a gradient either."""
    if (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch._C._are_functorch_transforms_active()):
        return False
    L, S, E, Ev = q4.shape[2], k4.shape[2], q4.shape[3], v4.shape[3]
    if not all(type(n) is int for n in (L, S, E, Ev, q4.shape[1], k4.shape[1])):
        return False
    if (not decode_shaped(L, S) or dropout_p != 0.0 or backend == "reference" or E > 256 or Ev > 256
            or q4.dtype not in check.KERNEL_DTYPES or q4.shape[1] % k4.shape[1]):
        return False
    if positioned:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q4, k4, v4, mask4,
                                                                                 *head_vectors)):
        return False
    return _decode_launcher_built(backend, q4.device)


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


def _decode(q4: Tensor, k4: Tensor, v4: Tensor, mask4: Tensor | None, scale: float, is_causal: bool,
            lower_right: bool, backend: str, window: tuple[int, int], softcap: float, sinks: Tensor | None,
            alibi_slopes: Tensor | None) -> tuple[Tensor, Tensor]:
    """(out4, lse4) of a decode-route call (module doc), out4 laid out as ``empty_output`` lays it out."""
    B, H, L, _ = q4.shape
    S = k4.shape[2]
    # Lower-right causal over the first n keys puts row i at position n - L + i: n = S for lower-right, n = L
    # for top-left (row i at position i; the keys past L, which no row sees, are never read).
    n = L if is_causal and not lower_right else S
    seqlens = torch.full((B,), n, dtype=torch.int32, device=q4.device)
    out, lse = decode_fwd(q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2), seqlens, None, mask4, scale,
                          is_causal, window[0], window[1], softcap, sinks, alibi_slopes, None, backend, "sdpa")
    return out.transpose(1, 2), lse


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
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    lower_right: bool = False,
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
            rows with no visible key; the sink included with ``sinks``). It carries no gradient.

    Decoder variants (fastattn's own keywords; every backend runs them in its kernels, forward and backward).
    Query row i sits at position i' = i (top-left, torch's ``is_causal`` alignment) or, with ``lower_right=True``
    or a lower-right ``CausalBias``, i' = i + S - L (the query block at the end of the keys: a decoder step).
    For key j, in this order:

        window=(left, right): key j visible iff i' - left <= j <= i' + right; -1 leaves a side unbounded
            (Mistral's sliding window w is ``window=(w - 1, 0)`` with is_causal). Key blocks outside are skipped.
        softcap: scores -> softcap * tanh(scores / softcap) (Gemma 2), before the mask.
        alibi_slopes: (H,) or (..., H) (the query's dims before (L, E)): score += slope * (j - i'), after the cap.
            No gradient.
        sinks: (H,): a per-head logit in each row's softmax denominator that has no value (attention sinks,
            gpt-oss): out_i = sum_j exp(s_ij - lse_i) v_j with lse_i = log(sum_j exp(s_ij) + exp(sink_h)).
            Differentiable (its gradient is -sum over batch and rows of exp(sink - lse) * rowsum(dout * out)).
        lower_right: the alignment above; with ``is_causal`` key j is visible iff j <= i + S - L.

    The output is laid out as torch lays out its own (like the query when Ev == E and there is no dropout,
    else contiguous; ``fastattn._ops.empty_output``). Rows whose keys are all hidden give zeros (and zero
    gradients), never NaN. Tensor subclasses with ``__torch_function__`` are offered the call first, as torch's
    functions do. Inputs are never modified.
    """
    if lower_right is True and window is None and alibi_slopes is None and not isinstance(attn_mask, CausalBias):
        # Only is_causal reads the alignment here, and a single row at the end of the keys sees them all: such a
        # call (a decoder step) is a plain one, which the eager route below may take.
        if is_causal is False:
            lower_right = False
        elif is_causal is True and isinstance(query, Tensor) and query.dim() >= 2 and query.shape[-2] == 1:
            lower_right = is_causal = False
    variants = (window is not None or softcap is not None or sinks is not None or alibi_slopes is not None
                or lower_right is not False)
    if not variants and not torch.compiler.is_compiling() and type(query) is Tensor and query.is_cpu:
        # The CPU eager inference route (module doc); None: the call takes the op below.
        eager = _launchers.cpu_eager()
        if eager is not None:
            res = eager(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend, return_lse)
            if res is not None:
                return res
    if isinstance(query, Tensor) and query.is_nested:
        # Jagged (B, H, j, E) nested tensors run the varlen kernels (fastattn/nested.py); checked before the
        # __torch_function__ protocol, which torch.nested's tensors also take part in.
        from fastattn.nested import nested_sdpa
        if variants:
            raise ValueError("window, softcap, sinks, alibi_slopes and lower_right are not supported with nested "
                             "(jagged) tensors; use fastattn.varlen_attention or a padded batch")
        return nested_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend=backend,
                           return_lse=return_lse)
    if isinstance(attn_mask, CausalBias):
        # Read before the __torch_function__ protocol: CausalBias's own handler only knows torch's function
        # and would hand the call back with its (uninitialised) storage as a float mask.
        if _causal_bias(attn_mask, query, key, is_causal):
            lower_right = True
        elif lower_right is True and query.shape[-2] != key.shape[-2]:
            raise ValueError("lower_right=True contradicts attn_mask, an upper-left CausalBias: pass one alignment")
        attn_mask, is_causal = None, True
    elif has_torch_function((query, key, value, attn_mask)):
        return handle_torch_function(
            scaled_dot_product_attention, (query, key, value, attn_mask), query, key, value, attn_mask=attn_mask,
            dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, backend=backend,
            return_lse=return_lse, window=window, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
            lower_right=lower_right)
    check.check_qkv(query, key, value, enable_gqa, broadcast=True)
    query, key, value, lead = broadcast_qkv(query, key, value)
    check.check_mask(attn_mask, query, check.scores_shape(query, key))
    check.check_scalars(dropout_p, is_causal, scale, enable_gqa)
    window_left, window_right, softcap = check.check_variants(query, lead, window, softcap, sinks, alibi_slopes,
                                                              lower_right)
    scale, dropout_p, seed = scale_and_seed(query.shape[-1], scale, dropout_p)
    backend = _launchers.choose_backend(backend, query.device, query.dtype)
    L, S = query.shape[-2], key.shape[-2]

    if backend == "reference":
        return reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, upcast=False,
            dropout_seed=None if seed is None else int(seed), return_lse=return_lse,
            causal_offset=S - L if lower_right else 0, window=(window_left, window_right), softcap=softcap,
            sinks=sinks, alibi_slopes=alibi_slopes)

    q4, k4, v4 = to_4d(query), to_4d(key), to_4d(value)
    mask4 = None if attn_mask is None else mask_to_4d(attn_mask, lead)
    B4, H = q4.shape[0], q4.shape[1]
    Ev = value.shape[-1]
    if alibi_slopes is not None and alibi_slopes.dim() > 1:
        alibi_slopes = alibi_slopes.reshape(B4, H)
    positioned = (window_left, window_right) != (-1, -1) or alibi_slopes is not None
    # The decode kernel places row i at n - L + i (``_decode``): the call's position for lower-right alignment,
    # and for top-left causal calls (n = L); a top-left call without the causal flag has no such n.
    misplaced = positioned and not (lower_right or is_causal)

    if any(n == 0 for n in (B4, H, L, S, Ev)):  # (min() would compare sizes: a guard under torch.export)
        out4 = connected_zeros(query, (B4, H, L, Ev), q4, k4, v4)
        lse4 = no_key_lse(query, (B4, H, L))
        if sinks is not None:  # no key: the sink alone fills each row's denominator
            lse4 = torch.maximum(lse4, sinks.float()[None, :, None].expand_as(lse4))
    elif decode_route(q4, k4, v4, mask4, dropout_p, backend, positioned=misplaced,
                      head_vectors=(sinks, alibi_slopes)):
        out4, lse4 = _decode(q4, k4, v4, mask4, scale, is_causal, lower_right, backend,
                             (window_left, window_right), softcap, sinks, alibi_slopes)
    else:
        out4, lse4, _ = attention_fwd(q4, k4, v4, mask4, scale, is_causal, lower_right, dropout_p, op_seed(seed),
                                      backend, needs_out_lo(q4.dtype, q4, k4, v4, mask4, sinks),
                                      window_left, window_right, softcap, alibi_slopes, sinks)

    if query.dim() == 4:  # out4 / lse4 already have the caller's shape and the query's layout
        return (out4, lse4) if return_lse else out4
    # Other dims: torch returns a contiguous output (its math path), as reshape gives it here.
    out = out4.reshape(*lead, L, Ev).contiguous()
    if return_lse:
        return out, lse4.reshape(*lead, L)
    return out
