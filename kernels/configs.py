"""Tile configurations of every Triton kernel: the only place block sizes, warps and stages live.

* Attention (kernels/attention*.py): ``CONFIGS``, one table keyed by kernel, head-dim bucket and dtype class;
  the autotuner times the rows allowed for the call's features. ``INTERPRETER_CONFIGS`` under TRITON_INTERPRET=1.
* Additive attention (kernels/additive.py): ``ADDITIVE_CONFIGS``, one fixed tile per kernel and dtype class.
* Hard (top-k) attention (kernels/hard.py): ``hard_fwd_config`` / ``hard_bwd_config``, chosen from top_k and the
  head dims.
* Decode (kernels/decode.py): ``DECODE_CONFIGS``, keyed by head-dim bucket and dtype class, then by the row
  block; ``DECODE_MERGE_CONFIG`` for the split merge, ``DECODE_INTERPRETER_CONFIG`` under TRITON_INTERPRET=1.

Every compiled row fits sm_80 and sm_90 without register spills and within shared memory (163 KiB / 227 KiB):
``fastattn kernels`` (kernels/aot.py) checks the attention and decode tables, ``additive.compile_check()`` and
``hard.print_aot_report()`` the other two.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

__all__ = ["TileConfig", "CONFIGS", "INTERPRETER_CONFIGS", "HEAD_BUCKETS", "head_bucket", "len_bucket",
           "dtype_class", "pad_dim", "ADDITIVE_CONFIGS", "ADDITIVE_INTERPRETER_CONFIGS", "hard_fwd_config",
           "hard_bwd_config", "HARD_INTERPRETER_CONFIG", "DecodeConfig", "DECODE_CONFIGS", "DECODE_MERGE_CONFIG",
           "DECODE_INTERPRETER_CONFIG"]


def dtype_class(dtype: torch.dtype) -> str:
    """The tables' dtype class: "16" (fp16 / bf16: 2-byte tiles on mma / wgmma tensor cores) or "32" (fp32: tf32
    or ieee dots, 4-byte tiles)."""
    return "32" if dtype == torch.float32 else "16"


def pad_dim(e: int) -> int:
    """The tile width of head dim ``e``: tl.dot needs every dim >= 16; tiles are powers of two, masked beyond
    the true head dim."""
    return max(16, triton.next_power_of_2(e))


# ----------------------------------------------------------------------------------------------------
# Attention (forward, backward preprocess, dK/dV, dQ, broadcast dmask)
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile (0: the kernel has no key tile)
    num_warps: int
    num_stages: int
    # "all": usable with every feature; "base": only without dropout and float masks (those add a
    # Philox word tile and a float mask tile per step, so larger tiles would spill registers).
    features: str = "all"
    # False: not with the decoder variants (window, soft-cap, ALiBi, sinks), whose score tile would spill it.
    decoder: bool = True

    def kwargs(self) -> dict[str, int]:
        return {"BLOCK_M": self.block_m, **({"BLOCK_N": self.block_n} if self.block_n else {})}

    def __str__(self) -> str:
        n = f"x{self.block_n}" if self.block_n else ""
        return f"{self.block_m}{n} w{self.num_warps} s{self.num_stages}"


def _c(*rows: tuple) -> list[TileConfig]:
    return [TileConfig(*r) for r in rows]


_B = "base"
_ND = False  # the row's decoder field: not with the decoder variants (they would spill it)
# Keyed by kernel, then by (head-dim bucket, dtype class). The head-dim bucket is the padded head dim
# max(next_pow2(E), next_pow2(Ev)) rounded up to 64, 128 or 256 (head_bucket).
# Rows: (BLOCK_M, BLOCK_N, num_warps, num_stages[, "base"]). The autotuner times the rows allowed for
# the call's features (see TileConfig.features); each row is checked in its worst feature combination.
# Rows marked _ND spill with the decoder variants (their score tile: tanh, ALiBi, the window compares) and
# are left out of those calls; the 8-warp dmask (128, "16") and dK/dV (256, "32") rows stand in for them.
# Forward: large query tiles amortise each K/V load; at E=256 a 64-row tile keeps acc (64 x 256 fp32)
# in registers. dK/dV hold two fp32 (BLOCK_N x E) accumulators plus K and V, so key tiles are smaller,
# and 32-key tiles once dropout/float-mask tiles join them. dQ is the forward's shape with one more dot.
CONFIGS: dict[str, dict[tuple[int, str], list[TileConfig]]] = {
    "fwd": {
        (64, "16"): _c((128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 4, 3), (64, 64, 4, 4), (128, 128, 8, 3, _B)),
        (128, "16"): _c((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3)),
        (256, "16"): _c((64, 32, 8, 3), (64, 32, 8, 2), (32, 32, 4, 3), (64, 64, 8, 2, _B)),
        (64, "32"): _c((128, 64, 8, 2, "all", _ND), (64, 32, 4, 3)),
        (128, "32"): _c((64, 32, 8, 2), (32, 32, 4, 3), (64, 32, 4, 2, _B)),
        (256, "32"): _c((32, 32, 4, 2), (32, 16, 4, 2), (64, 16, 8, 2, _B)),
    },
    "bwd_preprocess": {
        (64, "16"): _c((128, 0, 4, 1)),
        (128, "16"): _c((128, 0, 4, 1)),
        (256, "16"): _c((64, 0, 4, 1)),
        (64, "32"): _c((128, 0, 4, 1)),
        (128, "32"): _c((64, 0, 4, 1)),
        (256, "32"): _c((32, 0, 4, 1)),
    },
    "bwd_dkdv": {
        (64, "16"): _c((32, 128, 8, 1), (16, 128, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2)),
        (128, "16"): _c((32, 64, 8, 2, _B), (16, 64, 8, 2, _B), (16, 32, 8, 2), (16, 32, 4, 2)),
        (256, "16"): _c((32, 16, 8, 1), (32, 16, 4, 1)),
        (64, "32"): _c((16, 32, 4, 2), (16, 32, 8, 2)),
        (128, "32"): _c((16, 32, 8, 2), (32, 32, 4, 2, _B), (16, 32, 4, 2, _B)),
        (256, "32"): _c((16, 16, 4, 1, "all", _ND), (32, 32, 8, 1, _B, _ND), (16, 16, 8, 1)),
    },
    "bwd_dq": {
        (64, "16"): _c((128, 32, 8, 3), (64, 32, 4, 3)),
        (128, "16"): _c((64, 32, 4, 3), (64, 32, 4, 2), (64, 64, 8, 2, _B)),
        (256, "16"): _c((32, 32, 4, 2), (64, 32, 8, 2, _B), (64, 16, 4, 2, _B, _ND)),
        (64, "32"): _c((64, 32, 8, 2), (128, 32, 8, 2, _B)),
        (128, "32"): _c((64, 16, 4, 2), (32, 32, 4, 2), (64, 32, 8, 2, _B)),
        (256, "32"): _c((32, 16, 4, 2), (16, 32, 4, 2)),
    },
    "bwd_dmask": {  # always runs with a float mask; with the decoder variants 32x32 needs 8 warps at E=128
        (64, "16"): _c((32, 32, 4, 2), (64, 32, 4, 2)),
        (128, "16"): _c((32, 32, 4, 2, "all", _ND), (32, 32, 8, 2)),
        (256, "16"): _c((16, 32, 4, 1)),
        (64, "32"): _c((16, 32, 4, 2)),
        (128, "32"): _c((16, 32, 8, 2), (32, 16, 4, 1, "all", _ND)),
        (256, "32"): _c((16, 32, 8, 1), (32, 16, 8, 1, "all", _ND)),
    },
}

# Under TRITON_INTERPRET=1 (CPU tensors): one small config per kernel, no autotuning. Query and key
# tiles differ so the causal block bounds are exercised with BLOCK_M != BLOCK_N.
INTERPRETER_CONFIGS: dict[str, TileConfig] = {
    "fwd": TileConfig(32, 16, 1, 1),
    "bwd_preprocess": TileConfig(32, 0, 1, 1),
    "bwd_dkdv": TileConfig(16, 32, 1, 1),
    "bwd_dq": TileConfig(32, 16, 1, 1),
    "bwd_dmask": TileConfig(32, 32, 1, 1),
}

HEAD_BUCKETS = (64, 128, 256)


def head_bucket(e: int, ev: int) -> int:
    """The config table's head-dim bucket for head dims (E, Ev): 64, 128 or 256."""
    padded = max(pad_dim(e), pad_dim(ev))
    for b in HEAD_BUCKETS:
        if padded <= b:
            return b
    raise ValueError(f"head dims up to 256 are supported by the Triton kernels, got E={e}, Ev={ev}")


def len_bucket(n: int) -> int:
    """Sequence-length bucket of the autotuning key: 256, 1024, 4096 or 16384 (and longer)."""
    for b in (256, 1024, 4096):
        if n <= b:
            return b
    return 16384


# ----------------------------------------------------------------------------------------------------
# Additive attention: (BLOCK_M, BLOCK_N, num_warps, num_stages) per (kernel, dtype class)
# ----------------------------------------------------------------------------------------------------
# fp32 runs ieee dots, which run on the FMA units and hold their operands in registers, hence smaller
# tiles (64x64 fp32 tiles spill even with 8 warps). additive.compile_check() checks them (D 8, Ev 64).
ADDITIVE_CONFIGS: dict[tuple[str, str], tuple[int, int, int, int]] = {
    ("fwd", "16"): (64, 64, 4, 2),
    ("bwd_dq", "16"): (64, 32, 4, 1),
    ("bwd_dkdv", "16"): (32, 64, 4, 1),
    ("fwd", "32"): (32, 32, 4, 2),
    ("bwd_dq", "32"): (16, 32, 4, 1),
    ("bwd_dkdv", "32"): (32, 32, 4, 1),
}
ADDITIVE_INTERPRETER_CONFIGS = {"fwd": (16, 16, 1, 1), "bwd_dq": (16, 16, 1, 1), "bwd_dkdv": (16, 16, 1, 1)}


# ----------------------------------------------------------------------------------------------------
# Hard (top-k) attention: (BLOCK_M, BLOCK_N, num_warps, num_stages)
# ----------------------------------------------------------------------------------------------------
HARD_INTERPRETER_CONFIG = (16, 16, 1, 1)


def hard_fwd_config(k_pad: int, head: int, fp32: bool) -> tuple[int, int, int, int]:
    """The forward's tile (``k_pad``: next_pow2(top_k), ``head``: padded max(E, Ev)). The candidate tiles
    (BLOCK_M x K_PAD scores + indices) join the score tile in registers, so wide top-k uses shorter query
    tiles."""
    if fp32:  # fp32 tiles are twice the registers (and ieee dots run on the FMA units)
        return (32, 32, 4, 2) if head <= 64 else (16, 32, 4, 2)
    if head > 128:
        return 32, 32, 4, 2
    if k_pad <= 8:
        return 64, 64, 4, 2
    return (32, 64, 4, 2) if k_pad <= 32 else (16, 64, 4, 2)


def hard_bwd_config(head: int, fp32: bool) -> tuple[int, int, int, int]:
    """The tile of both backward kernels (fp32 W tiles and dots). 8 warps: the dK/dV kernel holds two fp32
    (BLOCK_N x E) accumulators and two fp32 W tiles."""
    return (32, 64, 8, 1) if head <= 64 else (16, 32, 8, 1)


# ----------------------------------------------------------------------------------------------------
# Decode (a few query rows against a KV cache): key tile, warps, stages per row block
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # keys per tile (the merge kernel: query rows per tile)
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"{self.block_n} w{self.num_warps} s{self.num_stages}"


# Keyed by (head-dim bucket, dtype class), then by the row block BLOCK_M: the launcher packs G * L rows into
# the smallest listed block that holds them, or several blocks of the largest (fp32 at E > 64 stops at 32
# rows: its 64-row tiles spill). Decoding streams the cache once: key tiles are as long as the registers allow
# and pipelined (num_stages) so loads stay in flight; the fp32 accumulator (BLOCK_M x Ev) takes more warps as
# it grows. Every row compiles for sm_80 and sm_90 without spills in every variant (`fastattn kernels`).
_D = DecodeConfig
DECODE_CONFIGS: dict[tuple[int, str], dict[int, DecodeConfig]] = {
    (64, "16"): {16: _D(64, 4, 3), 32: _D(64, 4, 3), 64: _D(64, 4, 3)},
    (128, "16"): {16: _D(64, 4, 3), 32: _D(64, 4, 3), 64: _D(64, 8, 3)},
    (256, "16"): {16: _D(32, 4, 3), 32: _D(32, 4, 3), 64: _D(32, 8, 2)},
    (64, "32"): {16: _D(32, 4, 2), 32: _D(32, 4, 3), 64: _D(32, 4, 3)},
    (128, "32"): {16: _D(32, 4, 3), 32: _D(32, 4, 2)},
    (256, "32"): {16: _D(16, 4, 3), 32: _D(32, 8, 2)},
}
# The merge kernel: a (rows x Ev) fp32 tile per split, no dot.
DECODE_MERGE_CONFIG = DecodeConfig(16, 4, 1)
# Under TRITON_INTERPRET=1: 16-key tiles and 16-row blocks.
DECODE_INTERPRETER_CONFIG = DecodeConfig(16, 1, 1)
