"""Benchmark of ``additive_attention`` (Bahdanau): the fused CPU kernel against the naive reference
(``fastattn.reference.additive_attention(upcast=False)``, which builds the (B, H, L, S, D) tanh tensor).

Cases: B=1, H=1, D=8 (the case's E), Ev=64, float32 on CPU, L = S in {512, 2048} (quick) and 8192 (full),
forward; forward + backward of all four inputs at 512 and 2048 (the naive backward at 8192 keeps several
2 GiB tensors). The memory check (``--memory``) runs the same shapes, each call in a fresh process.

FLOPs: the one formula, ``2 * (D + Ev)`` per pair: the weighted sum over ``tanh(q + k)`` counts as the
score's D multiply-adds, as QK^T's do in SDPA; tanh is not counted, as softmax is not.
"""
from __future__ import annotations

import torch

from fastattn.bench.cases import Case
from fastattn.bench.registry import Operation, Provider, need_cpu_kernel, need_memory, register

B, H, D, EV = 1, 1, 8, 64


def _cases() -> list[Case]:
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        for n in (512, 2048, 8192):
            if mode == "fwd+bwd" and n > 2048:
                continue
            for suites in ((("quick", "full") if n <= 2048 else ("full",)), ("memory",)):
                cases.append(Case("additive", B, H, n, n, D, Ev=EV, mode=mode, family="additive", suites=suites))
    return cases


def _inputs(case: Case, requires_grad: bool) -> dict:
    """query (B, H, L, D), key (B, H, S, D), value (B, H, S, Ev), weight (H, D) / sqrt(D): fixed seed."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(case.B, case.H, case.L, case.E, generator=g)
    k = torch.randn(case.B, case.H, case.S, case.E, generator=g)
    v = torch.randn(case.B, case.H, case.S, case.ev, generator=g)
    w = torch.randn(case.H, case.E, generator=g) / case.E ** 0.5
    x = [t.to(case.torch_dtype).requires_grad_(requires_grad) for t in (q, k, v, w)]
    return dict(zip(("query", "key", "value", "weight"), x))


def _fastattn(x: dict):
    import fastattn
    return fastattn.additive_attention(x["query"], x["key"], x["value"], x["weight"], backend="cpu")


def _reference(x: dict):
    from fastattn import reference
    return reference.additive_attention(x["query"], x["key"], x["value"], x["weight"], upcast=False)


def _need_naive_memory(case: Case) -> str | None:
    """The naive forward holds about three (B, H, L, S, D) tensors, its backward about eight."""
    per = case.B * case.H * case.L * case.S * case.E * torch.finfo(case.torch_dtype).bits // 8
    return need_memory((3 if case.mode == "fwd" else 8) * per, "the naive reference")


register(Operation(
    name="additive",
    description="additive_attention(q, k, v, weight): s_ij = sum_d weight[h, d] tanh(q_id + k_jd)",
    cases=_cases,
    inputs=_inputs,
    providers=[
        Provider("fastattn-cpu", _fastattn, need_cpu_kernel, devices=("cpu",)),
        Provider("reference", _reference, _need_naive_memory, devices=("cpu",)),
    ],
    grad_inputs=("query", "key", "value", "weight"),
    in_default_run=False,
))
