"""What a benchmark case is, and what it costs: :class:`Case` and the one FLOP formula.

Work: the forward costs ``2 * (E + Ev)`` FLOPs per (query, key) pair the mask leaves visible (QK^T and PV),
summed over batch and heads: causal attention counts the lower triangle only, a padded batch counts only its
real keys. Backward = 2.5x forward (five matmuls against two); forward+backward = 3.5x. Softmax and other
element-wise work are not counted.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "f64": torch.float64}


@dataclass(frozen=True)
class Case:
    """One benchmark configuration.

    Shape legend: B batch, H query heads, Hk key/value heads (default H), L query length, S key length,
    E head dim, Ev value head dim (default E). ``mask``: "none", or "pad" (the second half of the batch
    has real keys for only the first quarter of S, given as a bool (B, 1, 1, S) mask, True = attend); an
    operation may name other kinds (varlen: the length distribution of its packed batch).
    ``mode``: "fwd" or "fwd+bwd". ``suites``: which runs include it ("quick", "full", "memory").
    ``mem_limit_mib``: for memory cases, the budget for peak extra memory (a check, not a measurement).
    ``top_k``: the keys each query keeps (hard attention only; None elsewhere).
    """
    op: str
    B: int
    H: int
    L: int
    S: int
    E: int
    dtype: str = "f32"
    mode: str = "fwd"
    causal: bool = False
    mask: str = "none"
    device: str = "cpu"
    Hk: int | None = None
    Ev: int | None = None
    family: str = ""
    suites: tuple[str, ...] = ("full",)
    mem_limit_mib: float | None = None
    top_k: int | None = None

    @property
    def hk(self) -> int:
        return self.H if self.Hk is None else self.Hk

    @property
    def ev(self) -> int:
        return self.E if self.Ev is None else self.Ev

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def shape(self) -> str:
        """Readable shape, e.g. ``B8 H12 L512 E64`` (S, Hk, Ev only where they differ)."""
        s = f"B{self.B} H{self.H}" + ("" if self.hk == self.H else f"/{self.hk}") + f" L{self.L}"
        s += "" if self.S == self.L else f" S{self.S}"
        return s + f" E{self.E}" + ("" if self.ev == self.E else f"/{self.ev}")

    @property
    def variant(self) -> str:
        """e.g. ``fwd``, ``fwd+bwd causal``, ``fwd pad``, ``fwd top8``."""
        return " ".join([self.mode] + self._qualifiers())

    @property
    def id(self) -> str:
        """Stable identifier (JSON key for --compare, pytest id)."""
        parts = [self.op, self.device, self.shape.replace(" ", "-").replace("/", "_"), self.dtype, self.mode]
        return "-".join(parts + self._qualifiers())

    def _qualifiers(self) -> list[str]:
        return ((["causal"] if self.causal else []) + ([self.mask] if self.mask != "none" else [])
                + ([f"top{self.top_k}"] if self.top_k is not None else []))

    def key_lengths(self) -> list[int]:
        """Real key count of each batch element (what a padding mask leaves)."""
        if self.mask == "pad":
            short = max(1, self.S // 4)
            return [self.S] * (self.B - self.B // 2) + [short] * (self.B // 2)
        return [self.S] * self.B

    def to_dict(self) -> dict:
        """JSON-ready (tuples as lists, so a loaded report equals the one written)."""
        d = dataclasses.asdict(self)
        d["suites"] = list(self.suites)
        if d["top_k"] is None:  # only hard attention's cases have one; the other reports keep their keys
            del d["top_k"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        d = dict(d)
        d["suites"] = tuple(d.get("suites", ()))
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# ============================================================================================ FLOPs
def visible_pairs(q_len: int, k_len: int, causal: bool) -> int:
    """(query, key) pairs attention computes for one sequence and head: causal is top-left aligned
    (key j visible to query i iff j <= i), so it keeps the lower triangle."""
    if not causal:
        return q_len * k_len
    d = min(q_len, k_len)
    return d * (d + 1) // 2 + (q_len - d) * k_len


MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def attention_flops(H: int, E: int, Ev: int, q_lens: Sequence[int], k_lens: Sequence[int], *,
                    causal: bool = False, mode: str = "fwd") -> float:
    """THE FLOP formula: ``2 * (E + Ev)`` per visible (query, key) pair and head (forward: QK^T and PV),
    times 1 / 2.5 / 3.5 for ``mode`` fwd / bwd / fwd+bwd. ``q_lens``/``k_lens``: real lengths of each
    batch element (padding counts nothing; fixed-length batches pass ``[L] * B``)."""
    if len(q_lens) != len(k_lens):
        raise ValueError(f"q_lens and k_lens must have one entry per batch element, "
                         f"got {len(q_lens)} and {len(k_lens)}")
    pairs = sum(visible_pairs(q, k, causal) for q, k in zip(q_lens, k_lens))
    return 2.0 * (E + Ev) * H * pairs * MODE_FACTOR[mode]


def case_flops(case: Case) -> float:
    return attention_flops(case.H, case.E, case.ev, [case.L] * case.B, case.key_lengths(),
                           causal=case.causal, mode=case.mode)

