"""Benchmark of ``varlen_attention`` (packed batches) against padding: a BERT-like batch (B=16 sequences,
max length 512, H=12, E=64) on the CPU, run three ways:

* ``fastattn-cpu``: ``fastattn.varlen_attention`` on the packed tokens (no padding computed);
* ``fastattn-cpu-padded``: ``fastattn.scaled_dot_product_attention`` on the batch padded to 512 with a
  key-padding mask (the kernel skips fully padded key blocks, but computes every padded query row);
* ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` on the same padded batch and mask.

The case's ``mask`` names the length distribution, all with max 512 (so the padded work is the same):
"none" (every sequence 512), "bert" (log-normal around 128 tokens clipped to [16, 512], one 512: a BERT
fine-tuning batch of real sentences) and "short" (around 48 tokens, one 512). FLOPs count the real pairs
sum(L_b^2) only, for every provider: varlen's time should follow them, the padded providers' should not.
"""
from __future__ import annotations

import math

import torch

from fastattn.bench.cases import Case, attention_flops
from fastattn.bench.registry import Operation, Provider, need_cpu_kernel, register

B, MAXLEN, H, E = 16, 512, 12, 64
MEDIAN_LENGTH = {"bert": 128.0, "short": 48.0}


def lengths(case: Case) -> list[int]:
    """The B sequence lengths (max S) of ``case``'s distribution, fixed by a seeded generator."""
    if case.mask == "none":
        return [case.S] * case.B
    g = torch.Generator().manual_seed(5)
    x = torch.exp(math.log(MEDIAN_LENGTH[case.mask]) + 0.6 * torch.randn(case.B, generator=g))
    out = x.round().clamp(16, case.S).to(torch.int64).tolist()
    out[0] = case.S
    return out


def _cases() -> list[Case]:
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        for dt in ("f32", "bf16"):
            if mode == "fwd+bwd" and dt != "f32":  # forward+backward in float32 only (keeps the run short)
                continue
            for dist in ("none", "bert", "short"):
                cases.append(Case("varlen", B, H, MAXLEN, MAXLEN, E, dtype=dt, mode=mode, mask=dist, family="varlen",
                                  suites=("quick", "full")))
    return cases


def _inputs(case: Case, requires_grad: bool) -> dict:
    """Packed query/key/value (total, H, E) with int32 cumulative lengths, and the same tokens padded to
    (B, H, S, E) views of a (B, S, H, E) buffer with a bool (B, 1, 1, S) key-padding mask (True = real)."""
    lens = lengths(case)
    total = sum(lens)
    g = torch.Generator().manual_seed(1234)
    q, k, v = (torch.randn(total, case.H, case.E, generator=g).to(case.torch_dtype).requires_grad_(requires_grad)
               for _ in range(3))
    cu = torch.zeros(case.B + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    keep = torch.arange(case.S)[None, :] < torch.tensor(lens)[:, None]  # (B, S): True = real token
    idx = torch.nonzero(keep.flatten()).flatten()

    def padded(x):
        buf = x.new_zeros(case.B * case.S, case.H, case.E)
        buf[idx] = x.detach()
        return buf.view(case.B, case.S, case.H, case.E).transpose(1, 2).requires_grad_(requires_grad)

    qp, kp, vp = (padded(t) for t in (q, k, v))
    return dict(query=q, key=k, value=v, cu_seqlens=cu, max_seqlen=case.S,
                query_padded=qp, key_padded=kp, value_padded=vp, attn_mask=keep[:, None, None, :])


def _varlen(x: dict):
    import fastattn
    return fastattn.varlen_attention(x["query"], x["key"], x["value"], x["cu_seqlens"], x["cu_seqlens"],
                                     x["max_seqlen"], x["max_seqlen"], backend="cpu")


def _fastattn_padded(x: dict):
    import fastattn
    return fastattn.scaled_dot_product_attention(x["query_padded"], x["key_padded"], x["value_padded"],
                                                 attn_mask=x["attn_mask"], backend="cpu")


def _torch_padded(x: dict):
    return torch.nn.functional.scaled_dot_product_attention(x["query_padded"], x["key_padded"], x["value_padded"],
                                                            attn_mask=x["attn_mask"])


def _flops(case: Case) -> float:
    lens = lengths(case)
    return attention_flops(case.H, case.E, case.ev, lens, lens, mode=case.mode)


PADDED = ("query_padded", "key_padded", "value_padded")

register(Operation(
    name="varlen",
    description="varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, ...) against SDPA on the padded batch",
    cases=_cases,
    inputs=_inputs,
    providers=[
        Provider("torch", _torch_padded, devices=("cpu",), grad_inputs=PADDED),
        Provider("fastattn-cpu", _varlen, need_cpu_kernel, devices=("cpu",)),
        Provider("fastattn-cpu-padded", _fastattn_padded, need_cpu_kernel, devices=("cpu",), grad_inputs=PADDED),
    ],
    flops=_flops,
    in_default_run=False,
))
