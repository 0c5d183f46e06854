"""Context parallelism over ``torch.distributed``: attention on a sequence sharded across processes.

* :func:`ring_attention`: key/value shards travel around a ring of ranks (point-to-point, the next
  transfer overlapping the current block's compute); partial results merge exactly by log-sum-exp.
* :func:`all_to_all_attention`: the Ulysses layout, scatter heads / gather the sequence, attend, back.
* :func:`shard_sequence` / :func:`unshard_sequence` (local) and :func:`gather_sequence` (collective):
  the zig-zag (default, balanced causal work) or contiguous layout both strategies expect.

Layout per rank: (B, H, L, E) with L = N / W the rank's share of the global length N. See README.md in
this package for how to launch, which strategy for which shape, and measured scaling.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fastattn.distributed._layout import shard_sequence, unshard_sequence
from fastattn.distributed.ring import ring_attention
from fastattn.distributed.ulysses import all_to_all_attention

__all__ = [
    "ring_attention",
    "all_to_all_attention",
    "shard_sequence",
    "unshard_sequence",
    "gather_sequence",
]


def gather_sequence(x: Tensor, group: dist.ProcessGroup | None = None, zigzag: bool = True, dim: int = -2) -> Tensor:
    """The global sequence from every rank's shard ``x`` (a collective; the inverse of :func:`shard_sequence`
    across ranks). Not differentiable: meant for outputs, checkpoints and checks."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gather_sequence needs an initialised torch.distributed process group")
    world = dist.get_world_size(group)
    x = x.detach().contiguous()
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x, group=group)
    return unshard_sequence(shards, zigzag=zigzag, dim=dim)
