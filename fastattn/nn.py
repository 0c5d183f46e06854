"""Drop-in modules: ``fastattn.nn.MultiheadAttention`` for ``torch.nn.MultiheadAttention``.

It *is* a ``torch.nn.MultiheadAttention`` (a subclass: same constructor, same parameters, same
``state_dict``), whose forward runs fastattn's fused kernels instead of torch's eager / fused paths:

* the output always comes from the fused forward (masks passed as one broadcast mask, never expanded to
  (N * num_heads, L, S) as torch does; padded keys are skipped by the kernels);
* with ``need_weights=True`` the weights come from :func:`fastattn.attention_weights` (the kernels'
  log-sum-exp, then the probabilities written once), not from a second eager attention.

Swap the modules of an existing model in place with :func:`convert`.

Shape legend: N batch, L target (query) length, S source (key) length, E embed_dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn import weights as _weights

__all__ = ["MultiheadAttention", "convert"]


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` computed by fastattn kernels.

    Same constructor (embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
    kdim=None, vdim=None, batch_first=False, device=None, dtype=None) and forward (query, key, value,
    key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False)
    as torch's, with torch's mask conventions: a bool ``key_padding_mask`` (N, S) or ``attn_mask`` (L, S) /
    (N * num_heads, L, S) is True where attention is NOT allowed; float masks are added to the scores.
    ``is_causal`` is torch's hint that ``attn_mask`` is the causal mask (``attn_mask`` is required).

    Differences from torch: a query row with every key masked gives zeros (torch 2.13 gives NaN with
    ``need_weights=True`` and on its fused inference path, zeros when it runs SDPA on the CPU); dropout
    draws fastattn's Philox mask (reproducible with ``torch.manual_seed``), not torch's.
    Nested-tensor inputs and devices fastattn has no kernel for run torch's implementation.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if (query.is_nested or key.is_nested or value.is_nested
                or query.device.type not in ("cpu", "cuda")):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if self._qkv_same_embed_dim and key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if key.shape[:-1] != value.shape[:-1]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:-1]} do not match value's "
                                 f"{value.shape[:-1]}")
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and m.dtype != torch.bool and not torch.is_floating_point(m):
                raise TypeError(f"only bool and floating types of {name} are supported, got {m.dtype}")

        shared = (query is key, key is value)  # self- / encoder-decoder attention: fewer projections
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        seq_first = not (is_batched and self.batch_first)  # torch's (L, N, E) layout
        E = query.shape[-1]
        if E != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {E}")
        H, D = self.num_heads, self.head_dim

        # Project in the input's own layout, then view the results batch-major (N, L, E): the per-head
        # views below are strided views the kernels read in place (no .contiguous() copies).
        q, k, v = self._in_projection(query, key, value, *shared)
        if seq_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        N, L, _ = q.shape
        S_in = k.shape[1]
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], dim=1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, 1, E)], dim=1)
            v = torch.cat([v, v.new_zeros(N, 1, E)], dim=1)
        S = k.shape[1]
        extra = S - S_in  # appended bias / zero keys: every query may attend to them

        use_causal = is_causal and key_padding_mask is None and not need_weights
        mask = self._merged_mask(None if use_causal else attn_mask, key_padding_mask, N, L, S, extra, q.dtype)

        qh = q.view(N, L, H, D).transpose(1, 2)  # (N, H, L, D)
        kh = k.view(N, S, H, D).transpose(1, 2)
        vh = v.view(N, S, H, D).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        out, seed = _weights.draw_seed_and_attend(qh, kh, vh, mask, dropout_p, use_causal, None, False, None,
                                                  need_seed=need_weights)
        # The kernels write (N, L, H, D) memory: (N, L, E) is a free view.
        out = F.linear(out.transpose(1, 2).reshape(N, L, E), self.out_proj.weight, self.out_proj.bias)

        attn = None
        if need_weights:
            attn = _weights.attention_weights(qh, kh, mask)
            if seed is not None:
                attn = _weights.apply_dropout(attn, dropout_p, seed)
            if average_attn_weights:
                attn = attn.mean(dim=1)
            if not is_batched:
                attn = attn.squeeze(0)
        if seq_first:
            out = out.transpose(0, 1).contiguous()
        if not is_batched:
            out = out.squeeze(1)
        return out, attn

    # ------------------------------------------------------------------------------------- helpers
    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor, q_is_k: bool,
                       k_is_v: bool) -> tuple[Tensor, Tensor, Tensor]:
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            w, b = self.in_proj_weight, self.in_proj_bias
            if q_is_k and k_is_v:  # self-attention: one matmul, q/k/v are column slices
                qkv = F.linear(query, w, b)
                return qkv[..., :E], qkv[..., E:2 * E], qkv[..., 2 * E:]
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            wq, wk, wv = w.chunk(3)
            q = F.linear(query, wq, bq)
            if k_is_v:  # encoder-decoder attention: k and v in one matmul
                kv = F.linear(key, torch.cat([wk, wv]), None if b is None else torch.cat([bk, bv]))
                return q, kv[..., :E], kv[..., E:]
            return q, F.linear(key, wk, bk), F.linear(value, wv, bv)
        bq, bk, bv = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                F.linear(value, self.v_proj_weight, bv))

    def _merged_mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, N: int, L: int, S: int,
                     extra: int, dtype: torch.dtype) -> Tensor | None:
        """One mask broadcastable to (N, H, L, S) in fastattn's convention (bool True = attend, or
        additive float), from torch's (bool True = masked). Size-1 dims stay size 1 (no expansion)."""
        H = self.num_heads
        parts = []
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (L, S - extra):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(L, S - extra)}.")
                am = attn_mask.reshape(1, 1, L, S - extra)
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (N * H, L, S - extra):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(N * H, L, S - extra)}.")
                am = attn_mask.reshape(N, H, L, S - extra)
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
            parts.append(am)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (N, S - extra):
                raise AssertionError(f"expecting key_padding_mask shape of {(N, S - extra)}, but got "
                                     f"{tuple(key_padding_mask.shape)}")
            parts.append(key_padding_mask.reshape(N, 1, 1, S - extra))
        if not parts:
            return None
        if all(m.dtype == torch.bool for m in parts):
            hidden = parts[0] if len(parts) == 1 else parts[0] | parts[1]
            keep = ~hidden
            if extra:
                keep = F.pad(keep, (0, extra), value=True)
            return keep
        additive = None
        for m in parts:
            f = (torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
                 if m.dtype == torch.bool else m.to(dtype))
            additive = f if additive is None else additive + f
        if extra:
            additive = F.pad(additive, (0, extra), value=0.0)
        return additive


def convert(module: torch.nn.Module) -> torch.nn.Module:
    """Make every ``torch.nn.MultiheadAttention`` inside ``module`` (itself included) a
    ``fastattn.nn.MultiheadAttention``, in place (parameters, buffers and hooks kept), and return ``module``.

    ``nn.TransformerEncoderLayer`` has a fused inference fast path that bypasses its attention module's
    forward; turn it off with ``torch.backends.mha.set_fastpath_enabled(False)`` (``fastattn.patch`` does).
    """
    for m in module.modules():
        if type(m) is torch.nn.MultiheadAttention:
            m.__class__ = MultiheadAttention
    return module


# The other attention layers, defined next to their operations and re-exported here.
from fastattn.additive import AdditiveAttention  # noqa: E402,F401
from fastattn.layers import *  # noqa: E402,F401,F403  (Multiplicative/Hierarchical/CoAttention)
from fastattn import layers as _layers  # noqa: E402

__all__ += ["AdditiveAttention", *_layers.__all__]
