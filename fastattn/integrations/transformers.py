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
  the kernels skip the padded key blocks. Every other pattern (causal, sliding window, packed
  sequences, ...) uses transformers' boolean SDPA mask, which fastattn reads as is.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import weights as _weights

__all__ = ["register", "attention_forward", "attention_mask", "NAME"]

NAME = "fastattn"


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


def _make_attention_forward(backend: str | None):
    def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, position_bias: Tensor | None = None,
                          **kwargs) -> tuple[Tensor, Tensor | None]:
        """query (B, H, L, E), key/value (B, Hk, S, E/Ev) -> ((B, L, H, Ev), weights (B, H, L, S) or None)."""
        if kwargs.get("softcap") is not None:
            raise ValueError("fastattn attention does not support `softcap`; use attn_implementation='eager'")
        if kwargs.get("s_aux") is not None:
            raise ValueError("fastattn attention does not support attention sinks (`s_aux`); use 'eager'")
        if kwargs.get("cache") is not None:
            raise ValueError("fastattn attention does not support paged caches; use 'sdpa' or 'eager'")
        q_length, kv_length = query.shape[2], key.shape[2]
        enable_gqa = query.shape[1] != key.shape[1]  # the kernels read key head h // (H // Hk): no repeat_kv
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

        config = getattr(module, "config", None)
        need_weights = bool(kwargs.get("output_attentions", getattr(config, "output_attentions", False)))
        out, seed = _weights.draw_seed_and_attend(query, key, value, attention_mask, float(dropout), is_causal,
                                                  scaling, enable_gqa, backend, need_seed=need_weights)
        weights = None
        if need_weights:
            weights = _weights.attention_weights(query, key, attention_mask, is_causal, scaling, enable_gqa,
                                                 backend=backend)
            if seed is not None:
                weights = _weights.apply_dropout(weights, float(dropout), seed)
        # The output follows the query's layout; transformers' projections give (B, L, H, E)-strided queries,
        # so this transpose is usually already contiguous (no copy).
        return out.transpose(1, 2).contiguous(), weights

    return attention_forward


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
