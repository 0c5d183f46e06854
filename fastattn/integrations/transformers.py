"""HuggingFace transformers: ``attn_implementation="fastattn"``.

    import fastattn.integrations.transformers as fa_hf
    fa_hf.register()
    model = BertModel.from_pretrained(path, attn_implementation="fastattn")

``register`` adds two entries, under the same name (transformers >= 5 looks both up by it):

* an attention function (``AttentionInterface``): the fused kernels for the output, GQA without repeating
  key/value heads, attention dropout inside the kernel in training mode, and real attention weights for
  ``output_attentions=True`` (from :func:`fastattn.attention_weights`; in training mode with the same
  dropout mask the output used, as the eager implementation returns);
* a mask function (``AttentionMaskInterface``). A custom attention function registered alone receives
  no mask at all (transformers skips mask creation for names it has no mask function for), so padded
  batches would attend to padding. For encoders (bidirectional attention with padding) the mask is the
  2-D padding mask viewed as (B, 1, L, S) with stride 0 along L: nothing (B, L, S)-sized is built, and
  the kernels skip the padded key blocks. Causal and sliding-window-causal decoders get no (L, S) mask
  either (the rule below). Every other pattern (packed sequences, chunked attention, custom mask
  functions, ...) uses transformers' boolean SDPA mask, which fastattn reads as is.

Decoder variants: the attention function passes Gemma 2/3's ``softcap`` and gpt-oss's attention sinks
(``s_aux``, the learned (H,) ``module.sinks``; differentiable, so training reaches it) to the kernels, and
runs causal / sliding-window patterns in the kernels' causal and window modes. The window comes from the mask
(below), as eager and sdpa read it: the models' ``sliding_window`` keyword (Mistral, Phi-3: the config's for
every layer; Qwen3, Gemma 2/3, gpt-oss: the config's for sliding layers, None for full ones) is the same
``w`` that ``create_sliding_window_causal_mask`` builds the layer's mask with, and is read only on the packed
path below (as flash-attention reads it).

The compact causal rule. transformers describes a mask by a mask function of absolute positions: query row
i sits at ``q_offset + i``, key column j at ``kv_offset + j``, and ``sdpa_mask`` evaluates
``mask_function(b, h, q_offset + i, kv_offset + j) & padding[b, kv_offset + j]`` (the 2-D ``attention_mask``
padded with False up to ``kv_offset + S``). For exactly two mask functions, transformers'
``causal_mask_function`` (key visible iff ``kv_idx <= q_idx``) and ``sliding_window_causal_mask_function(w)``
(also ``kv_idx > q_idx - w``; recognised by its code objects, with ``w == local_size``), this depends on the
offsets only through ``d = q_offset - kv_offset``: key j visible iff ``j <= i + d`` (and ``j >= i + d - (w - 1)``).
fastattn's kernels place row i at ``i' = i`` (top-left) or ``i' = i + S - L`` (lower-right), so when
``d == 0`` or ``d == S - L`` the pattern is exactly ``is_causal`` with that alignment and ``window=(w - 1, 0)``,
whatever the cache holds (a sliding cache that dropped old keys has ``kv_offset > 0`` and still ``d = S - L``).
The mask function then returns the key-padding view ``padding[b, kv_offset + j]`` as a (B, 1, L, S) bool tensor
with stride 0 along heads and L (all True when there is no padding), tagged with the pattern (a
``_CausalPattern`` attribute read by the attention function); or None where ``sdpa_mask`` itself would
return None (then the attention function behaves exactly as transformers' sdpa does). Anything else falls
back to ``sdpa_mask``: any other mask function (packed sequences remap positions, chunked or blockwise
overlays, or_/and_mask_function overlays, vmap-built masks), any other ``d``, offsets that are traced tensors,
a 2-D mask that is not a plain (B, >= kv_offset) tensor, and torch.compile tracing (no tensor attributes there).
A (B, 1, L, S) bool mask with stride 0 along heads and L that has lost its tag (model code that derived a new
tensor from it) raises instead of being read as a padding-only mask.

Packed (padding-free) inputs: where transformers passes sequence boundaries to the attention function
(``cu_seq_lens_q`` / ``cu_seq_lens_k``, optionally ``max_length_q`` / ``max_length_k``: the keywords of its
flash-attention path, e.g. from ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``), the
attention function runs :func:`fastattn.varlen_attention` on the (1, total) batch: each sequence attends to
its own tokens, causal within each sequence when the module is causal, a ``sliding_window`` keyword as
flash-attention reads it (key j visible to query i iff |i - j| < sliding_window). As in transformers'
flash-attention path, the mask argument is then not read (the boundaries replace it).

:func:`packed` makes a whole BERT-family encoder run on the real tokens only (padded batch in, padded
outputs back; ``fastattn.integrations.packed``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import weights as _weights

__all__ = ["register", "register_packed", "attention_forward", "attention_mask", "packed", "unpacked", "NAME",
           "PACKED_NAME"]

NAME = "fastattn"
PACKED_NAME = "fastattn_packed"  # see fastattn.integrations.packed


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   mask_function=None, attention_mask: Tensor | None = None, local_size: int | None = None,
                   allow_is_causal_skip: bool = True, allow_is_bidirectional_skip: bool = False,
                   use_vmap: bool = False, device="cpu", **kwargs) -> Tensor | None:
    """transformers mask function for fastattn: bool (B, 1, L, S), True = attend, or None (no mask)."""
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                local_size=local_size, allow_is_causal_skip=allow_is_causal_skip,
                allow_is_bidirectional_skip=allow_is_bidirectional_skip, use_vmap=use_vmap, device=device)
    compact = _compact_causal_mask(mu, batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                                   attention_mask, local_size, allow_is_causal_skip, use_vmap, device)
    if compact is not _FALLBACK:
        return compact
    helpers = ("bidirectional_mask_function", "prepare_padding_mask", "_ignore_bidirectional_mask_sdpa")
    padding_only = (all(hasattr(mu, h) for h in helpers) and mask_function is mu.bidirectional_mask_function
                    and not use_vmap and attention_mask is not None and attention_mask.dim() == 2
                    and isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == 0 and kv_offset == 0)
    if not padding_only:
        return mu.sdpa_mask(**args, **kwargs)
    padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if allow_is_bidirectional_skip and mu._ignore_bidirectional_mask_sdpa(padding, kv_length, local_size):
        return None
    padding = padding[:, :kv_length].to(device=device, dtype=torch.bool)
    return padding[:, None, None, :].expand(batch_size, 1, q_length, kv_length)


_FALLBACK = object()  # _compact_causal_mask's "use sdpa_mask" answer (None is a valid mask: no mask)
_PATTERN_ATTR = "_fastattn_causal_pattern"


class _CausalPattern:
    """What a compact causal mask stands for (module doc): causal with top-left (``lower_right=False``) or
    lower-right alignment, a left window of ``window_left`` keys (-1: none), and whether the tagged (B, 1, L, S)
    view holds any padding (False: every key is real and the attention function passes no mask at all)."""
    __slots__ = ("lower_right", "window_left", "padding")

    def __init__(self, lower_right: bool, window_left: int, padding: bool):
        self.lower_right, self.window_left, self.padding = lower_right, window_left, padding

    def __repr__(self):
        return (f"_CausalPattern(lower_right={self.lower_right}, window_left={self.window_left}, "
                f"padding={self.padding})")


def _closure(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


def _window_left(mu, mask_function, local_size) -> int | None:
    """-1 for ``causal_mask_function``, ``w - 1`` for ``sliding_window_causal_mask_function(w)`` with
    ``local_size == w``, None for any other mask function. The sliding one is ``and_masks(overlay(w), causal)``:
    a closure, recognised by the code objects transformers shares between all its instances and by its cells."""
    if mask_function is mu.causal_mask_function:
        return -1 if local_size is None else None
    try:
        if mask_function.__code__ is not mu.and_masks(mu.causal_mask_function).__code__:
            return None
        parts = _closure(mask_function).get("mask_functions")
        if not (isinstance(parts, tuple) and len(parts) == 2 and parts[1] is mu.causal_mask_function):
            return None
        overlay = parts[0]
        if getattr(overlay, "__code__", None) is not mu.sliding_window_overlay(1).__code__:
            return None
        w = _closure(overlay).get("sliding_window")
    except (AttributeError, TypeError, ValueError):
        return None
    if type(w) is not int or w < 1 or local_size != w:
        return None
    return w - 1


def _as_int(offset) -> int | None:
    if isinstance(offset, int):
        return offset
    if isinstance(offset, Tensor) and offset.numel() == 1 and not offset.is_floating_point():
        return int(offset)
    return None


def _compact_causal_mask(mu, batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                         attention_mask, local_size, allow_is_causal_skip, use_vmap, device):
    """The compact mask of the module doc's rule: a tagged (B, 1, L, S) key-padding view, None, or _FALLBACK."""
    if use_vmap or torch.compiler.is_compiling() or not all(
            hasattr(mu, h) for h in ("and_masks", "sliding_window_overlay", "prepare_padding_mask",
                                     "_ignore_causal_mask_sdpa")):
        return _FALLBACK
    window_left = _window_left(mu, mask_function, local_size)
    if window_left is None:
        return _FALLBACK
    if attention_mask is not None and not (isinstance(attention_mask, Tensor) and attention_mask.dim() == 2
                                           and attention_mask.shape[0] == batch_size):
        return _FALLBACK
    q_off, kv_off = _as_int(q_offset), _as_int(kv_offset)
    if q_off is None or kv_off is None or kv_off < 0:
        return _FALLBACK
    d = q_off - kv_off
    if d == kv_length - q_length:
        lower_right = kv_length != q_length
    elif d == 0:
        lower_right = False
    else:
        return _FALLBACK
    padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_off)
    if allow_is_causal_skip and mu._ignore_causal_mask_sdpa(padding, q_length, kv_length, q_offset, kv_offset,
                                                             local_size):
        return None
    shape = (batch_size, 1, q_length, kv_length)
    if padding is None:
        view = torch.ones((), dtype=torch.bool, device=device).expand(shape)
        has_padding = False
    else:
        padding = padding[:, kv_off:kv_off + kv_length].to(device=device, dtype=torch.bool)
        has_padding = not bool(padding.all())
        view = padding.as_strided(shape, (padding.stride(0), 0, 0, padding.stride(1)))
    setattr(view, _PATTERN_ATTR, _CausalPattern(lower_right, window_left, has_padding))
    return view


def _pattern_dense(mask: Tensor, pattern: _CausalPattern) -> Tensor:
    """The (B, 1, L, S) bool mask a compact mask stands for, built for the attention weights only."""
    L, S = mask.shape[-2], mask.shape[-1]
    i = torch.arange(L, device=mask.device)[:, None] + (S - L if pattern.lower_right else 0)
    j = torch.arange(S, device=mask.device)[None, :]
    keep = j <= i
    if pattern.window_left >= 0:
        keep = keep & (j >= i - pattern.window_left)
    return mask & keep


def _check_untagged(mask: Tensor | None) -> None:
    """A bool (B, 1, L, S) mask with stride 0 along heads and L is what the compact rule returns; without its tag
    it would be read as padding only (no causal pattern), so refuse it (module doc)."""
    if (isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1
            and mask.shape[2] > 1 and mask.stride(1) == 0 and mask.stride(2) == 0
            and getattr(mask, _PATTERN_ATTR, None) is None):
        raise RuntimeError(
            "fastattn attention got a (B, 1, L, S) bool mask with stride 0 along heads and queries but without "
            "the causal pattern fastattn's mask function tags such masks with: model code derived a new tensor "
            "from fastattn's compact causal mask, which would lose its causal / sliding-window pattern. Use "
            "attn_implementation='sdpa', or pass the mask through unchanged")


def _band_mask(sliding_window, max_q: int, max_k: int, device) -> Tensor | None:
    """Flash-attention's reading of ``sliding_window`` w: key j visible to query i iff |i - j| <= w - 1, and
    no band at all when no key is that far (max_k <= w). Bool (1, 1, max_q, max_k), True = attend; varlen
    reads its top-left corner for each sequence, so positions are local to the sequence."""
    if sliding_window is None or max_k <= int(sliding_window):
        return None
    i = torch.arange(max_q, device=device)[:, None]
    j = torch.arange(max_k, device=device)[None, :]
    return ((i - j).abs() <= int(sliding_window) - 1)[None, None]


def _varlen_attention_forward(query: Tensor, key: Tensor, value: Tensor, dropout: float, scaling: float | None,
                              is_causal: bool, need_weights: bool, backend: str | None,
                              kwargs: dict) -> tuple[Tensor, Tensor | None]:
    """Packed batch: query (B, H, L, E), key/value (B, Hk, S, E/Ev), whose B*L (B*S) tokens are the
    sequences that cu_seq_lens_q (cu_seq_lens_k) delimit -> ((B, L, H, Ev), weights or None). Weights are
    per sequence, padded: (n, H, max_length_q, max_length_k) for n sequences, zero outside each sequence."""
    from fastattn import varlen as _varlen

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None:
        raise ValueError("packed attention needs both cu_seq_lens_q and cu_seq_lens_k, got "
                         f"cu_seq_lens_q={'None' if cu_q is None else 'a tensor'}, "
                         f"cu_seq_lens_k={'None' if cu_k is None else 'a tensor'}")
    for name, cu in (("cu_seq_lens_q", cu_q), ("cu_seq_lens_k", cu_k)):
        if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype.is_floating_point:
            raise TypeError(f"{name} must be a 1-D integer tensor of cumulative lengths")
    cu_q, cu_k = cu_q.to(query.device, torch.int32), cu_k.to(query.device, torch.int32)
    B, H, L, E = query.shape
    Hk, S, Ev = key.shape[1], key.shape[2], value.shape[-1]
    q = query.transpose(1, 2).reshape(B * L, H, E)  # a view for the (B, L, H, E)-strided projections
    k = key.transpose(1, 2).reshape(B * S, Hk, E)
    v = value.transpose(1, 2).reshape(B * S, Hk, Ev)
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    max_q = int((cu_q[1:] - cu_q[:-1]).max()) if max_q is None and cu_q.numel() > 1 else int(max_q or 0)
    max_k = int((cu_k[1:] - cu_k[:-1]).max()) if max_k is None and cu_k.numel() > 1 else int(max_k or 0)
    if is_causal and cu_q is not cu_k and not torch.equal(cu_q, cu_k):
        raise ValueError("fastattn packed attention: is_causal with query and key sequences of different "
                         "lengths (a key/value cache) is not supported; causal attention is top-left aligned "
                         "within each sequence")
    band = _band_mask(kwargs.get("sliding_window"), max_q, max_k, query.device)
    enable_gqa = H != Hk
    seed = None
    if need_weights and dropout > 0.0:
        # varlen_attention draws its Philox seed from the default generator: replay that draw.
        g = torch.Generator()
        g.set_state(torch.get_rng_state())
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=g))
    out = _varlen.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, attn_mask=band, dropout_p=float(dropout),
                                   is_causal=is_causal, scale=scaling, enable_gqa=enable_gqa, backend=backend)
    out = out.reshape(B, L, H, Ev)
    weights = None
    if need_weights:
        n = cu_q.numel() - 1
        len_q, len_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
        idx_q, idx_k = _local_indices(cu_q, max_q), _local_indices(cu_k, max_k)
        qp = _varlen.pad(q, idx_q, n, max_q).transpose(1, 2)  # (n, H, max_q, E)
        kp = _varlen.pad(k, idx_k, n, max_k).transpose(1, 2)
        keep = (torch.arange(max_k, device=q.device)[None, :] < len_k[:, None])[:, None, None, :]
        if band is not None:
            keep = keep & band
        weights = _weights.attention_weights(qp, kp, keep, is_causal, scaling, enable_gqa, backend=backend)
        rows = (torch.arange(max_q, device=q.device)[None, :] < len_q[:, None])[:, None, :, None]
        weights = weights * rows
        if seed is not None:
            weights = _weights.apply_dropout(weights, float(dropout), seed)
    return out, weights


def _local_indices(cu: Tensor, max_len: int) -> Tensor:
    """For packed token t of sequence b: b * max_len + (t - cu[b]), its index in the (n, max_len) padded
    layout (what :func:`fastattn.pad` takes)."""
    n = cu.numel() - 1
    lens = (cu[1:] - cu[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(n, device=cu.device), lens)
    t = torch.arange(int(cu[-1]) if n else 0, device=cu.device)
    return seq * max_len + (t - cu.long()[seq])


def _make_attention_forward(backend: str | None, packed_only: bool = False):
    def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, position_bias: Tensor | None = None,
                          **kwargs) -> tuple[Tensor, Tensor | None]:
        """query (B, H, L, E), key/value (B, Hk, S, E/Ev) -> ((B, L, H, Ev), weights (B, H, L, S) or None)."""
        softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
        if kwargs.get("cache") is not None:
            raise ValueError("fastattn attention does not support paged caches; use 'sdpa' or 'eager'")
        config = getattr(module, "config", None)
        need_weights = bool(kwargs.get("output_attentions", getattr(config, "output_attentions", False)))
        if need_weights and (softcap is not None or sinks is not None):
            raise ValueError("fastattn attention returns no attention weights with softcap or attention sinks "
                             "(output_attentions=True); use attn_implementation='eager'")
        if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
            if softcap is not None or sinks is not None:
                raise ValueError("fastattn packed attention does not support softcap or attention sinks (s_aux); "
                                 "use a padded batch")
            if position_bias is not None:
                raise ValueError("fastattn packed attention does not support a position bias")
            causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
            return _varlen_attention_forward(query, key, value, float(dropout), scaling, causal, need_weights,
                                             backend, kwargs)
        if packed_only:
            raise ValueError(f"attn_implementation={PACKED_NAME!r} runs packed batches only (sequence boundaries "
                             "in cu_seq_lens_q / cu_seq_lens_k), as a model prepared by "
                             "fastattn.integrations.transformers.packed(model) passes them; this call had none. "
                             "Call the packed model itself, or unpacked(model) to go back to padded batches")
        q_length, kv_length = query.shape[2], key.shape[2]
        enable_gqa = query.shape[1] != key.shape[1]  # the kernels read key head h // (H // Hk): no repeat_kv
        pattern = getattr(attention_mask, _PATTERN_ATTR, None) if attention_mask is not None else None
        if pattern is not None and position_bias is not None:  # a bias needs the dense mask it is added to
            attention_mask, pattern = _pattern_dense(attention_mask, pattern), None
        if pattern is not None:
            return _compact_causal_forward(query, key, value, attention_mask, pattern, float(dropout), scaling,
                                           enable_gqa, softcap, sinks, need_weights, backend)
        _check_untagged(attention_mask)
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        # As transformers' sdpa: the causal flag only when no mask was materialised (the shape test first
        # keeps it a plain bool under torch.compile).
        is_causal = bool(q_length > 1) and attention_mask is None and bool(is_causal)
        if is_causal and kv_length > q_length:  # prefill into an empty static cache: drop the unused keys
            key, value = key[:, :, :q_length], value[:, :, :q_length]
            if position_bias is not None:
                position_bias = position_bias[..., :q_length]
        if position_bias is not None:
            from transformers.integrations.sdpa_attention import create_position_bias_mask
            attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
            is_causal = False
        if (attention_mask is not None and attention_mask.dtype != torch.bool
                and attention_mask.dtype not in (query.dtype, torch.float32)):
            attention_mask = attention_mask.to(query.dtype)

        return _attend(query, key, value, attention_mask, float(dropout), is_causal, scaling, enable_gqa, backend,
                       need_weights, softcap=softcap, sinks=sinks)

    return attention_forward


def _compact_causal_forward(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, pattern: _CausalPattern,
                            dropout: float, scaling: float | None, enable_gqa: bool, softcap, sinks,
                            need_weights: bool, backend: str | None) -> tuple[Tensor, Tensor | None]:
    """A compact causal mask (module doc): the kernels' causal mode with the pattern's alignment and window,
    and the key-padding view as the mask (none when nothing is padded)."""
    q_length, kv_length = query.shape[2], key.shape[2]
    if mask.shape[-2:] != (q_length, kv_length):
        raise ValueError(f"fastattn attention: the mask covers {tuple(mask.shape[-2:])} (queries, keys) but the "
                         f"call has {q_length} queries and {kv_length} keys")
    if not pattern.lower_right and kv_length > q_length:
        # Top-left causal: key j is visible only to rows i >= j, so keys j >= L (a static cache's empty slots
        # at prefill) are never visible; drop them.
        key, value, mask = key[:, :, :q_length], value[:, :, :q_length], mask[..., :q_length]
    window = (pattern.window_left, 0) if pattern.window_left >= 0 else None
    weights_mask = _pattern_dense(mask, pattern) if need_weights else None
    return _attend(query, key, value, mask if pattern.padding else None, dropout, True, scaling, enable_gqa,
                   backend, need_weights, softcap=softcap, sinks=sinks, window=window,
                   lower_right=pattern.lower_right, weights_mask=weights_mask)


def _attend(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, dropout: float, is_causal: bool,
            scaling: float | None, enable_gqa: bool, backend: str | None, need_weights: bool, *, softcap=None,
            sinks=None, window=None, lower_right: bool = False,
            weights_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """fastattn on (B, H, L, E) inputs -> ((B, L, H, Ev), weights or None). ``weights_mask``: the dense mask the
    weights are computed with (the compact case), replacing mask and is_causal there."""
    variants = {}
    if softcap is not None:
        variants["softcap"] = float(softcap)
    if sinks is not None:
        variants["sinks"] = sinks
    if window is not None:
        variants["window"] = window
    if lower_right:
        variants["lower_right"] = True
    out, seed = _weights.draw_seed_and_attend(query, key, value, mask, dropout, is_causal, scaling, enable_gqa,
                                              backend, need_seed=need_weights, **variants)
    weights = None
    if need_weights:
        if weights_mask is not None:
            weights = _weights.attention_weights(query, key, weights_mask, False, scaling, enable_gqa,
                                                 backend=backend)
        else:
            weights = _weights.attention_weights(query, key, mask, is_causal, scaling, enable_gqa, backend=backend)
        if seed is not None:
            weights = _weights.apply_dropout(weights, dropout, seed)
    # The output follows the query's layout; transformers' projections give (B, L, H, E)-strided queries,
    # so this transpose is usually already contiguous (no copy).
    return out.transpose(1, 2).contiguous(), weights


attention_forward = _make_attention_forward(None)


def _registries():
    """transformers' AttentionInterface and AttentionMaskInterface, or an ImportError that names the real
    cause: transformers missing, too old to have them, or failing to import (a broken dependency)."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("fastattn.integrations.transformers needs transformers >= 5 "
                          f"(pip install 'transformers>=5'); importing transformers failed: {type(e).__name__}: {e}"
                          ) from e
    version = getattr(transformers, "__version__", "unknown")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = None
    if major is not None and major < 5:
        raise ImportError("fastattn.integrations.transformers needs transformers >= 5 (AttentionInterface and "
                          f"masking_utils.AttentionMaskInterface); found transformers {version}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(f"transformers {version} is installed, but importing its attention registries failed: "
                          f"{type(e).__name__}: {e}") from e
    return AttentionInterface, AttentionMaskInterface


def register(name: str = NAME, *, backend: str | None = None) -> str:
    """Register fastattn with transformers under ``name`` (attention function and mask function), so that
    ``from_pretrained(..., attn_implementation=name)`` / ``model.set_attn_implementation(name)`` use it.
    ``backend`` is passed to fastattn (None: the default per device). Idempotent; returns ``name``."""
    AttentionInterface, AttentionMaskInterface = _registries()
    fn = attention_forward if backend is None else _make_attention_forward(backend)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, attention_mask)
    return name


def register_packed(name: str = PACKED_NAME, *, backend: str | None = None) -> str:
    """Register the attention function for packed models under ``name``, with no mask function: transformers
    then builds no mask (the sequence boundaries come as ``cu_seq_lens_*``), and a call without boundaries
    raises instead of attending across padding. Used by :func:`packed`. Idempotent; returns ``name``."""
    AttentionInterface, _ = _registries()
    AttentionInterface.register(name, _make_attention_forward(backend, packed_only=True))
    return name


def packed(model, *, backend: str | None = None):
    """Make a BERT-family model compute on real tokens only; returns ``model`` (changed in place).
    See :func:`fastattn.integrations.packed.packed`."""
    from fastattn.integrations import packed as _packed
    return _packed.packed(model, backend=backend)


def unpacked(model):
    """Undo :func:`packed`; returns ``model``."""
    from fastattn.integrations import packed as _packed
    return _packed.unpacked(model)
