"""The tolerance policy, in one place (used by the test suite and by ``fastattn check``).

* float32 / float64: compare with the float64 reference under a small absolute tolerance
  (ATOL_FP32 forward, ATOL_FP32_BWD for gradients; float64 tighter).
* float16 / bfloat16: the kernel's max error against the float64 reference must be at most
  FACTOR_FWD (2x) / FACTOR_BWD (3x) the max error of the same naive reference computed in the low
  precision, plus a tiny absolute floor for results that are ~0 in both.
Failures report where (index) and by how much.
"""
from __future__ import annotations

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 2e-5}
ATOL_BWD = {torch.float64: 1e-9, torch.float32: 1e-4}
FACTOR_FWD = 2.0
FACTOR_BWD = 3.0
FLOOR = {torch.float16: 1e-5, torch.bfloat16: 1e-4}


def _where(err: torch.Tensor) -> str:
    idx = torch.nonzero(err == err.max())[0].tolist() if err.numel() else []
    return f"max error {err.max().item():.3e} at index {idx}"


def compare(got: torch.Tensor, ref64: torch.Tensor, ref_lp: torch.Tensor | None = None, *,
            backward: bool = False) -> tuple[bool, float, float, str]:
    """(ok, error, bound, where) of ``got`` (kernel result) against ``ref64`` (float64 reference)."""
    if got.shape != ref64.shape:
        return False, float("inf"), 0.0, f"shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    if got.numel() == 0:
        return True, 0.0, 0.0, ""
    g = got.detach().double()
    r = ref64.detach().double()
    finite = torch.isfinite(r)
    if not torch.equal(torch.isfinite(g), finite):
        bad = torch.nonzero(torch.isfinite(g) != finite)[0].tolist()
        return False, float("inf"), 0.0, f"non-finite pattern differs from the reference, first at {bad}"
    err = torch.where(finite, (g - r).abs(), torch.zeros_like(r))
    dt = got.dtype
    if dt in (torch.float32, torch.float64):
        atol = (ATOL_BWD if backward else ATOL)[dt]
        # Relative to the largest reference value: gradients can be large.
        bound = atol * max(1.0, r[finite].abs().max().item() if finite.any() else 1.0)
    else:
        if ref_lp is None:
            raise ValueError(f"a low-precision reference is required for {dt}")
        lp = ref_lp.detach().double()
        err_lp = torch.where(finite, (lp - r).abs(), torch.zeros_like(r))
        bound = (FACTOR_BWD if backward else FACTOR_FWD) * err_lp.max().item() + FLOOR[dt]
    e = err.max().item()
    return e <= bound, e, bound, _where(err)


def assert_close(name: str, got: torch.Tensor, ref64: torch.Tensor, ref_lp: torch.Tensor | None = None,
                 *, backward: bool = False) -> None:
    """Assert ``got`` is within the policy's bound of ``ref64``; the message says where and by how much."""
    ok, err, bound, where = compare(got, ref64, ref_lp, backward=backward)
    assert ok, f"{name} ({got.dtype}): {where}; error {err:.3e} > bound {bound:.3e}"
