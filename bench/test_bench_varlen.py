"""Benchmarks of ``varlen_attention`` (packed batches) against padding: a BERT-like batch (B=16 sequences,
max length 512, H=12, E=64) run three ways on the CPU with 2 threads:

* ``fastattn-varlen``: fastattn.varlen_attention on the packed tokens (no padding computed);
* ``fastattn-padded``: fastattn.scaled_dot_product_attention on the batch padded to 512 with a key-padding
  mask (the mask lets the kernel skip fully padded key blocks, but every padded query row is computed);
* ``torch-padded``: torch.nn.functional.scaled_dot_product_attention on the same padded batch and mask.

Length distributions (all with max 512, so the padded work is the same): ``full`` (every sequence 512),
``bert`` (a log-normal around 128 tokens clipped to [16, 512], one 512: what a BERT fine-tuning batch
of real sentences looks like) and ``short`` (around 48 tokens, one 512). Each row's ``extra_info`` has the
real tokens, the attention pairs sum(L_b^2) and their share of the padded B*512^2, and the effective
GFLOP/s on the real pairs (4 * pairs * H * E flops forward): varlen's time should follow the pairs, the
padded providers' time should not. Not run at import; only the CPU (the GPU path needs CUDA).

    python -m pytest bench/test_bench_varlen.py --benchmark-columns=median,iqr -q
"""
from __future__ import annotations

import math

import pytest
import torch

import fastattn

B, MAXLEN, H, E = 16, 512, 12, 64
THREADS = 2
DISTS = ("full", "bert", "short")
PROVIDERS = ("fastattn-varlen", "fastattn-padded", "torch-padded")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def lengths(dist: str) -> list[int]:
    """B lengths with max MAXLEN, fixed by a seeded generator."""
    if dist == "full":
        return [MAXLEN] * B
    g = torch.Generator().manual_seed(5)
    median = {"bert": 128.0, "short": 48.0}[dist]
    x = torch.exp(math.log(median) + 0.6 * torch.randn(B, generator=g))
    out = x.round().clamp(16, MAXLEN).to(torch.int64).tolist()
    out[0] = MAXLEN
    return out


def make(dist: str, dtype: torch.dtype, grad: bool):
    lens = lengths(dist)
    total = sum(lens)
    q, k, v = (torch.randn(total, H, E, dtype=dtype, requires_grad=grad) for _ in range(3))
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    keep = torch.arange(MAXLEN)[None, :] < torch.tensor(lens)[:, None]  # (B, S): True = real token
    idx = torch.nonzero(keep.flatten()).flatten()

    def padded(x):
        buf = x.new_zeros(B * MAXLEN, H, E)
        buf[idx] = x.detach()
        return buf.view(B, MAXLEN, H, E).transpose(1, 2).requires_grad_(grad)  # (B, H, S, E) view of BSHD

    return lens, (q, k, v, cu), tuple(padded(t) for t in (q, k, v)), keep[:, None, None, :]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_varlen(benchmark, provider, dist, dtype, mode):
    if mode == "fwd+bwd" and dtype != torch.float32:
        pytest.skip("fwd+bwd is measured in float32 only (keeps the run short)")
    torch.set_num_threads(THREADS)
    grad = mode != "fwd"
    lens, (q, k, v, cu), (qp, kp, vp), mask = make(dist, dtype, grad)
    if provider == "fastattn-varlen":
        def fn():
            return fastattn.varlen_attention(q, k, v, cu, cu, MAXLEN, MAXLEN)
    elif provider == "fastattn-padded":
        def fn():
            return fastattn.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
    else:
        def fn():
            return torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)

    def call():
        out = fn()
        if grad:
            out.backward(torch.ones_like(out))

    call()  # warm up
    with torch.inference_mode(False):
        benchmark.group = f"varlen-{dist}-{'f32' if dtype == torch.float32 else 'bf16'}-{mode}"
        benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=0)
    pairs = sum(n * n for n in lens)
    flops = 4.0 * pairs * H * E * (1.0 if mode == "fwd" else 3.5)
    benchmark.extra_info.update(provider=provider, dist=dist, tokens=sum(lens), pairs=pairs,
                                pair_share=pairs / (B * MAXLEN * MAXLEN), threads=THREADS)
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(median_s=median, real_gflops=flops / median / 1e9)
