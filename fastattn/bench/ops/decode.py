"""Benchmark of decoding: one new query row per sequence against a long KV cache, through
``fastattn.scaled_dot_product_attention`` (the drop-in a user calls, which routes decode-shaped inference calls
to the decode kernel) against ``torch.nn.functional.scaled_dot_product_attention`` on the same tensors
(q (B, H, 1, E), k / v (B, Hk, S, E), ``enable_gqa`` where Hk < H, no grad). Two more fastattn providers read
the same keys and values through ``fastattn.attention_with_kvcache`` from the caches decoders keep:
flash-attention's (B, S, Hk, E) layout ("fastattn-kvcache") and a paged pool of 16-key pages in shuffled order
behind a block table, vLLM's layout ("fastattn-paged").

Decoding reads every key and value once and does 4 FLOPs per element read: it is bound by memory, so besides
the FLOP rates the report gives the bytes of K and V read per call, the GB/s that makes, and its share of the
machine's read bandwidth, probed in the case's own rounds beside the providers (``timing.ReadProbe``). The
naive reference runs too (at L = 1 its (B, H, 1, S) scores are small), except on caches over 64 MiB, which it
copies per call.
"""
from __future__ import annotations

import torch

from fastattn.bench.cases import Case
from fastattn.bench.registry import Operation, Provider, need_cpu_kernel, need_naive_memory, register

# (B, H, Hk, S, E, dtype): the decode targets (Llama-style GQA 32/8, head dim 128; one MHA case).
TARGET_CASES = [
    (1, 32, 8, 4096, 128, "bf16"),
    (1, 32, 8, 4096, 128, "f32"),
    (8, 32, 8, 1024, 128, "bf16"),
    (1, 32, 8, 32768, 128, "bf16"),
    (4, 32, 32, 2048, 128, "bf16"),
]


def _cases() -> list[Case]:
    return [Case("decode", B, H, 1, S, E, dtype=dt, Hk=Hk, family="decode", suites=("quick", "full"))
            for B, H, Hk, S, E, dt in TARGET_CASES]


def _inputs(case: Case, requires_grad: bool) -> dict:
    """query (B, H, L, E), key (B, Hk, S, E), value (B, Hk, S, Ev): contiguous, standard normal, fixed seed."""
    if requires_grad:
        raise ValueError("decode cases are inference only (mode 'fwd')")
    dev, dt = torch.device(case.device), case.torch_dtype
    g = torch.Generator(device=dev).manual_seed(1234)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dt)

    x = dict(query=r(case.B, case.H, case.L, case.E), key=r(case.B, case.hk, case.S, case.E),
             value=r(case.B, case.hk, case.S, case.ev), enable_gqa=case.hk != case.H)
    # The kv-cache providers' copies: (B, S, Hk, E) caches, and pools of PAGE-key pages in shuffled order with
    # the block table that finds them.
    x["q_bshd"] = x["query"].transpose(1, 2).contiguous()
    x["k_bshd"], x["v_bshd"] = (x[n].transpose(1, 2).contiguous() for n in ("key", "value"))
    x["seqlens"] = torch.full((case.B,), case.S, dtype=torch.int32, device=dev)
    pages = -(-case.S // PAGE)
    order = torch.randperm(case.B * pages, generator=g, device=dev)
    x["block_table"] = order.to(torch.int32).reshape(case.B, pages)
    for n in ("k", "v"):
        flat = x[f"{n}_bshd"]
        padded = flat.new_zeros(case.B, pages * PAGE, *flat.shape[2:])
        padded[:, :case.S] = flat
        pool = torch.empty_like(padded.reshape(case.B * pages, PAGE, *flat.shape[2:]))
        pool[order.long()] = padded.reshape(case.B * pages, PAGE, *flat.shape[2:])
        x[f"{n}_pages"] = pool
    return x


PAGE = 16  # keys per page of the paged provider (vLLM's default block size)


def _fastattn(x: dict):
    import fastattn
    with torch.no_grad():
        return fastattn.scaled_dot_product_attention(x["query"], x["key"], x["value"], enable_gqa=x["enable_gqa"])


def _kvcache(x: dict):
    import fastattn
    return fastattn.attention_with_kvcache(x["q_bshd"], x["k_bshd"], x["v_bshd"], x["seqlens"], causal=False)


def _paged(x: dict):
    import fastattn
    return fastattn.attention_with_kvcache(x["q_bshd"], x["k_pages"], x["v_pages"], x["seqlens"],
                                           block_table=x["block_table"], causal=False)


def _torch(x: dict):
    with torch.no_grad():
        return torch.nn.functional.scaled_dot_product_attention(x["query"], x["key"], x["value"],
                                                                enable_gqa=x["enable_gqa"])


def _reference(x: dict):
    from fastattn import reference
    return reference.scaled_dot_product_attention(x["query"], x["key"], x["value"], enable_gqa=x["enable_gqa"],
                                                  upcast=False)


def _reference_why_not(case: Case) -> str | None:
    """The naive reference widens the whole cache to float (and repeats it per GQA group): seconds per call for
    the long cases, which would only slow the run down."""
    if kv_bytes(case) > 64 * 2**20:
        return f"the naive reference copies the {kv_bytes(case) / 2**20:.0f} MiB cache per call (seconds)"
    return need_naive_memory(case)


def kv_bytes(case: Case) -> float:
    """Bytes of K and V one call reads: every key and value row of every kv head, once."""
    return float(case.B * case.hk * case.S * (case.E + case.ev) * torch.finfo(case.torch_dtype).bits // 8)


register(Operation(
    name="decode",
    description="scaled_dot_product_attention of one query row against a long KV cache (GQA), memory-bound",
    cases=_cases,
    inputs=_inputs,
    providers=[
        Provider("torch", _torch, devices=("cpu",)),
        Provider("fastattn-cpu", _fastattn, need_cpu_kernel, devices=("cpu",)),
        Provider("fastattn-kvcache", _kvcache, need_cpu_kernel, devices=("cpu",)),
        Provider("fastattn-paged", _paged, need_cpu_kernel, devices=("cpu",)),
        Provider("reference", _reference, _reference_why_not, devices=("cpu",)),
    ],
    bytes_read=kv_bytes,
    in_default_run=False,
))
