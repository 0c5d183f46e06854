"""All-to-all (DeepSpeed-Ulysses) attention: trade the sequence shard for a head shard, attend, trade back.

Each rank holds (B, H, L, E) for its L = N / W positions. One all-to-all per tensor turns that into
(B, H / W, N, E): all positions, for the rank's H / W heads. Attention is then an ordinary single-device
call on whole sequences (the fused kernel, any mask, causal with no load imbalance), and one more
all-to-all brings the output back to (B, H, L, Ev). The backward is the same exchanges in reverse.

Communication per call: q, k, v and out each cross the network once ((W-1)/W of each), independent of
the number of ranks, against ring attention's W-1 hops of k and v. It needs H (and, after repeating
key/value heads if necessary, Hk) divisible by W.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

import fastattn
from fastattn.distributed import _blocks, _common
from fastattn.distributed._blocks import Coords, Params


def _exchange(parts: list[Tensor], grp: _common.Group) -> list[Tensor]:
    """all_to_all_single along dim 0 (size W) of each tensor, all launched before any is awaited."""
    recvs = [torch.empty_like(p) for p in parts]
    works = [dist.all_to_all_single(r, p, group=grp.group, async_op=True) for r, p in zip(recvs, parts)]
    for w in works:
        w.wait()
    return recvs


def seq_to_heads(xs: tuple[Tensor, ...], grp: _common.Group, zigzag: bool) -> list[Tensor]:
    """(B, Hx, L, D) sequence shards -> (B, Hx / W, W * L, D): the rank's heads, all positions in global order."""
    W = grp.world
    if W == 1:
        return list(xs)  # one rank: its zig-zag shard [chunk 0, chunk 1] is already the global order
    # (W, B, Hx/W, L, D): slot p goes to rank p, which receives our positions of its heads.
    sends = [x.reshape(x.shape[0], W, x.shape[1] // W, *x.shape[2:]).transpose(0, 1).contiguous() for x in xs]
    out = []
    for r in _exchange(sends, grp):
        _, B, h, L, D = r.shape
        y = r.permute(1, 2, 0, 3, 4)  # (B, h, W, L, D): positions of rank 0, 1, ...
        if zigzag:  # rank p holds chunks p and 2W-1-p: put the 2W chunks in global order
            y = y.reshape(B, h, W, 2, L // 2, D)
            y = torch.cat([y[:, :, :, 0], y[:, :, :, 1].flip(2)], dim=2)
        out.append(y.reshape(B, h, W * L, D))
    return out


def heads_to_seq(ys: tuple[Tensor, ...], grp: _common.Group, zigzag: bool) -> list[Tensor]:
    """Inverse of :func:`seq_to_heads`: (B, h, N, D) for h heads -> (B, W * h, N / W, D) sequence shards."""
    W = grp.world
    if W == 1:
        return list(ys)
    sends = []
    for y in ys:
        B, h, N, D = y.shape
        L = N // W
        if zigzag:
            z = y.reshape(B, h, 2 * W, L // 2, D)
            z = torch.stack([z[:, :, :W], z[:, :, W:].flip(2)], dim=3)  # (B, h, W, 2, C, D)
        else:
            z = y
        sends.append(z.reshape(B, h, W, L, D).permute(2, 0, 1, 3, 4).contiguous())  # slot p -> rank p
    out = []
    for r in _exchange(sends, grp):
        W_, B, h, L, D = r.shape  # r[p]: rank p's heads at our positions
        out.append(r.transpose(0, 1).reshape(B, W_ * h, L, D))
    return out


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grp, zigzag, *xs):
        ctx.grp, ctx.zigzag = grp, zigzag
        return tuple(seq_to_heads(xs, grp, zigzag))

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *heads_to_seq(grads, ctx.grp, ctx.zigzag))


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grp, zigzag, *ys):
        ctx.grp, ctx.zigzag = grp, zigzag
        return tuple(heads_to_seq(ys, grp, zigzag))

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *seq_to_heads(grads, ctx.grp, ctx.zigzag))


class _GlobalDropoutAttention(torch.autograd.Function):
    """Whole-sequence attention of a head slice whose dropout uses the GLOBAL head index (torch path)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, params: Params, coords: Coords):
        out, lse = _blocks._torch_forward(q, k, v, mask, params, coords)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.params, ctx.coords = params, coords
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = _blocks._torch_backward(dout, q, k, v, out, lse, mask, ctx.params, ctx.coords)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def kv_head_repeat(H: int, Hk: int, world: int) -> int:
    """Smallest r dividing H / Hk with Hk * r divisible by ``world``: key/value heads are repeated r times
    so each rank gets whole key/value heads for its query heads (r = H / Hk always works as H % W == 0)."""
    g = H // Hk
    return next(r for r in range(1, g + 1) if g % r == 0 and (Hk * r) % world == 0)


def all_to_all_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    group: dist.ProcessGroup | None = None,
    is_causal: bool = False,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    *,
    enable_gqa: bool = False,
    zigzag: bool = True,
    backend: str | None = None,
) -> Tensor:
    """Attention over a sequence sharded across the ranks of ``group``, by scattering heads and gathering
    the sequence (the Ulysses layout). Same arguments, shapes and results as
    :func:`fastattn.distributed.ring_attention` (which see); additionally H must be divisible by the world
    size W. Key/value heads are repeated when Hk is not (GQA with Hk < W), which costs their all-to-all
    volume but no extra attention work.

    ``attn_mask`` is the GLOBAL mask broadcastable to (B, H, N, N); with a full head dim each rank reads
    its heads. Dropout matches the single-process op at the global (b, h, i, j) through the exact torch
    path (the kernels cannot offset their head index); without dropout the fused kernel runs.
    """
    grp = _common.process_group(group)
    _common.check_inputs("all_to_all_attention", query, key, value, attn_mask, dropout_p, is_causal, scale,
                         enable_gqa, zigzag, grp.world)
    B, H, L, _ = query.shape
    W = grp.world
    if H % W:
        raise ValueError(f"all_to_all_attention scatters heads over the {W} ranks, so the query heads ({H}) must "
                         f"be divisible by {W}; use ring_attention for this shape")
    rep = kv_head_repeat(H, key.shape[1], W)
    if rep > 1:
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    backend = _common.pick_backend(backend, query)
    params = _common.make_params(grp, query, scale, is_causal, dropout_p, backend)
    qh, kh, vh = _SeqToHeads.apply(grp, zigzag, query, key, value)
    h, n = H // W, W * L
    head0 = grp.rank * h
    mask = _common.mask_4d(attn_mask)
    if mask is not None and mask.shape[1] != 1:
        mask = mask.narrow(1, head0, h)
    if params.dropout_p == 0.0:
        out = fastattn.scaled_dot_product_attention(qh, kh, vh, mask, 0.0, is_causal, params.scale,
                                                    enable_gqa=kh.shape[1] != h, backend=backend)
    else:
        out = _GlobalDropoutAttention.apply(qh, kh, vh, mask, params, Coords(((0, n),), ((0, n),), head0))
    (out,) = _HeadsToSeq.apply(grp, zigzag, out)
    return out
