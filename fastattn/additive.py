"""Additive (Bahdanau) attention (issue 5): placeholder until the fused kernels land."""
from __future__ import annotations

__all__: list[str] = []
