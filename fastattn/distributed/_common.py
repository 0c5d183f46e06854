"""What ring and all-to-all attention share: argument checks, the process group, the dropout seed."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from fastattn import _launchers
from fastattn import _validation as check
from fastattn.distributed._blocks import Params


@dataclass(frozen=True)
class Group:
    """A process group as the ring sees it: this rank, the size, the global ranks of the neighbours."""

    group: dist.ProcessGroup | None
    rank: int
    world: int

    def global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    @property
    def next(self) -> int:
        return self.global_rank((self.rank + 1) % self.world)

    @property
    def prev(self) -> int:
        return self.global_rank((self.rank - 1) % self.world)


def process_group(group) -> Group:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fastattn.distributed needs an initialised torch.distributed process group: call "
                           "torch.distributed.init_process_group(...) first (e.g. backend='gloo' on CPU, "
                           "'nccl' on CUDA), or launch with torchrun")
    return Group(group, dist.get_rank(group), dist.get_world_size(group))


def check_inputs(name: str, query: Tensor, key: Tensor, value: Tensor, attn_mask, dropout_p, is_causal, scale,
                 enable_gqa, zigzag, world: int) -> None:
    """The functional API's checks on the local shards, plus the distributed layout's own rules."""
    check.check_qkv(query, key, value, enable_gqa)
    check.check_scalars(dropout_p, is_causal, scale, enable_gqa)
    if not isinstance(zigzag, bool):
        raise TypeError(f"zigzag must be a bool, got {type(zigzag).__name__}")
    if query.dim() != 4:
        raise ValueError(f"{name} takes 4-D local shards (B, H, L_local, E), got query shape {tuple(query.shape)}")
    if key.shape[-2] != query.shape[-2]:
        raise ValueError(f"{name}: query and key/value shards must cover the same positions (self-attention "
                         f"over one sharded sequence), got query length {query.shape[-2]} and key length "
                         f"{key.shape[-2]}")
    if zigzag and query.shape[-2] % 2:
        raise ValueError(f"{name}: zig-zag shards hold two equal chunks, so the local length must be even, got "
                         f"{query.shape[-2]} (shard with fastattn.distributed.shard_sequence, or pass zigzag=False "
                         f"for contiguous shards)")
    if attn_mask is None:
        return
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.requires_grad:
        raise NotImplementedError(f"{name} does not compute gradients of attn_mask; pass a mask that does not "
                                  f"require grad (e.g. attn_mask.detach())")
    B, H, L, _ = query.shape
    n = L * world
    # The mask is GLOBAL (the same tensor on every rank): key padding is (B, 1, 1, N).
    check.check_mask(attn_mask, query, (B, H, n, n))


def mask_4d(attn_mask: Tensor | None) -> Tensor | None:
    """A broadcastable global mask as 4-D (B or 1, H or 1, N or 1, N), without expanding anything."""
    if attn_mask is None:
        return None
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def pick_backend(backend, query: Tensor) -> str:
    return _launchers.choose_backend(backend, query.device, query.dtype)


def make_params(grp: Group, query: Tensor, scale, is_causal: bool, dropout_p, backend: str) -> Params:
    """Block parameters; with dropout, one seed drawn like the functional API and broadcast from group
    rank 0, so every rank (and a single-process run after the same ``torch.manual_seed``) agrees."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    seed = torch.zeros((), dtype=torch.int64)
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64)
        if grp.world > 1:
            t = seed.to(query.device)
            dist.broadcast(t, src=grp.global_rank(0), group=grp.group)
            seed = t.cpu()
    return Params(scale, is_causal, dropout_p, seed, backend)
