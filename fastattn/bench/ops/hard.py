"""Benchmark of ``hard_attention`` (forward) on CPU: the fused C++ kernel against the naive reference (full
scores and a stable sort, in the input precision) and torch's SDPA (dense softmax attention: the cost of
ordinary attention at the same shape, not the same function).

Cases: B=8 H=12 E=64 float32, L = S = 512 (quick) and 2048 (full, where the naive reference materialises and
sorts 8 * 12 * 2048 * 2048 scores, ~a minute per call on 2 cores), top_k in {1, 8}. The memory check
(``--memory``) runs top_k=8 at 2048, each call in a fresh process. FLOPs: the one formula (softmax
attention's QK^T and PV), so the GFLOP/s compare with SDPA's at the same shape.
"""
from __future__ import annotations

import torch

from fastattn.bench.cases import Case
from fastattn.bench.registry import Operation, Provider, need_cpu_kernel, need_memory, register

B, H, E = 8, 12, 64


def _cases() -> list[Case]:
    cases = []
    for L, suites in ((512, ("quick", "full")), (2048, ("full",))):
        for k in (1, 8):
            cases.append(Case("hard", B, H, L, L, E, top_k=k, family="hard", suites=suites))
    cases.append(Case("hard", B, H, 2048, 2048, E, top_k=8, family="hard", suites=("memory",)))
    return cases


def _inputs(case: Case, requires_grad: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(case.B, case.H, n, case.E, generator=g).to(case.torch_dtype).requires_grad_(requires_grad)
               for n in (case.L, case.S, case.S))
    return dict(query=q, key=k, value=v, top_k=case.top_k)


def _fastattn(x: dict):
    import fastattn
    return fastattn.hard_attention(x["query"], x["key"], x["value"], top_k=x["top_k"], backend="cpu")


def _reference(x: dict):
    from fastattn import reference
    return reference.hard_attention(x["query"], x["key"], x["value"], top_k=x["top_k"], upcast=False)


def _torch(x: dict):
    return torch.nn.functional.scaled_dot_product_attention(x["query"], x["key"], x["value"])


def _need_naive_memory(case: Case) -> str | None:
    """The naive reference holds the (B, H, L, S) scores and their sort (values and int64 indices): ~5x."""
    per = case.B * case.H * case.L * case.S * torch.finfo(case.torch_dtype).bits // 8
    return need_memory(5 * per, "the naive reference")


register(Operation(
    name="hard",
    description="hard_attention(q, k, v, top_k): each query's top_k keys, softmax over those only",
    cases=_cases,
    inputs=_inputs,
    providers=[
        Provider("torch", _torch, devices=("cpu",)),
        Provider("fastattn-cpu", _fastattn, need_cpu_kernel, devices=("cpu",)),
        Provider("reference", _reference, _need_naive_memory, devices=("cpu",)),
    ],
    in_default_run=False,
))
