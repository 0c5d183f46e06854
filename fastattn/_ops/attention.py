"""The attention ops: ``fastattn::attention_fwd`` / ``fastattn::attention_bwd``, the core every dense call
runs through (scaled_dot_product_attention, attention_weights, fastattn.distributed).

``fastattn::attention_fwd`` / ``fastattn::attention_bwd`` take 4-D tensors (B, H, L, E) in any
strides and an optional 4-D mask whose size-1 dims broadcast. ``backend`` selects the launcher on
CPU tensors ("cpu": the C++ kernel; "triton": the Triton kernel under TRITON_INTERPRET=1); CUDA
tensors always run Triton (fastattn._launchers). Fake implementations let torch.compile / torch.export
trace through; the autograd formula is registered once, here.

fp16 / bf16 training (``return_lo``): the forward also returns ``out_lo``, an int16 code of the rounding
residual of its fp32 result in units of ``out``'s exponent (:func:`out_fp32` reads it back), which the backward's
delta = rowsum(dout * O) uses instead of the rounded output; saved for the backward only, never produced for
inference, float32 or float64. Why and how: docs/design/out_lo.md.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import _launchers


def empty_output(q: Tensor, v: Tensor, dropout_p: float) -> Tensor:
    """The forward's output buffer (B, H, L, Ev), laid out as torch's CPU SDPA lays out its own: like the
    query (``torch.empty_like``: a (B, L, H, E)-strided query gives a (B, L, H, Ev)-strided output, which a
    module reshapes to (B, L, H * Ev) for free) where torch's fused kernel runs (Ev == E, no dropout, unit-stride
    head dim), else contiguous (torch's math fallback). Both kernels write through the output's strides."""
    if v.shape[-1] == q.shape[-1] and dropout_p == 0.0 and q.stride(-1) == 1:
        return torch.empty_like(q)
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def causal_offset(q: Tensor, k: Tensor, lower_right: bool) -> int:
    """The kernels' causal diagonal: key j is visible to query i iff j <= i + offset; S - L aligns the query
    block with the end of the keys (lower-right), 0 with their start (top-left)."""
    return k.shape[2] - q.shape[2] if lower_right else 0


def variant_kwargs(q: Tensor, window_left: int, window_right: int, softcap: float,
                   alibi_slopes: Tensor | None, sinks: Tensor | None = None) -> dict:
    """The launchers' keyword arguments for the decoder variants that are on (none for a plain call): window
    (left, right), softcap, alibi_slopes as float32 (B, H) (a per-head (H,) tensor as a stride-0 expand), and
    sinks as float32 (H,). The backward's kernels need no sinks (the forward's lse includes them); a launcher
    that recomputes lse in more precision than the forward's float32 (the C++ float64 path) reads them."""
    kw = {}
    if (window_left, window_right) != (-1, -1):
        kw["window"] = (window_left, window_right)
    if softcap:
        kw["softcap"] = softcap
    if alibi_slopes is not None:
        a = alibi_slopes.to(torch.float32)
        kw["alibi_slopes"] = a.expand(q.shape[0], q.shape[1]) if a.dim() == 1 else a
    if sinks is not None:
        kw["sinks"] = sinks.to(torch.float32).contiguous()
    return kw


def sinks_grad(sinks: Tensor, lse: Tensor, dout: Tensor, out: Tensor, out_lo: Tensor | None) -> Tensor:
    """d loss / d sink_h = -sum_{b,i} P(sink)_bhi * delta_bhi, where P(sink) = exp(sink_h - lse_bhi) is the
    probability the sink takes in row (b, h, i) and delta = rowsum(dout * out) (out as float32, its rounding
    residual added back for fp16 / bf16 training): the sink has no value, so raising it only shrinks every other
    probability of its row in proportion. In the sinks' dtype."""
    o = out_fp32(out, out_lo) if out_lo is not None and out_lo.numel() else out.float()
    delta = (dout.float() * o).sum(-1)                                       # (B, H, L)
    p_sink = torch.exp(sinks.float()[None, :, None] - lse)                   # lse >= sink: no overflow
    return (-(p_sink * delta).sum((0, 2))).to(sinks.dtype)


LO_SHIFT = {torch.bfloat16: 22, torch.float16: 25}  # K of the out_lo code (csrc/out_lo.h, OutLoCode)


def out_fp32(out: Tensor, out_lo: Tensor) -> Tensor:
    """The forward's float32 output as the backward reads it: out + out_lo * 2^(e - K), 2^e <= |out| < 2^(e+1)
    (the exponent bits of out as a float32). For tests and for anyone checking what the backward sees."""
    o = out.float()
    pow2 = (o.view(torch.int32) & 0x7F800000).view(torch.float32)
    return o + pow2 * out_lo.float() * 2.0 ** -LO_SHIFT[out.dtype]


def no_lo(q: Tensor) -> Tensor:
    """The out_lo of a forward that was not asked for one (an empty int16 tensor)."""
    return q.new_empty(0, dtype=torch.int16)


def lo_or_none(out_lo: Tensor | None) -> Tensor | None:
    """The backward ops' out_lo argument as the launchers take it (None for none or an empty one)."""
    return out_lo if out_lo is not None and out_lo.numel() else None


@torch.library.custom_op("fastattn::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    scale: float,
    is_causal: bool,
    lower_right: bool,
    dropout_p: float,
    seed: Tensor,
    backend: str,
    return_lo: bool,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, lse, out_lo): out (B, H, L, Ev) in q's dtype, lse (B, H, L) float32 (natural log, -inf for
    fully masked rows; sinks included), out_lo int16 laid out as out when ``return_lo`` (float16 / bfloat16
    only; see the module doc), else empty. ``seed``: int64 scalar tensor on the CPU (Philox key; ignored if
    dropout_p == 0). ``lower_right``: query row i sits at position i' = i + S - L (else i' = i): with
    ``is_causal`` key j is visible iff j <= i'. The decoder variants (fastattn.reference's
    scaled_dot_product_attention states them): sliding window (window_left, window_right) around i' (-1:
    unbounded), ``softcap`` (0: off), ``alibi_slopes`` (H,) or (B, H), ``sinks`` (H,)."""
    launcher = _launchers.launcher_for("attention", backend, q.device)
    res = launcher.attention_fwd(q, k, v, mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
                                 seed=int(seed.item()), return_lo=return_lo,
                                 causal_offset=causal_offset(q, k, lower_right),
                                 **variant_kwargs(q, window_left, window_right, softcap, alibi_slopes, sinks))
    return res if return_lo else (*res, no_lo(q))


@attention_fwd.register_fake
def _(q, k, v, mask, scale, is_causal, lower_right, dropout_p, seed, backend, return_lo, window_left=-1,
      window_right=-1, softcap=0.0, alibi_slopes=None, sinks=None):
    B, H, L, _ = q.shape
    out = empty_output(q, v, dropout_p)
    lo = torch.empty_like(out, dtype=torch.int16) if return_lo else no_lo(q)
    return out, q.new_empty(B, H, L, dtype=torch.float32), lo


def _fold_vmap_dim(t: Tensor | None, bdim: int | None, n: int, broadcast: bool = False) -> Tensor | None:
    """A 4-D op argument under vmap (its vmapped dim ``bdim`` of size n, or None) as one 4-D tensor whose batch
    dim holds the n calls one after the other: (n * B, ...). ``broadcast``: an unbatched size-1 batch dim stays
    1 (masks broadcast through it)."""
    if t is None:
        return None
    if bdim is None:
        if broadcast and t.shape[0] == 1:
            return t
        t = t.expand(n, *t.shape)
    else:
        t = t.movedim(bdim, 0)
    return t.reshape(n * t.shape[1], *t.shape[2:])


@attention_fwd.register_vmap
def _(info, in_dims, q, k, v, mask, scale, is_causal, lower_right, dropout_p, seed, backend, return_lo,
      window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, sinks=None):
    # torch.func.vmap: the mapped calls become more batch items of one call (every item is independent).
    in_dims = tuple(in_dims) + (None,) * (16 - len(in_dims))  # the defaulted arguments the caller left out
    if in_dims[8] is not None:
        raise ValueError("fastattn.scaled_dot_product_attention under vmap: the dropout seed cannot be vmapped")
    if in_dims[15] is not None:
        raise ValueError("fastattn.scaled_dot_product_attention under vmap: sinks cannot be vmapped")
    n = info.batch_size
    q4, k4, v4 = (_fold_vmap_dim(t, d, n) for t, d in zip((q, k, v), in_dims[:3]))
    m4 = _fold_vmap_dim(mask, in_dims[3], n, broadcast=True)
    if alibi_slopes is not None and (in_dims[14] is not None or alibi_slopes.dim() == 2):
        # Per-call slopes (n, H) / (n, B, H), or unbatched (B, H): one (n * B, H) row per folded batch item.
        B = q4.shape[0] // n
        a = alibi_slopes.movedim(in_dims[14], 0) if in_dims[14] is not None else alibi_slopes.expand(n, B, -1)
        alibi_slopes = (a[:, None, :] if a.dim() == 2 else a).expand(n, B, a.shape[-1]).reshape(n * B, -1)
    out, lse, lo = attention_fwd(q4, k4, v4, m4, scale, is_causal, lower_right, dropout_p, seed, backend, return_lo,
                                 window_left, window_right, softcap, alibi_slopes, sinks)
    unfold = (lambda t: t.reshape(n, -1, *t.shape[1:]))
    return (unfold(out), unfold(lse), unfold(lo) if return_lo else lo), (0, 0, 0 if return_lo else None)


@torch.library.custom_op("fastattn::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    out_lo: Tensor | None,
    mask: Tensor | None,
    scale: float,
    is_causal: bool,
    lower_right: bool,
    dropout_p: float,
    seed: Tensor,
    backend: str,
    mask_needs_grad: bool,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask); dmask has the mask's 4-D shape when ``mask_needs_grad`` else is empty.
    ``out_lo``: the forward's (``return_lo``), or None (or empty): delta then comes from out alone. The
    variants as the forward took them (``lse`` includes the sinks; their own gradient is ``sinks_grad``)."""
    launcher = _launchers.launcher_for("attention", backend, q.device)
    dq, dk, dv, dmask = launcher.attention_bwd(
        dout, q, k, v, out, lse, mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
        seed=int(seed.item()), mask_needs_grad=mask_needs_grad, out_lo=lo_or_none(out_lo),
        causal_offset=causal_offset(q, k, lower_right),
        **variant_kwargs(q, window_left, window_right, softcap, alibi_slopes, sinks))
    if dmask is None:
        dmask = q.new_empty(0)
    return contiguous_grad(dq), contiguous_grad(dk), contiguous_grad(dv), dmask


def contiguous_grad(t: Tensor) -> Tensor:
    """A gradient as the backward ops return it: contiguous on both devices (the fake impls promise it)."""
    return t if t.is_contiguous() else t.contiguous()


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, out_lo, mask, scale, is_causal, lower_right, dropout_p, seed, backend,
      mask_needs_grad, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, sinks=None):
    dmask = torch.empty_like(mask, memory_format=torch.contiguous_format) if mask_needs_grad else q.new_empty(0)
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device), dmask)


def _setup_context(ctx, inputs, output):
    (q, k, v, mask, scale, is_causal, lower_right, dropout_p, seed, backend, return_lo, window_left, window_right,
     softcap, alibi_slopes, sinks) = inputs
    out, lse, out_lo = output
    ctx.save_for_backward(q, k, v, out, lse, out_lo if return_lo else None, mask, seed, alibi_slopes, sinks)
    ctx.params = (scale, is_causal, lower_right, dropout_p, backend, window_left, window_right, softcap)
    # lse is a by-product for merging partial results; it carries no gradient (its use in a loss
    # would need d lse / d s = P, which the kernels do not fold in). out_lo is the backward's own.
    ctx.mark_non_differentiable(lse, out_lo)


def _backward(ctx, dout, _dlse, _dlo):
    q, k, v, out, lse, out_lo, mask, seed, alibi_slopes, sinks = ctx.saved_tensors
    scale, is_causal, lower_right, dropout_p, backend, window_left, window_right, softcap = ctx.params
    mask_needs_grad = mask is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = attention_bwd(dout, q, k, v, out, lse, out_lo, mask, scale, is_causal, lower_right,
                                      dropout_p, seed, backend, mask_needs_grad, window_left, window_right, softcap,
                                      alibi_slopes, sinks)
    dsinks = None
    if sinks is not None and ctx.needs_input_grad[15]:
        dsinks = sinks_grad(sinks, lse, dout, out, out_lo)
    return (dq, dk, dv, (dmask if mask_needs_grad else None), None, None, None, None, None, None, None,
            None, None, None, None, dsinks)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
