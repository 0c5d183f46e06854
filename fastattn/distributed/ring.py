"""Ring attention (context parallelism): each rank keeps its query shard, the key/value shards travel.

Forward, on every rank, for step = 0 .. W-1: start sending the key/value shard it holds to the next
rank (and receiving the previous rank's), compute its queries against the shard it holds (the block
the causal plan leaves visible, see ``_layout.block_plan``), merge the block's (out, lse) into the
running result exactly, then wait for the transfer. Communication of step s+1 overlaps the compute of
step s. W-1 transfers of the key/value shard per call.

Backward (flash-attention style): given the GLOBAL out and lse, each block's gradient is exact on its
own. The key/value shards rotate again; the dk/dv accumulator of a shard travels one hop behind it,
each rank adding its block's contribution before passing it on, so after W hops it is back on its
owner. dq accumulates locally. Accumulators are fp32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fastattn.distributed import _blocks, _common
from fastattn.distributed._blocks import Coords, Params
from fastattn.distributed._layout import block_plan, runs, slice_runs, take


class _Shift:
    """Send ``tensors`` to the next rank and receive the previous rank's into fresh buffers, asynchronously."""

    def __init__(self, tensors: tuple[Tensor, ...], grp: _common.Group):
        self.sent = tensors  # keep the send buffers alive until the transfer is done
        self.recv = tuple(torch.empty_like(t) for t in tensors)
        ops = [dist.P2POp(dist.isend, t, grp.next, grp.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, grp.prev, grp.group) for t in self.recv]
        self.works = dist.batch_isend_irecv(ops)

    def wait(self) -> tuple[Tensor, ...]:
        for w in self.works:
            w.wait()
        return self.recv


class _Ring:
    """The per-call constants: group, layout, block parameters, the mask."""

    def __init__(self, grp: _common.Group, params: Params, local_len: int, zigzag: bool, mask: Tensor | None,
                 empty: bool):
        self.grp, self.params, self.local_len, self.zigzag, self.mask = grp, params, local_len, zigzag, mask
        self.empty = empty  # B, H or Ev is 0: nothing to compute, the ring still turns
        self.my_runs = runs(grp.rank, grp.world, local_len, zigzag)

    def blocks(self):
        """(step, Block, Coords, block mask) for each step; Block None when the pair is invisible."""
        g = self.grp
        for step in range(g.world):
            src = (g.rank - step) % g.world
            blk = block_plan(g.rank, src, g.world, self.local_len, self.params.is_causal, self.zigzag)
            if self.empty or blk is None or blk.rows.stop == blk.rows.start or blk.cols.stop == blk.cols.start:
                yield step, None, None, None
                continue
            coords = Coords(slice_runs(self.my_runs, blk.rows),
                            slice_runs(runs(src, g.world, self.local_len, self.zigzag), blk.cols))
            m = None if self.mask is None else take(take(self.mask, 2, coords.rows), 3, coords.cols)
            yield step, blk, coords, m


def _rows(t: Tensor, sl: slice) -> Tensor:
    return t[:, :, sl]


def _ring_forward(q: Tensor, k: Tensor, v: Tensor, ring: _Ring) -> tuple[Tensor, Tensor]:
    B, H, L, _ = q.shape
    dt = _blocks.acc_dtype(q.dtype)
    out = torch.zeros(B, H, L, v.shape[-1], dtype=dt, device=q.device)
    lse = torch.full((B, H, L), float("-inf"), dtype=dt, device=q.device)
    world = ring.grp.world
    kv = (k, v) if world == 1 else (k.contiguous(), v.contiguous())  # kernels read strided; sends do not
    for step, blk, coords, m in ring.blocks():
        pending = _Shift(kv, ring.grp) if step < world - 1 else None
        if blk is not None:
            ob, lb = _blocks.forward(_rows(q, blk.rows), _rows(kv[0], blk.cols), _rows(kv[1], blk.cols), m,
                                     ring.params, coords, blk.causal)
            if step == 0:  # the first block: nothing to merge with yet
                _rows(out, blk.rows).copy_(ob)
                _rows(lse, blk.rows).copy_(lb)
            else:
                _blocks.merge_(_rows(out, blk.rows), _rows(lse, blk.rows), ob, lb)
        if pending is not None:
            kv = pending.wait()
    return out.to(q.dtype), lse


def _ring_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   ring: _Ring) -> tuple[Tensor, Tensor, Tensor]:
    dt = _blocks.acc_dtype(q.dtype)
    world = ring.grp.world
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    kv = (k, v) if world == 1 else (k.contiguous(), v.contiguous())
    dkv_pending = None
    for step, blk, coords, m in ring.blocks():
        # Every rank posts the same sequence (key/value shift, then dk/dv shift) each step, so the
        # point-to-point messages between two neighbours match in order (what NCCL requires).
        kv_pending = _Shift(kv, ring.grp) if step < world - 1 else None
        grads = None
        if blk is not None:
            r, c = blk.rows, blk.cols
            grads = _blocks.backward(_rows(dout, r), _rows(q, r), _rows(kv[0], c), _rows(kv[1], c),
                                     _rows(out, r), _rows(lse, r), m, ring.params, coords, blk.causal)
            _rows(dq, r).add_(grads[0])
        if step == 0:
            dk = torch.zeros(k.shape, dtype=dt, device=k.device)
            dv = torch.zeros(v.shape, dtype=dt, device=v.device)
        else:
            dk, dv = dkv_pending.wait()  # the accumulator of the shard we hold, one hop behind it
        if grads is not None:
            _rows(dk, blk.cols).add_(grads[1])
            _rows(dv, blk.cols).add_(grads[2])
        if world > 1:
            dkv_pending = _Shift((dk, dv), ring.grp)
        if kv_pending is not None:
            kv = kv_pending.wait()
    if world > 1:
        dk, dv = dkv_pending.wait()  # our own shard's accumulator, home after W hops
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: _Ring):
        out, lse = _ring_forward(q, k, v, ring)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = ring
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, ctx.ring)
        return dq, dk, dv, None


def ring_attention(
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
    return_lse: bool = False,
):
    """Attention over a sequence sharded across the ranks of ``group``, key/value shards passed around a ring.

    Equals ``fastattn.scaled_dot_product_attention`` on the gathered sequence, shard for shard, for the
    output and the gradients. A collective: every rank of ``group`` calls it (and its backward) with
    shards of the same shape.

    Shapes (per rank; W ranks, N = W * L global length): query (B, H, L, E), key (B, Hk, L, E),
    value (B, Hk, L, Ev) -> (B, H, L, Ev), the rank's shard of the output. Hk == H unless ``enable_gqa``.

    Args:
        group: the process group (default: the world). Any torch.distributed backend (gloo, nccl, ...).
        is_causal: global causal mask (key position j visible to query position i iff j <= i).
        attn_mask: the GLOBAL mask, broadcastable to (B, H, N, N), the same tensor on every rank: bool
            (True = attend) or float (added to the scores). Key padding is (B, 1, 1, N); a (.., N, N)
            mask works too (each rank reads its rows). No gradient flows to it.
        scale: defaults to 1 / sqrt(E).
        dropout_p: dropout on the attention probabilities, with the same Philox stream at the same
            GLOBAL coordinates as the single-process op (one seed from torch's generator, broadcast from
            group rank 0). The fused kernels cannot offset their coordinates, so dropout runs an exact but
            unfused torch path (materialising B * H * rows * L scores per block).
        zigzag: the layout of the shards (see ``shard_sequence``): True (default) for chunks r and
            2W-1-r of 2W (balanced causal work), False for the r-th contiguous piece. Must match how the
            shards were made.
        backend: as in ``fastattn.scaled_dot_product_attention`` ("reference": the torch path).
        return_lse: also return the float32 log-sum-exp (B, H, L) of the global rows (no gradient).
    """
    grp = _common.process_group(group)
    _common.check_inputs("ring_attention", query, key, value, attn_mask, dropout_p, is_causal, scale,
                         enable_gqa, zigzag, grp.world)
    backend = _common.pick_backend(backend, query)
    params = _common.make_params(grp, query, scale, is_causal, dropout_p, backend)
    B, H, L, _ = query.shape
    ring = _Ring(grp, params, L, zigzag, _common.mask_4d(attn_mask), min(B, H, value.shape[-1]) == 0)
    out, lse = _RingAttention.apply(query, key, value, ring)
    if return_lse:
        return out, lse.float()
    return out
