"""Counter-based Philox4x32-10 in plain torch: the executable specification of fastattn's dropout.

The C++ kernel (csrc/philox.h) and the Triton kernel (kernels/attention.py) generate the same bits:

* key ``(k0, k1) = (seed & 0xFFFFFFFF, seed >> 32)``;
* the element ``(b, h, i, j)`` of the ``(B, H, L, S)`` probability matrix (``h`` is the *query* head,
  ``b`` the batch index of the 4-D view) uses counter ``(c0, c1, c2, c3) = (j >> 2, i, h, b)`` and
  output word ``j & 3``;
* ten rounds of ``(c0, c1, c2, c3) <- (hi(B*c2) ^ c1 ^ k0, lo(B*c2), hi(A*c0) ^ c3 ^ k1, lo(A*c0))``
  with ``A = 0xD2511F53``, ``B = 0xCD9E8D57``, the key bumped by ``(0x9E3779B9, 0xBB67AE85)`` after each;
* an element is kept iff its word ``>= threshold(p) = min(floor(p * 2**32), 2**32 - 1)``.
"""
from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF
_A, _B = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def threshold(p: float) -> int:
    """Integer threshold on a uint32 word: ``word >= threshold(p)`` keeps with probability ``1 - p``."""
    return min(int(math.floor(p * 2.0**32)), _M32)


def _mulhilo(a: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (hi, lo) 32-bit halves of a * c for a, c < 2**32, in int64 without overflow: split c in 16-bit halves.
    p_lo = a * (c & 0xFFFF)
    mid = a * (c >> 16) + (p_lo >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox4x32(c0, c1, c2, c3, seed: int, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values; returns the four output words."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(_A, c0)
        hi2, lo2 = _mulhilo(_B, c2)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _M32, (k1 + _W1) & _M32
    return c0, c1, c2, c3


def dropout_words(seed: int, B: int, H: int, L: int, S: int, device=None) -> torch.Tensor:
    """The uint32 random word of every element of a (B, H, L, S) matrix, as int64."""
    n4 = (S + 3) // 4
    ar = lambda n: torch.arange(n, dtype=torch.int64, device=device)  # noqa: E731
    c3 = ar(B).view(B, 1, 1, 1)
    c2 = ar(H).view(1, H, 1, 1)
    c1 = ar(L).view(1, 1, L, 1)
    c0 = ar(n4).view(1, 1, 1, n4)
    shape = (B, H, L, n4)
    words = philox4x32(c0.expand(shape), c1.expand(shape), c2.expand(shape), c3.expand(shape), seed)
    return torch.stack(words, dim=-1).reshape(B, H, L, 4 * n4)[..., :S]


def dropout_keep_mask(seed: int, B: int, H: int, L: int, S: int, p: float, device=None) -> torch.Tensor:
    """Boolean (B, H, L, S) mask of the elements that dropout with probability ``p`` keeps."""
    if p == 0.0:
        return torch.ones(B, H, L, S, dtype=torch.bool, device=device)
    return dropout_words(seed, B, H, L, S, device) >= threshold(p)
