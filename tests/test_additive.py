"""Additive (Bahdanau) attention: the C++ kernels (every ISA module), the Triton kernels under the
interpreter, the custom ops and the ``fastattn.nn.AdditiveAttention`` layer, against the float64
reference ``fastattn.reference.additive_attention`` under the tolerance policy (fastattn.testing).

Shape legend: B batch, H heads, L query length, S key length, D hidden (score) dim, Ev value dim.
"""
from __future__ import annotations


import pytest
import torch

import fastattn
from fastattn import _cpu, additive, reference as R
from fastattn.testing import assert_close
from conftest import DTYPE_IDS, isa_module, isa_params, padding_mask, randn_heads, triton_kernels

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def _make(B, H, L, S, D, Ev, dtype, gen, layout="bhsd"):
    """q, k, v, weight and a dout; "bshd" gives (B, H, N, D) views of (B, N, H, D) buffers."""
    q, k, v, dout = (randn_heads(B, H, n, e, dtype, gen=gen, bshd=layout == "bshd")
                     for n, e in ((L, D), (S, D), (S, Ev), (L, Ev)))
    w = torch.randn(H, D, generator=gen).to(dtype)
    return q, k, v, w, dout


def _mask(kind, B, H, L, S, dtype, gen):
    if kind == "none":
        return None
    if kind == "bool":  # (B, H, L, S)
        return torch.rand(B, H, L, S, generator=gen) > 0.35
    if kind == "pad":  # (B, 1, 1, S) key padding; batch element 0 keeps one key only
        return padding_mask([1] + [S] * (B - 1), S)
    if kind == "dead":  # (B, 1, L, S) bool, some query rows see no key at all
        m = torch.rand(B, 1, L, S, generator=gen) > 0.3
        m[:, :, ::3] = False
        return m
    if kind == "float":  # (1, 1, L, S) additive bias with -inf entries and a fully hidden row
        m = torch.randn(1, 1, L, S, generator=gen)
        m[torch.rand(1, 1, L, S, generator=gen) < 0.2] = float("-inf")
        m[..., L // 2, :] = float("-inf")
        return m.to(dtype)
    if kind == "float32":  # float32 (L, S) mask with low-precision inputs
        return torch.randn(L, S, generator=gen)
    raise ValueError(kind)


def _reference(q, k, v, w, mask, causal, dout, upcast):
    """(out, lse, dq, dk, dv, dw) of the naive reference (float64 when upcast, else the input dtype)."""
    dt = torch.float64 if upcast else q.dtype
    xs = [x.detach().to(dt).requires_grad_() for x in (q, k, v, w)]
    out, lse = R.additive_attention(*xs, mask, causal, upcast=upcast, return_lse=True)
    grads = torch.autograd.grad(out, xs, dout.to(out.dtype))
    return (out.detach(), lse, *grads)


def _compare(got, q, k, v, w, mask, causal, dout):
    """got = (out, lse, dq, dk, dv, dw) of a kernel; checks every one under the policy."""
    ref = _reference(q, k, v, w, mask, causal, dout, upcast=True)
    lp = _reference(q, k, v, w, mask, causal, dout, upcast=False) if q.dtype not in (F32, F64) else [None] * 6
    names = ("out", "lse", "dq", "dk", "dv", "dweight")
    for i, (name, g, r64, rlp) in enumerate(zip(names, got, ref, lp)):
        if g is None:
            continue
        assert g.shape == r64.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r64.shape)}"
        want_dtype = torch.float32 if name == "lse" else q.dtype
        assert g.dtype == want_dtype, f"{name}: dtype {g.dtype} != {want_dtype}"
        assert_close(name, g, r64, None if name == "lse" else rlp, backward=i >= 2)


def _run_public(q, k, v, w, mask, causal, dout, backend):
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v, w)]
    out, lse = fastattn.additive_attention(*xs, mask, causal, backend=backend, return_lse=True)
    grads = torch.autograd.grad(out, xs, dout)
    return (out.detach(), lse, *grads)


# ----------------------------------------------------------------------------------------------------
# C++ kernels through the public API
# ----------------------------------------------------------------------------------------------------
SHAPES = {  # B, H, L, S, D, Ev
    "B2-H3-L37-S29-D7-Ev11": (2, 3, 37, 29, 7, 11),
    "B1-H2-L20-S45-D13-Ev16": (1, 2, 20, 45, 13, 16),
    "B2-H1-L1-S1-D1-Ev1": (2, 1, 1, 1, 1, 1),
    "B1-H2-L50-S17-D8-Ev64": (1, 2, 50, 17, 8, 64),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask", ["none", "bool", "pad", "dead", "float"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=lambda d: DTYPE_IDS[d])
def test_cpu(dtype, shape, mask, causal):
    gen = torch.Generator().manual_seed(0)
    B, H, L, S, D, Ev = SHAPES[shape]
    q, k, v, w, dout = _make(B, H, L, S, D, Ev, dtype, gen)
    m = _mask(mask, B, H, L, S, dtype, gen)
    _compare(_run_public(q, k, v, w, m, causal, dout, "cpu"), q, k, v, w, m, causal, dout)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: DTYPE_IDS[d])
def test_cpu_views_batchless_float32_mask(dtype):
    """Transposed (B, N, H, D) views, a float32 (L, S) mask on low-precision inputs, no batch dims."""
    gen = torch.Generator().manual_seed(1)
    q, k, v, w, dout = _make(1, 3, 21, 33, 6, 10, dtype, gen, layout="bshd")
    m = _mask("float32", 1, 3, 21, 33, dtype, gen)
    q, k, v, dout = q[0], k[0], v[0], dout[0]
    _compare(_run_public(q, k, v, w, m, True, dout, "cpu"), q, k, v, w, m, True, dout)


@pytest.mark.parametrize("isa", isa_params(needs="additive_fwd"))
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=lambda d: DTYPE_IDS[d])
def test_cpu_isa_modules(isa, dtype):
    """Every ISA module's launcher directly (_cpu._additive_fwd / _additive_bwd(mod, ...)), with long rows that
    cross several vectors and a tail; the backward is bit-identical for 1 and 2 threads."""
    mod = isa_module(isa)
    gen = torch.Generator().manual_seed(2)
    B, H, L, S, D, Ev = 2, 2, 67, 53, 9, 19
    q, k, v, w, dout = _make(B, H, L, S, D, Ev, dtype, gen)
    m = _mask("dead", B, H, L, S, dtype, gen)
    out, lse = _cpu._additive_fwd(mod, q, k, v, w, m, True)
    grads = _cpu._additive_bwd(mod, dout, q, k, v, w, out, lse, m, True)
    _compare((out, lse, *grads), q, k, v, w, m, True, dout)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        grads1 = _cpu._additive_bwd(mod, dout, q, k, v, w, out, lse, m, True)
        torch.set_num_threads(2)
        grads2 = _cpu._additive_bwd(mod, dout, q, k, v, w, out, lse, m, True)
    finally:
        torch.set_num_threads(n)
    for a, b, c in zip(grads, grads1, grads2):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("x", [0.0, 1e-6, -3e-3, 0.3, -0.6249, 0.625, 0.7, -1.5, 4.0, -8.9, 9.5, 30.0, -100.0])
def test_cpu_tanh_accuracy(x):
    """The vectorised tanh: with D = 1, w = 1, k = 0 and one key, lse = tanh(q) (+ log of the kernel's e^0,
    itself within 1.2e-7 of 0), so the error is at most ~2.5e-7 relative to max(|tanh|, 1)."""
    q = torch.full((1, 1, 1, 1), x)
    k = torch.zeros(1, 1, 1, 1)
    w = torch.ones(1, 1)
    grid = torch.linspace(-3, 3, 601).view(1, 1, 601, 1) + x
    for qq in (q, grid):
        # With one key, lse is the score itself.
        _, lse = _cpu._additive_fwd(_cpu.module(), qq, k, torch.ones(1, 1, 1, 1), w, None, False)
        want = torch.tanh(qq.double()).view(-1)
        err = (lse.double().view(-1) - want).abs() / want.abs().clamp_min(1.0)
        assert err.max().item() < 2.5e-7, f"tanh({x}): error {err.max().item():.2e}"


def test_gradcheck_f64():
    gen = torch.Generator().manual_seed(3)
    q, k, v, w, _ = _make(1, 2, 5, 4, 3, 2, F64, gen)
    m = torch.rand(1, 1, 5, 4, generator=gen) > 0.3
    m[0, 0, 1] = False
    xs = [x.requires_grad_() for x in (q, k, v, w)]
    f = lambda *a: fastattn.additive_attention(*a, attn_mask=m, is_causal=True, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(f, xs)


def test_reference_backend_matches():
    gen = torch.Generator().manual_seed(4)
    q, k, v, w, dout = _make(2, 2, 9, 7, 5, 3, F32, gen)
    _compare(_run_public(q, k, v, w, None, True, dout, "reference"), q, k, v, w, None, True, dout)


def test_empty_inputs():
    gen = torch.Generator().manual_seed(5)
    for L, S in ((0, 5), (4, 0)):
        q, k, v, w, _ = _make(1, 2, L, S, 3, 4, F32, gen)
        xs = [x.requires_grad_() for x in (q, k, v, w)]
        out, lse = fastattn.additive_attention(*xs, return_lse=True)
        assert out.shape == (1, 2, L, 4) and not out.any()
        assert torch.isneginf(lse).all()
        out.sum().backward()
        assert all(x.grad is not None and not x.grad.any() for x in xs)


def test_inputs_not_modified_and_deterministic():
    gen = torch.Generator().manual_seed(6)
    q, k, v, w, dout = _make(1, 2, 33, 41, 8, 16, F32, gen)
    m = _mask("float", 1, 2, 33, 41, F32, gen)
    before = [x.clone() for x in (q, k, v, w, m, dout)]
    r1 = _run_public(q, k, v, w, m, False, dout, "cpu")
    r2 = _run_public(q, k, v, w, m, False, dout, "cpu")
    for a, b in zip(before, (q, k, v, w, m, dout)):
        assert torch.equal(a, b)
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)


def test_opcheck():
    gen = torch.Generator().manual_seed(7)
    q, k, v, w, dout = _make(2, 2, 9, 11, 5, 6, F32, gen)
    mask = torch.rand(2, 1, 1, 11, generator=gen) > 0.2
    xs = [x.requires_grad_() for x in (q, k, v, w)]
    torch.library.opcheck(additive.additive_fwd, (*xs, mask, True, "cpu"))
    out, lse = additive.additive_fwd(q.detach(), k.detach(), v.detach(), w.detach(), mask, True, "cpu")
    from fastattn._ops import additive as additive_ops
    torch.library.opcheck(additive_ops.additive_bwd, (dout, q.detach(), k.detach(), v.detach(), w.detach(), out, lse,
                                                      mask, True, "cpu"))


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
def _bad_cases():
    q, k, v, w = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 6, 5), torch.randn(2, 3, 6, 7), torch.randn(3, 5)
    return {
        "weight-shape": ((q, k, v, torch.randn(3, 4)), {}, ValueError, "weight must have shape"),
        "weight-dtype": ((q, k, v, w.double()), {}, TypeError, "weight dtype"),
        "weight-not-tensor": ((q, k, v, [1.0]), {}, TypeError, "weight must be a torch.Tensor"),
        "key-hidden-dim": ((q, torch.randn(2, 3, 6, 4), v, w), {}, ValueError, "same D"),
        "value-length": ((q, k, torch.randn(2, 3, 5, 7), w), {}, ValueError, "value length"),
        "heads": ((q, torch.randn(2, 1, 6, 5), torch.randn(2, 1, 6, 7), w), {}, ValueError, "batch/head dims"),
        "dtype": ((q, k.double(), v, w), {}, TypeError, "key dtype"),
        "int-query": ((q.int(), k, v, w), {}, TypeError, "query must be"),
        "mask-shape": ((q, k, v, w), {"attn_mask": torch.ones(4, 5, dtype=torch.bool)}, ValueError, "broadcast"),
        "mask-dtype": ((q, k, v, w), {"attn_mask": torch.ones(4, 6, dtype=torch.int64)}, TypeError, "attn_mask"),
        "causal-type": ((q, k, v, w), {"is_causal": 1}, TypeError, "is_causal"),
        "backend": ((q, k, v, w), {"backend": "gpu"}, ValueError, "backend"),
        "valid-call": ((q, k, v, w), {"backend": "cpu"}, None, None),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input(case):
    args, kw, exc, match = _bad_cases()[case]
    if exc is None:  # a valid call for contrast
        fastattn.additive_attention(*args, **kw)
        return
    with pytest.raises(exc, match=match):
        fastattn.additive_attention(*args, **kw)


# ----------------------------------------------------------------------------------------------------
# nn.AdditiveAttention
# ----------------------------------------------------------------------------------------------------
def _module_reference(mod, query, key, value, mask, causal):
    """The layer's math spelled out with the float64 reference."""
    B, L, _ = query.shape
    S = key.shape[1]
    H, D = mod.num_heads, mod.head_dim
    q = mod.q_proj(query).view(B, L, H, D).transpose(1, 2)
    k = mod.k_proj(key).view(B, S, H, D).transpose(1, 2)
    v = value.view(B, S, H, -1).transpose(1, 2)
    out = R.additive_attention(q, k, v, mod.weight, mask, causal)
    probs = R.additive_attention_weights(q, k, mod.weight, mask, causal)
    return out.transpose(1, 2).reshape(B, L, -1), probs


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nn_module(heads, causal):
    torch.manual_seed(0)
    mod = fastattn.nn.AdditiveAttention(12, 10, 16, num_heads=heads, value_dim=6)
    B, L, S = 2, 7, 9
    query, key, value = torch.randn(B, L, 12), torch.randn(B, S, 10), torch.randn(B, S, 6)
    pad = torch.arange(S)[None] < torch.tensor([S, 4])[:, None]  # (B, S) key padding, True = attend
    out, probs = mod(query, key, value, attn_mask=pad, is_causal=causal, need_weights=True)
    assert out.shape == (B, L, 6) and probs.shape == (B, heads, L, S)
    with torch.no_grad():
        ref_out, ref_probs = _module_reference(mod, query, key, value, pad.view(B, 1, 1, S), causal)
    assert_close("module out", out, ref_out)
    assert_close("module weights", probs, ref_probs)
    out.square().sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # Gradients of the parameters against the reference formula.
    grads = {n: p.grad.clone() for n, p in mod.named_parameters()}
    mod.zero_grad()
    ref_out, _ = _module_reference(mod, query, key, value, pad.view(B, 1, 1, S), causal)
    ref_out.square().sum().backward()
    for n, p in mod.named_parameters():
        assert_close(f"grad {n}", grads[n], p.grad.double(), backward=True)


def test_nn_module_unbatched_and_defaults():
    torch.manual_seed(0)
    mod = fastattn.nn.AdditiveAttention(4, 5, 8)
    assert mod.value_dim == 5 and mod.head_dim == 8 and tuple(mod.weight.shape) == (1, 8)
    out = mod(torch.randn(3, 4), torch.randn(6, 5), torch.randn(6, 5))
    assert out.shape == (3, 5)
    assert "AdditiveAttention" in fastattn.nn.__all__


@pytest.mark.parametrize("kw", [dict(hidden_dim=10, num_heads=3), dict(hidden_dim=8, num_heads=2, value_dim=5),
                                dict(hidden_dim=0)], ids=["hidden-heads", "value-heads", "zero-hidden"])
def test_nn_module_bad_args(kw):
    with pytest.raises(ValueError):
        fastattn.nn.AdditiveAttention(4, 5, **kw)


def test_nn_module_bad_input():
    mod = fastattn.nn.AdditiveAttention(4, 5, 8)
    with pytest.raises(ValueError, match="query"):
        mod(torch.randn(2, 3, 5), torch.randn(2, 6, 5), torch.randn(2, 6, 5))


# ----------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (tiny shapes: the interpreter is slow)
# ----------------------------------------------------------------------------------------------------
def _triton_module():
    return triton_kernels("additive")


TRITON_CASES = {  # B, H, L, S, D, Ev, dtype, mask, causal
    "B1-H2-L19-S23-D5-Ev7-f32-dead-causal": (1, 2, 19, 23, 5, 7, F32, "dead", True),
    "B2-H1-L17-S9-D3-Ev16-f32-float": (2, 1, 17, 9, 3, 16, F32, "float", False),
    "B1-H1-L21-S18-D6-Ev5-bf16-pad-causal": (1, 1, 21, 18, 6, 5, BF16, "pad", True),
    "B1-H1-L1-S1-D1-Ev1-f32": (1, 1, 1, 1, 1, 1, F32, "none", False),
    "B1-H2-L18-S33-D13-Ev20-bf16-bool": (1, 2, 18, 33, 13, 20, BF16, "bool", False),
    "B1-H1-L35-S20-D4-Ev8-f32-float-causal": (1, 1, 35, 20, 4, 8, F32, "float", True),
}


@pytest.mark.triton
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_interpreter(case):
    T = _triton_module()
    B, H, L, S, D, Ev, dtype, mask, causal = TRITON_CASES[case]
    gen = torch.Generator().manual_seed(8)
    q, k, v, w, dout = _make(B, H, L, S, D, Ev, dtype, gen, layout="bshd")
    m = _mask(mask, B, H, L, S, dtype, gen)
    out, lse = T.additive_fwd(q, k, v, w, m, causal)
    grads = T.additive_bwd(dout, q, k, v, w, out, lse, m, causal)
    _compare((out, lse, *grads), q, k, v, w, m, causal, dout)


@pytest.mark.triton
def test_triton_public_api():
    _triton_module()
    gen = torch.Generator().manual_seed(9)
    q, k, v, w, dout = _make(1, 1, 5, 6, 2, 3, F32, gen)
    _compare(_run_public(q, k, v, w, None, False, dout, "triton"), q, k, v, w, None, False, dout)
