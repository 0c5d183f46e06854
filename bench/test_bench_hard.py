"""Benchmarks of ``fastattn.hard_attention`` (forward) on CPU: the fused C++ kernel against the naive
reference (full scores + stable sort, in the input precision) and torch's SDPA (dense softmax attention,
the cost of ordinary attention at the same shape; not the same function).

    python -m pytest bench/test_bench_hard.py -s                       # B=8 H=12 E=64, fp32
    python -m pytest bench/test_bench_hard.py -s -k "L512"             # the short half

Cases: L = S in {512, 2048}, top_k in {1, 8}. Rounds are few on purpose (the naive reference at
L = 2048 materialises and sorts 8 * 12 * 2048 * 2048 scores). Each case prints the median time, and
``test_hard_memory`` prints the peak resident-memory growth of one call (fused vs naive) at the
largest shape. Nothing runs at import or collection time.
"""
from __future__ import annotations

import time

import pytest
import torch

import fastattn
from fastattn import bench as fb
from fastattn import reference as R

B, H, E = 8, 12, 64
LENGTHS = (512, 2048)
TOP_KS = (1, 8)
PROVIDERS = ("fastattn-cpu", "naive", "torch-sdpa")


def _inputs(L: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, L, E, generator=g) for _ in range(3)]


def _call(provider: str, q, k, v, top_k: int):
    if provider == "fastattn-cpu":
        return lambda: fastattn.hard_attention(q, k, v, top_k=top_k, backend="cpu")
    if provider == "naive":
        return lambda: R.hard_attention(q, k, v, top_k=top_k, upcast=False)
    if provider == "torch-sdpa":
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    raise ValueError(provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("top_k", TOP_KS, ids=lambda k: f"K{k}")
@pytest.mark.parametrize("L", LENGTHS, ids=lambda n: f"L{n}")
def test_hard(benchmark, L, top_k, provider):
    if provider == "torch-sdpa" and top_k != TOP_KS[0]:
        pytest.skip("SDPA has no top_k: timed once per length")
    q, k, v = _inputs(L)
    fn = _call(provider, q, k, v, top_k)
    slow = L > 512 and provider == "naive"  # ~a minute per call on 2 cores: one cold call
    rounds = 5 if L <= 512 else (1 if slow else 3)
    benchmark.group = f"B{B}-H{H}-L{L}-S{L}-E{E}-f32-K{top_k}"
    benchmark.extra_info.update(B=B, H=H, L=L, S=L, E=E, top_k=top_k, dtype="f32", provider=provider,
                                torch_threads=torch.get_num_threads())
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0 if slow else 1)
    if benchmark.stats is not None:
        print(f"\n{benchmark.group} {provider}: median {benchmark.stats.stats.median * 1e3:.1f} ms")


@pytest.mark.parametrize("provider", ["fastattn-cpu", "naive"])
@pytest.mark.parametrize("top_k", [max(TOP_KS)], ids=lambda k: f"K{k}")
def test_hard_memory(top_k, provider, record_property):
    """Peak RSS growth of one forward call at the largest shape (fused: the output and the saved
    indices/probabilities; naive: the (B, H, L, S) scores and their sort)."""
    if (why := fb.cpu_memory_supported()) is not None:
        pytest.skip(why)
    L = max(LENGTHS)
    q, k, v = _inputs(L)
    t0 = time.perf_counter()
    peak, kept = fb.peak_memory(_call(provider, q, k, v, top_k), "cpu")
    dt = time.perf_counter() - t0
    print(f"\nB{B}-H{H}-L{L}-S{L}-E{E}-f32-K{top_k} {provider}: peak {peak / fb.MIB:.1f} MiB, "
          f"returned {kept / fb.MIB:.1f} MiB, one cold call {dt:.2f} s")
    record_property("peak_mib", peak / fb.MIB)
