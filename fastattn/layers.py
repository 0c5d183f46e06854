"""Attention layers beyond multi-head attention (issue 5): placeholder."""
from __future__ import annotations

__all__: list[str] = []
