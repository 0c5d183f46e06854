"""Benchmark of ``scaled_dot_product_attention``: fastattn's backends against torch's SDPA, the naive
reference and, on a GPU, flash_attn and xformers when installed."""
from __future__ import annotations

from typing import Any, Callable

import torch

from fastattn.bench.cases import Case
from fastattn.bench.registry import (Operation, Provider, need_cpu_kernel, need_flash_attn, need_naive_memory,
                                     need_triton_kernel, need_xformers, register)


def _sdpa_inputs(case: Case, requires_grad: bool) -> dict:
    """query (B, H, L, E), key (B, Hk, S, E), value (B, Hk, S, Ev): contiguous, standard normal, fixed seed."""
    dev, dt = torch.device(case.device), case.torch_dtype
    g = torch.Generator(device=dev).manual_seed(1234)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dt).requires_grad_(requires_grad)

    mask = None
    if case.mask == "pad":
        lens = torch.tensor(case.key_lengths(), device=dev)
        mask = (torch.arange(case.S, device=dev)[None, :] < lens[:, None]).view(case.B, 1, 1, case.S)
    elif case.mask != "none":
        raise ValueError(f"unknown mask kind {case.mask!r}")
    return dict(query=r(case.B, case.H, case.L, case.E), key=r(case.B, case.hk, case.S, case.E),
                value=r(case.B, case.hk, case.S, case.ev), attn_mask=mask, is_causal=case.causal,
                enable_gqa=case.hk != case.H)


def _sdpa_fastattn(backend: str) -> Callable[[dict], Any]:
    def fn(x: dict):
        import fastattn
        return fastattn.scaled_dot_product_attention(**x, backend=backend)
    return fn


def _sdpa_torch(x: dict):
    return torch.nn.functional.scaled_dot_product_attention(**x)


def _sdpa_reference(x: dict):
    from fastattn import reference
    return reference.scaled_dot_product_attention(**x, upcast=False)


def _sdpa_flash_attn(x: dict):
    from flash_attn import flash_attn_func  # (B, L, H, E) views of the same memory
    q, k, v = (x[n].transpose(1, 2) for n in ("query", "key", "value"))
    return flash_attn_func(q, k, v, causal=x["is_causal"]).transpose(1, 2)


def _sdpa_xformers(x: dict):
    import xformers.ops as xops
    q, k, v = (x[n].transpose(1, 2) for n in ("query", "key", "value"))
    bias = xops.LowerTriangularMask() if x["is_causal"] else None
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias).transpose(1, 2)


# Shapes. The CPU and the GPU target shapes are the quick set (their reports name the families "issue2" and
# "issue3"); --full adds BERT inference/training, long sequences, the other dtypes and the causal/padded variants.
CPU_TARGET_SHAPES = [(8, 12, 128, 64), (8, 12, 512, 64), (16, 12, 64, 32)]           # (B, H, L=S, E)
GPU_TARGET_SHAPES = [(8, 12, 128, 64), (8, 12, 512, 64), (4, 16, 1024, 128), (4, 16, 4096, 128)]


def _sdpa_cases() -> list[Case]:
    cases: list[Case] = []

    def add(B, H, L, E, suites, *, S=None, **kw):
        cases.append(Case("sdpa", B, H, L, L if S is None else S, E, suites=tuple(suites), **kw))

    q, f = ("quick", "full"), ("full",)
    # ---- CPU: the target shapes (quick), then the rest (full)
    for B, H, L, E in CPU_TARGET_SHAPES:
        add(B, H, L, E, q, family="issue2", dtype="f32")
        add(B, H, L, E, q, family="issue2", dtype="bf16")
        add(B, H, L, E, q, family="issue2", dtype="f32", mask="pad")
        add(B, H, L, E, q, family="issue2", dtype="f32", mode="fwd+bwd")
        add(B, H, L, E, f, family="issue2", dtype="f16")
        add(B, H, L, E, f, family="issue2", dtype="f32", causal=True)
        add(B, H, L, E, f, family="issue2", dtype="bf16", mask="pad")
        add(B, H, L, E, f, family="issue2", dtype="bf16", mode="fwd+bwd")
    for dt in ("f32", "bf16"):  # a third point for the throughput-against-length plot of the quick run
        add(8, 12, 256, 64, q, family="sweep", dtype=dt)
    for dt in ("f32", "bf16"):
        add(1, 1, 16, 32, f, family="call", dtype=dt)  # almost no work: the cost of a call itself
        for L in (128, 384, 512):
            add(1, 12, L, 64, f, family="bert-base-infer", dtype=dt)
        for L in (128, 512):
            add(1, 16, L, 64, f, family="bert-large-infer", dtype=dt)
        add(32, 12, 128, 64, f, family="bert-base-train", dtype=dt, mode="fwd+bwd")
        add(32, 12, 128, 64, f, family="bert-base-train", dtype=dt, mode="fwd+bwd", mask="pad")
        add(8, 16, 512, 64, f, family="bert-large-train", dtype=dt, mode="fwd+bwd")
        for L in (1024, 2048, 4096):
            add(1, 12, L, 64, f, family="long", dtype=dt)
            add(1, 12, L, 64, f, family="long", dtype=dt, causal=True)
        add(1, 12, 2048, 64, f, family="long", dtype=dt, causal=True, mode="fwd+bwd")
    # ---- CPU: the long-sequence memory check (fresh subprocess per call)
    for mode in ("fwd", "fwd+bwd"):
        add(1, 4, 16384, 64, ("memory",), family="memory", causal=True, mode=mode, mem_limit_mib=64.0)
    # ---- GPU: the target shapes (quick), the rest (full)
    for B, H, L, E in GPU_TARGET_SHAPES:
        for dt in ("bf16", "f16"):
            for var in (dict(), dict(causal=True), dict(mask="pad")):
                for mode in ("fwd", "fwd+bwd"):
                    add(B, H, L, E, q if dt == "bf16" or not var else f, family="issue3", device="cuda",
                        dtype=dt, mode=mode, **var)
        add(B, H, L, E, f, family="issue3", device="cuda", dtype="f32")
    for dt in ("bf16", "f16"):
        for L in (8192, 16384):
            add(1, 16, L, 128, f, family="long", device="cuda", dtype=dt, causal=True)
            add(1, 16, L, 128, f, family="long", device="cuda", dtype=dt, causal=True, mode="fwd+bwd")
        add(32, 12, 128, 64, f, family="bert-base-train", device="cuda", dtype=dt, mode="fwd+bwd", mask="pad")
        add(8, 16, 512, 64, f, family="bert-large-train", device="cuda", dtype=dt, mode="fwd+bwd")
    add(1, 4, 16384, 64, ("memory",), family="memory", device="cuda", dtype="bf16", causal=True,
        mem_limit_mib=64.0)
    return cases


register(Operation(
    name="sdpa",
    description="scaled_dot_product_attention(q, k, v, attn_mask, is_causal)",
    cases=_sdpa_cases,
    inputs=_sdpa_inputs,
    providers=[
        Provider("torch", _sdpa_torch),
        Provider("fastattn-cpu", _sdpa_fastattn("cpu"), need_cpu_kernel, devices=("cpu",)),
        Provider("fastattn-triton", _sdpa_fastattn("triton"), need_triton_kernel, devices=("cuda",)),
        Provider("flash_attn", _sdpa_flash_attn, need_flash_attn, devices=("cuda",)),
        Provider("xformers", _sdpa_xformers, need_xformers, devices=("cuda",)),
        Provider("reference", _sdpa_reference, need_naive_memory),
    ],
))
