"""Naive hard attention reference (issue 5): filled in with the kernels."""
from __future__ import annotations

__all__: list[str] = []
