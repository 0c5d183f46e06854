"""The decode op: ``fastattn::decode_fwd``, a few new query rows per sequence against a KV cache.

Arguments follow the launcher contract of the "decode" family (kernels/decode.py, fastattn/_cpu.py: the same
function on both devices): q (B, L, H, E), k_cache / v_cache (B, S_max, Hk, E / Ev) in any strides or paged
(num_blocks, page, Hk, E / Ev) with block_table (B, max_blocks) int32, cache_seqlens (B,) int32, an optional
4-D bool / float mask broadcast through its size-1 dims. The public functions (fastattn/kvcache.py, and
scaled_dot_product_attention for short query blocks) validate every argument, the values that live in device
memory included, before calling it.

Inference only: no autograd formula is registered (the public functions refuse inputs that need a gradient).
The op allocates its output in the layout ``out_layout`` names and has the launcher write into it
(``run_decode``, which a plain eager CPU call of fastattn.attention_with_kvcache calls directly: the op's
dispatch would cost more than the kernel on a short cache):

* "bshd": (B, L, H, Ev) contiguous;
* "bhsd": (B, H, L, Ev) contiguous, returned as its (B, L, H, Ev) view;
* "sdpa": as scaled_dot_product_attention lays out its own output for the (B, H, L, E) query
  ``q.transpose(1, 2)`` (fastattn._ops.attention.empty_output), returned as its (B, L, H, Ev) view.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import _launchers
from fastattn._ops.attention import empty_output

OUT_LAYOUTS = ("bshd", "bhsd", "sdpa")


def empty_decode_output(q: Tensor, v_cache: Tensor, out_layout: str) -> Tensor:
    """The (B, L, H, Ev) output buffer of ``fastattn::decode_fwd`` in layout ``out_layout`` (module doc)."""
    B, L, H, _ = q.shape
    Ev = v_cache.shape[-1]
    if out_layout == "bshd":
        return q.new_empty(B, L, H, Ev)
    if out_layout == "bhsd":
        return q.new_empty(B, H, L, Ev).transpose(1, 2)
    if out_layout == "sdpa":
        return empty_output(q.transpose(1, 2), v_cache, 0.0).transpose(1, 2)
    raise ValueError(f"out_layout must be one of {OUT_LAYOUTS}, got {out_layout!r}")


@torch.library.custom_op("fastattn::decode_fwd", mutates_args=())
def decode_fwd(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None,
    mask: Tensor | None,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    sinks: Tensor | None,
    alibi_slopes: Tensor | None,
    num_splits: int | None,
    backend: str,
    out_layout: str,
) -> tuple[Tensor, Tensor]:
    """(out, lse): out (B, L, H, Ev) in q's dtype, laid out as ``out_layout`` says; lse (B, H, L) float32
    (natural log, sinks included; -inf for rows with no visible key and no sink)."""
    return run_decode(q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, causal, window_left, window_right,
                      softcap, sinks, alibi_slopes, num_splits, backend, out_layout)


def run_decode(q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, causal, window_left, window_right,
               softcap, sinks, alibi_slopes, num_splits, backend, out_layout):
    """The body of ``fastattn::decode_fwd`` (same arguments and result)."""
    out = empty_decode_output(q, v_cache, out_layout)
    launcher = _launchers.launcher_for("decode", backend, q.device)
    _, lse = launcher.decode_fwd(q, k_cache, v_cache, cache_seqlens, block_table=block_table, mask=mask,
                                 scale=scale, causal=causal, window=(window_left, window_right), softcap=softcap,
                                 sinks=sinks, alibi_slopes=alibi_slopes, num_splits=num_splits, out=out)
    return out, lse


@decode_fwd.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, causal, window_left, window_right, softcap,
      sinks, alibi_slopes, num_splits, backend, out_layout):
    B, L, H, _ = q.shape
    return empty_decode_output(q, v_cache, out_layout), q.new_empty(B, H, L, dtype=torch.float32)
