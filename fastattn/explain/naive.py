"""Naive rollout and gradient relevance: the textbook formulas on stacked per-layer weights.

The reference :mod:`fastattn.explain.core` is tested against: every layer's (H, n, n) weights held at once
(as transformers' ``output_attentions=True`` returns them), the gradient with respect to them from
``retain_grad``, and the products formed in forward layer order.

    rollout   = A_N ... A_1,                 A_l = rownorm(0.5 mean_h W_l + 0.5 I)
    relevance = R_N,  R_0 = I,  R_l = R_{l-1} + mean_h relu(dW_l o W_l) R_{l-1}
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["rollout", "relevance", "eager_attentions"]


def rollout(weights: Sequence[Tensor]) -> Tensor:
    """weights: per layer (H, n, n) -> (n, n), in the weights' dtype."""
    n = weights[0].shape[-1]
    eye = torch.eye(n, dtype=weights[0].dtype)
    r = eye
    for w in weights:
        a = 0.5 * w.mean(0) + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
        r = a @ r
    return r


def relevance(weights: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """weights, grads: per layer (H, n, n) probabilities and d(target)/d(probabilities) -> (n, n)."""
    n = weights[0].shape[-1]
    r = torch.eye(n, dtype=weights[0].dtype)
    for w, g in zip(weights, grads):
        r = r + (g * w).clamp(min=0).mean(0) @ r
    return r


def eager_attentions(model: torch.nn.Module, inputs: dict,
                     target: Callable[[object, dict], Tensor] | None = None
                     ) -> tuple[list[Tensor], list[Tensor] | None, object]:
    """Run ``model`` (loaded with ``attn_implementation="eager"``) with ``output_attentions=True``:
    (per-layer (B, H, L, S) weights, their gradients w.r.t. ``target(outputs, inputs)`` or None, outputs).
    The model must return transformers outputs with ``attentions``."""
    model.eval()
    with torch.set_grad_enabled(target is not None):
        out = model(**inputs, output_attentions=True)
        atts = list(out.attentions)
        if target is None:
            return [a.detach() for a in atts], None, out
        for a in atts:
            a.retain_grad()
        target(out, inputs).backward()
    return [a.detach() for a in atts], [a.grad for a in atts], out
