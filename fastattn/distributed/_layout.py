"""How a sequence is split across ranks, and which (query shard, key shard) pairs causal attention needs.

Two layouts of a global sequence of length ``N`` over ``W`` ranks, each rank holding ``N / W`` positions:

* contiguous: rank ``r`` holds positions ``[r * N/W, (r + 1) * N/W)``.
* zig-zag (the default): the sequence is cut into ``2W`` chunks of ``C = N / (2W)`` positions and rank
  ``r`` holds chunks ``r`` and ``2W - 1 - r``, in that order. Under causal attention every rank then
  owns one early and one late chunk, so every rank has the same number of visible (query, key) pairs.

A layout is described by *runs*: ``[(global_start, length), ...]`` in local order (one run contiguous,
two runs zig-zag). Everything here is pure Python/torch (no process group), so it is testable alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

Runs = tuple[tuple[int, int], ...]


def _check_world(rank: int, world: int) -> None:
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, {world}), got {rank!r}")


def runs(rank: int, world: int, local_len: int, zigzag: bool) -> Runs:
    """Global (start, length) runs of rank ``rank``'s local positions, in local order."""
    if not zigzag:
        return ((rank * local_len, local_len),)
    if local_len % 2:
        raise ValueError(f"zig-zag sharding needs an even local length (two chunks per rank), got {local_len}")
    c = local_len // 2
    return ((rank * c, c), ((2 * world - 1 - rank) * c, c))


def slice_runs(r: Runs, sl: slice) -> Runs:
    """The runs of ``local[sl]`` (``sl`` a step-1 slice)."""
    start, stop, _ = sl.indices(sum(n for _, n in r))
    out, pos = [], 0
    for g, n in r:
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            out.append((g + lo - pos, hi - lo))
        pos += n
    return tuple(out)


def take(t: Tensor, dim: int, r: Runs) -> Tensor:
    """``t`` restricted to the global positions ``r`` along ``dim``: a view for one run (or a size-1,
    broadcast dim), a concatenation otherwise."""
    if t.shape[dim] == 1:
        return t
    if len(r) == 1:
        return t.narrow(dim, r[0][0], r[0][1])
    return torch.cat([t.narrow(dim, g, n) for g, n in r], dim=dim)


def positions(r: Runs, device=None) -> Tensor:
    """The global positions of ``r`` as an int64 tensor."""
    if not r:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat([torch.arange(g, g + n, dtype=torch.int64, device=device) for g, n in r])


# ------------------------------------------------------------------------------------- public helpers
def shard_sequence(x: Tensor, rank: int, world: int, zigzag: bool = True, dim: int = -2) -> Tensor:
    """Rank ``rank``'s shard of the global sequence ``x`` (sequence along ``dim``, default -2 as in
    (B, H, N, E)). ``zigzag=True`` (what causal ring attention wants): chunks ``rank`` and
    ``2 * world - 1 - rank`` of ``2 * world`` equal chunks, concatenated (a copy); ``zigzag=False``: the
    ``rank``-th of ``world`` contiguous pieces (a view). ``N`` must divide by ``2 * world`` (zig-zag) or
    ``world``; pad the sequence and hide the padding with a key-padding mask otherwise."""
    _check_world(rank, world)
    n = x.shape[dim]
    parts = 2 * world if zigzag else world
    if n % parts:
        raise ValueError(f"sequence length {n} (dim {dim} of shape {tuple(x.shape)}) must be divisible by "
                         f"{parts} for {'zig-zag' if zigzag else 'contiguous'} sharding over {world} ranks")
    return take(x, dim, runs(rank, world, n // world, zigzag))


def unshard_sequence(shards: list[Tensor] | tuple[Tensor, ...], zigzag: bool = True, dim: int = -2) -> Tensor:
    """Inverse of :func:`shard_sequence`: the global sequence from the shards of ranks 0..world-1."""
    world = len(shards)
    if world == 0:
        raise ValueError("unshard_sequence needs at least one shard")
    n_local = shards[0].shape[dim]
    if any(s.shape[dim] != n_local for s in shards):
        raise ValueError(f"all shards must have the same length along dim {dim}, got "
                         f"{[s.shape[dim] for s in shards]}")
    if not zigzag:
        return torch.cat(list(shards), dim=dim)
    if n_local % 2:
        raise ValueError(f"zig-zag shards have an even length (two chunks), got {n_local}")
    c = n_local // 2
    first = [s.narrow(dim, 0, c) for s in shards]
    second = [s.narrow(dim, c, c) for s in reversed(shards)]
    return torch.cat(first + second, dim=dim)


# ---------------------------------------------------------------------------------------- block plan
@dataclass(frozen=True)
class Block:
    """The work of one (query shard, key/value shard) pair: ``q[..., rows, :]`` against
    ``k[..., cols, :]`` with ``causal`` (top-left aligned inside the block) or full visibility."""

    rows: slice
    cols: slice
    causal: bool


def block_plan(rank: int, src: int, world: int, local_len: int, is_causal: bool, zigzag: bool) -> Block | None:
    """Which part of the pair (queries of ``rank``, keys of ``src``) is visible; None when nothing is.

    Non-causal: everything. Causal, contiguous: src < rank full, src == rank causal, src > rank skipped
    (so rank W-1 does W blocks and rank 0 one). Causal, zig-zag (chunks of C, rank r holds r and 2W-1-r):

    * src == rank: both shards are [early, late] in global order, so top-left causal on the whole
      2C x 2C block is exact (early queries see only the early chunk, late queries see it all);
    * src < rank: the source's early chunk precedes both of ours and its late chunk follows both:
      all 2C queries x the first C keys, full;
    * src > rank: the source's chunks both precede our late chunk and follow our early one:
      the last C queries x all 2C keys, full.

    Every off-diagonal pair is 2C^2 visible pairs, the diagonal 2C^2 + C: equal work on every rank.
    """
    full = slice(0, local_len)
    if not is_causal:
        return Block(full, full, False)
    if src == rank:
        return Block(full, full, True)
    if not zigzag:
        return Block(full, full, False) if src < rank else None
    c = local_len // 2
    if src < rank:
        return Block(full, slice(0, c), False)
    return Block(slice(c, local_len), full, False)
