"""``fastattn.patch``: route ``torch.nn.functional.scaled_dot_product_attention`` to fastattn.

Every model that calls SDPA through ``torch.nn.functional`` (HF ``attn_implementation="sdpa"``,
``torch.nn.MultiheadAttention`` with ``need_weights=False``, ``torch.nn.TransformerEncoderLayer``, most
hand-written attention modules) then runs on fastattn's kernels, unchanged::

    with fastattn.patch():          # restored on exit
        out = model(**batch)

    fastattn.patch(True)            # a switch: on until fastattn.patch(False)

Calls fastattn cannot take (other devices, nested tensors other than jagged ones without a mask, mask dtypes
other than bool / the query's float dtype / float32) go to torch's own function, so the
patch never changes what a model can run; ``calls`` and ``fallbacks`` on the patch object count both
(eager calls; a compiled graph counts when it is traced). While patched, torch's fused MultiheadAttention /
TransformerEncoderLayer inference fast path (``torch.backends.mha``) is turned off so those layers reach
SDPA too.

A ``torch.nn.attention.bias.CausalBias`` mask (``causal_upper_left`` / ``causal_lower_right``) runs fastattn's
causal kernels with that alignment; other tensor subclasses with ``__torch_function__`` are offered the call
first, as torch's own function offers it (they see the patched function as ``func``). Modules that bound ``scaled_dot_product_attention`` into their own namespace at import time
(``from torch.nn.functional import scaled_dot_product_attention``) keep torch's function. The patch is a
process-wide setting: do not toggle it from several threads at once.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias
from torch.overrides import handle_torch_function, has_torch_function

from fastattn import _validation as check
from fastattn import functional

__all__ = ["patch", "is_patched"]

_TORCH_SDPA = F.scaled_dot_product_attention
_active: list["patch"] = []  # innermost last


def is_patched() -> bool:
    """True while ``torch.nn.functional.scaled_dot_product_attention`` is fastattn's."""
    return getattr(F.scaled_dot_product_attention, "_fastattn_patch", None) is not None


def _fastattn_can_run(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    if isinstance(query, torch.Tensor) and query.is_nested:  # jagged nested tensors: fastattn/nested.py's
        return (attn_mask is None and query.layout == torch.jagged and isinstance(key, torch.Tensor)
                and key.is_nested and isinstance(value, torch.Tensor) and value.is_nested)
    try:
        check.check_qkv(query, key, value, enable_gqa, broadcast=True)
        if not isinstance(attn_mask, CausalBias):  # fastattn reads a CausalBias as its causal flag
            check.check_mask(attn_mask, query, check.scores_shape(query, key))
        check.check_scalars(dropout_p, is_causal, scale, enable_gqa)
    except (TypeError, ValueError):
        return False
    if query.device.type not in ("cpu", "cuda"):
        return False
    return True


class patch:  # noqa: N801 - used like a function: fastattn.patch()
    """Make ``torch.nn.functional.scaled_dot_product_attention`` run fastattn (see the module doc).

    ``fastattn.patch()`` is a context manager that patches on entry and restores the previous function on
    exit. ``fastattn.patch(True)`` / ``fastattn.patch(False)`` switch it on / off at once (and, used in a
    ``with``, restore the previous state on exit). ``backend`` is passed to
    :func:`fastattn.scaled_dot_product_attention` (None: the default per device).
    """

    def __init__(self, enabled: bool | None = None, *, backend: str | None = None):
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True, False or None, got {type(enabled).__name__}")
        self.enabled = True if enabled is None else enabled
        self.backend = backend
        self.calls = 0
        self.fallbacks = 0
        self._saved = None
        self._applied_now = enabled is not None
        if self._applied_now:
            self._apply()

    # -------------------------------------------------------------------------------- switching
    def _apply(self) -> None:
        self._saved = (F.scaled_dot_product_attention, torch.backends.mha.get_fastpath_enabled())
        if self.enabled:
            F.scaled_dot_product_attention = self._wrapper()
            torch.backends.mha.set_fastpath_enabled(False)
        else:
            F.scaled_dot_product_attention = _TORCH_SDPA
            torch.backends.mha.set_fastpath_enabled(True)
        _active.append(self)

    def _restore(self) -> None:
        if self._saved is None:
            return
        fn, fastpath = self._saved
        F.scaled_dot_product_attention = fn
        torch.backends.mha.set_fastpath_enabled(fastpath)
        self._saved = None
        if self in _active:
            _active.remove(self)

    def __enter__(self) -> "patch":
        if not self._applied_now:
            self._apply()
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def __repr__(self) -> str:
        return (f"fastattn.patch(enabled={self.enabled}, backend={self.backend!r}, calls={self.calls}, "
                f"fallbacks={self.fallbacks})")

    # ---------------------------------------------------------------------------------- routing
    def _wrapper(self):
        owner = self

        @functools.wraps(_TORCH_SDPA)
        def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                         *, scale=None, enable_gqa=False):
            if not isinstance(attn_mask, CausalBias) and has_torch_function((query, key, value, attn_mask)):
                return handle_torch_function(scaled_dot_product_attention, (query, key, value, attn_mask), query,
                                             key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                             enable_gqa=enable_gqa)
            if _fastattn_can_run(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
                owner.calls += 1
                return functional.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                                               is_causal, scale, enable_gqa,
                                                               backend=owner.backend)
            owner.fallbacks += 1
            return _TORCH_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                               enable_gqa=enable_gqa)

        scaled_dot_product_attention._fastattn_patch = owner
        return scaled_dot_product_attention
