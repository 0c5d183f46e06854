"""Hard (top-k) attention: the C++ kernel (every ISA module), the Triton kernels under TRITON_INTERPRET=1
and the public ``fastattn.hard_attention`` against the float64 reference (fastattn.reference.hard).

Selection is discontinuous: a rounding difference near a tie can change which key wins, and then the
outputs differ by O(1). So most inputs are built with *separated* scores: q and k hold small integers
(-2..2), q.k is an exact integer in every dtype (bf16 included), integer float masks (0, -1, -inf) keep
the sums exact up to the common scale, and ties are exact ties, broken by the lowest index everywhere.
The selected indices must then match the reference exactly, and values/gradients follow the tolerance
policy (fastattn.testing: fp32 vs float64 with small atol; bf16 at most 2x / 3x the error of the
reference run in bf16). Values and dout are random normals.

Shape legend: B batch, H query heads, Hk key/value heads, L query length, S key length, E head dim,
Ev value head dim, K top_k.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastattn
from fastattn import _cpu, testing
from fastattn import hard as FH
from fastattn import reference as R
from conftest import DTYPE_IDS, isa_module, isa_params, padding_mask, triton_kernels

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


def _triton_kernels():
    return triton_kernels("hard")


def _make(B, H, Hk, L, S, E, Ev, dtype, *, seed=0, layout="bhsd", integer=True):
    """q, k (small integers unless ``integer`` is False), v, dout (normals) in ``dtype``; "bshd" gives
    transposed views of (B, L, H, E) buffers."""
    g = torch.Generator().manual_seed(seed)

    def t(b, h, n, e, ints):
        x = torch.randint(-2, 3, (b, n, h, e), generator=g).float() if ints else torch.randn(b, n, h, e, generator=g)
        x = x.to(dtype)
        return x.transpose(1, 2) if layout == "bshd" else x.transpose(1, 2).contiguous()
    return t(B, H, L, E, integer), t(B, Hk, S, E, integer), t(B, Hk, S, Ev, False), t(B, H, L, Ev, False)


def _mask(kind, B, H, L, S, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool_pad":  # (B, 1, 1, S) padding; one batch element keeps no key at all
        lens = torch.randint(1, S + 1, (B,), generator=g)
        lens[-1] = 0
        return padding_mask(lens, S)
    if kind == "bool_full":  # some rows fully hidden
        m = torch.rand(B, H, L, S, generator=g) > 0.5
        m[:, :, ::4] = False
        return m
    if kind == "float_LS":  # (1, 1, L, S) integer bias with -inf
        m = torch.randint(-1, 1, (1, 1, L, S), generator=g).float()
        m[torch.rand(1, 1, L, S, generator=g) < 0.3] = float("-inf")
        return m.to(dtype)
    if kind == "float32_B1LS":
        return torch.randint(-1, 1, (B, 1, L, S), generator=g).float()
    raise ValueError(kind)


def _ref(q, k, v, mask, causal, scale, K, dout, upcast, mask_grad=False):
    """Reference (out, idx, prob, dq, dk, dv[, dmask]) via autograd."""
    # float64 leaves for the ground truth: autograd returns gradients in the leaf dtype.
    q, k, v = (t.detach().to(F64 if upcast else t.dtype).requires_grad_() for t in (q, k, v))
    m = mask
    if mask_grad:
        m = mask.detach().to(F64 if upcast else mask.dtype).requires_grad_()
    out, idx, prob = R.hard_attention(q, k, v, m, causal, scale, K, enable_gqa=True, upcast=upcast,
                                      return_indices=True, return_probs=True)
    grads = torch.autograd.grad(out, (q, k, v) + ((m,) if mask_grad else ()), dout.to(out.dtype),
                                allow_unused=True)
    return (out, idx, prob) + tuple(grads)


def _check_all(name, got, q, k, v, mask, causal, scale, K, dout):
    """got = (out, idx, prob, dq, dk, dv): compare with the float64 reference under the policy."""
    ref = _ref(q, k, v, mask, causal, scale, K, dout, True)
    lp = _ref(q, k, v, mask, causal, scale, K, dout, False) if q.dtype in (BF16, F16) else (None,) * 6
    out, idx, prob, dq, dk, dv = got
    assert torch.equal(idx.long(), ref[1]), f"{name}: selected indices differ from the reference"
    assert (prob.double() - ref[2]).abs().max().item() < 1e-5, f"{name}: probabilities differ"
    testing.assert_close(f"{name} out", out, ref[0], lp[0])
    for gname, g, r, rl in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[3:6], lp[3:6]):
        testing.assert_close(f"{name} {gname}", g, r, rl, backward=True)


# ===================================================================================== C++ kernel (per ISA)
_CASES = [  # (B, H, Hk, L, S, E, Ev, mask, causal, layout)
    (2, 2, 2, 37, 45, 20, 12, None, False, "bhsd"),
    (1, 4, 2, 70, 70, 16, 24, "bool_full", True, "bshd"),
    (2, 2, 1, 33, 130, 40, 7, "bool_pad", False, "bshd"),
    (1, 2, 2, 65, 17, 24, 40, "float_LS", False, "bhsd"),
    (2, 1, 1, 1, 1, 8, 8, None, False, "bhsd"),
    (2, 3, 3, 20, 9, 64, 33, "float32_B1LS", True, "bhsd"),
]


def _case_id(c):
    B, H, Hk, L, S, E, Ev, mask, causal, layout = c
    return f"B{B}-H{H}-Hk{Hk}-L{L}-S{S}-E{E}-Ev{Ev}-{mask or 'nomask'}-{'causal' if causal else 'full'}-{layout}"


@pytest.mark.parametrize("case", _CASES, ids=[_case_id(c) for c in _CASES])
@pytest.mark.parametrize("K", [1, 3, 8], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("isa", isa_params())
def test_cpu_kernel(isa, dtype, K, case):
    B, H, Hk, L, S, E, Ev, mkind, causal, layout = case
    mod = isa_module(isa)
    q, k, v, dout = _make(B, H, Hk, L, S, E, Ev, dtype, layout=layout, seed=L * S + K)
    mask = _mask(mkind, B, H, L, S, dtype)
    scale = 1.0 / math.sqrt(E)
    before = [t.clone() for t in (q, k, v, dout)]
    out, idx, prob = _cpu._hard_fwd(mod, q, k, v, mask, scale=scale, is_causal=causal, top_k=K)
    dq, dk, dv, ds = _cpu._hard_bwd(mod, dout, q, k, v, idx, prob, scale=scale, top_k=K)
    _check_all(f"cpu-{isa}", (out, idx, prob, dq, dk, dv), q, k, v, mask, causal, scale, K, dout)
    for a, b in zip(before, (q, k, v, dout)):
        assert torch.equal(a, b), "inputs were modified"
    if K == 1:
        assert not dq.any() and not dk.any() and not ds.any(), "top_k=1 must give zero dq/dk"


@pytest.mark.parametrize("isa", isa_params())
def test_cpu_backward_deterministic(isa):
    """Same bits run to run and for any thread count (owner-computes dk/dv, no atomics)."""
    mod = isa_module(isa)
    q, k, v, dout = _make(2, 4, 2, 150, 90, 32, 32, F32, integer=False, seed=3)
    ref = None
    nt0 = torch.get_num_threads()
    try:
        for nt in (1, 2, 3, 1):
            torch.set_num_threads(nt)
            out, idx, prob = _cpu._hard_fwd(mod, q, k, v, None, scale=0.2, is_causal=True, top_k=5)
            res = (out, idx, prob) + _cpu._hard_bwd(mod, dout, q, k, v, idx, prob, scale=0.2, top_k=5)
            if ref is None:
                ref = res
            else:
                for a, b in zip(ref, res):
                    assert torch.equal(a, b), f"results differ with {nt} threads"
    finally:
        torch.set_num_threads(nt0)


def test_cpu_random_inputs_fp32():
    """Unstructured normal inputs (no engineered separation) in float32 against float64."""
    q, k, v, dout = _make(2, 3, 3, 64, 80, 32, 16, F32, integer=False, seed=11)
    mask = torch.randn(1, 1, 64, 80)
    out, idx, prob = _cpu.hard_fwd(q, k, v, mask, scale=0.3, is_causal=False, top_k=6)
    dq, dk, dv, _ = _cpu.hard_bwd(dout, q, k, v, idx, prob, scale=0.3, top_k=6)
    _check_all("cpu-random", (out, idx, prob, dq, dk, dv), q, k, v, mask, False, 0.3, 6, dout)


# ============================================================================================ public API
def _public(backend, q, k, v, mask, causal, K, dout, mask_grad=False, scale=None):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    m = mask.detach().clone().requires_grad_() if mask_grad else mask
    out, idx = fastattn.hard_attention(q, k, v, m, causal, scale, K, enable_gqa=True, backend=backend,
                                       return_indices=True)
    grads = torch.autograd.grad(out, (q, k, v) + ((m,) if mask_grad else ()), dout)
    return out, idx, grads


@pytest.mark.parametrize("K", [1, 4], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DTYPE_IDS.get)
def test_public_float_mask_grad(dtype, K):
    """Autograd through the op, including the gradient of a broadcast float mask."""
    B, H, L, S, E = 2, 4, 23, 31, 16
    q, k, v, dout = _make(B, H, 2, L, S, E, E, dtype, seed=5)
    mask = _mask("float_LS", B, H, L, S, dtype)
    out, idx, (dq, dk, dv, dm) = _public("cpu", q, k, v, mask, True, K, dout, mask_grad=True)
    ref = _ref(q, k, v, mask, True, None, K, dout, True, mask_grad=True)
    lp = _ref(q, k, v, mask, True, None, K, dout, False, mask_grad=True) if dtype == BF16 else (None,) * 7
    assert idx.dtype == torch.int64 and torch.equal(idx, ref[1])
    testing.assert_close("out", out, ref[0], lp[0])
    for name, g, r, rl in zip(("dq", "dk", "dv", "dmask"), (dq, dk, dv, dm), ref[3:], lp[3:]):
        testing.assert_close(name, g, r, rl, backward=True)
    assert dm.shape == mask.shape and dm.dtype == mask.dtype
    if K == 1:
        assert not dq.any() and not dk.any() and not dm.any()


def test_gradcheck_float64():
    """Finite differences on a tiny top_k > 1 case (float64 CPU kernel), float mask included."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 4, dtype=F64, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 7, 4, dtype=F64, generator=g, requires_grad=True)
    v = torch.randn(1, 2, 7, 3, dtype=F64, generator=g, requires_grad=True)
    m = torch.randn(1, 1, 5, 7, dtype=F64, generator=g, requires_grad=True)
    f = lambda q, k, v, m: fastattn.hard_attention(q, k, v, m, False, 0.7, 3, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v, m), eps=1e-6, atol=1e-7)
    fc = lambda q, k, v: fastattn.hard_attention(q, k, v, None, True, None, 2, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fc, (q, k, v), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_ties_lowest_index(backend):
    """Duplicated keys give exactly equal scores: the lowest index wins, in every slot order."""
    if backend == "triton":
        _triton_kernels()
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-2, 3, (1, 1, 4, 8), generator=g).float()
    k = base.repeat(1, 1, 5, 1)[:, :, torch.randperm(20, generator=g)]  # 20 keys, each score 5 times
    q = torch.randint(-2, 3, (1, 1, 6, 8), generator=g).float()
    v = torch.randn(1, 1, 20, 5, generator=g)
    for K in (1, 3, 7):
        out, idx = fastattn.hard_attention(q, k, v, top_k=K, backend=backend, return_indices=True)
        s = (q @ k.transpose(-1, -2))[0, 0]
        for i in range(6):
            # expected: sort by (-score, index)
            order = sorted(range(20), key=lambda j: (-s[i, j].item(), j))[:K]
            assert idx[0, 0, i].tolist() == order, f"{backend} K={K} row {i}: {idx[0, 0, i].tolist()} != {order}"
        if K == 1:
            assert torch.equal(out, v[0, 0][idx[0, 0, :, 0]][None, None])


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_fully_masked_and_fewer_than_k(backend):
    """Rows with no visible key: zeros, indices -1, zero gradients; rows with fewer visible keys than
    top_k use those (causal row i sees i + 1 keys)."""
    if backend == "triton":
        _triton_kernels()
    q, k, v, dout = _make(1, 2, 2, 9, 12, 8, 6, F32, seed=2)
    mask = torch.ones(1, 1, 9, 12, dtype=torch.bool)
    mask[..., 4, :] = False
    out, idx, (dq, dk, dv) = _public(backend, q, k, v, mask, True, 5, dout)
    assert not out[:, :, 4].any() and (idx[:, :, 4] == -1).all()
    assert not dq[:, :, 4].any()
    for i in range(9):
        n = 0 if i == 4 else min(i + 1, 5)
        assert (idx[:, :, i, :n] >= 0).all() and (idx[:, :, i, n:] == -1).all(), f"row {i}: {idx[0, 0, i]}"
    ref = _ref(q, k, v, mask, True, None, 5, dout, True)
    assert torch.equal(idx, ref[1])
    testing.assert_close("out", out, ref[0])
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[3:6]):
        testing.assert_close(name, g, r, backward=True)


def test_shapes_and_empty():
    """3-D and 5-D inputs, L != S, and empty dims."""
    q, k, v, dout = _make(2, 3, 3, 7, 11, 8, 5, F32, seed=4)
    o3 = fastattn.hard_attention(q[0], k[0], v[0], top_k=2)
    assert o3.shape == (3, 7, 5)
    torch.testing.assert_close(o3, fastattn.hard_attention(q, k, v, top_k=2)[0])
    o5, i5 = fastattn.hard_attention(q[None], k[None], v[None], top_k=2, return_indices=True)
    assert o5.shape == (1, 2, 3, 7, 5) and i5.shape == (1, 2, 3, 7, 2)
    e, ie = fastattn.hard_attention(q, k[:, :, :0], v[:, :, :0], top_k=3, return_indices=True)
    assert e.shape == (2, 3, 7, 5) and not e.any() and (ie == -1).all()
    assert fastattn.hard_attention(q[:, :, :0], k, v).shape == (2, 3, 0, 5)


def test_top_k_larger_than_s():
    q, k, v, dout = _make(1, 2, 2, 5, 3, 8, 4, F32, seed=6)
    out, idx, grads = _public("cpu", q, k, v, None, False, 6, dout)
    assert (idx[..., 3:] == -1).all() and (idx[..., :3] >= 0).all()
    torch.testing.assert_close(out.double(), R.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=0)


def test_bad_input():
    q, k, v, _ = _make(1, 2, 2, 4, 6, 8, 8, F32)
    for bad in (0, -1, FH.MAX_TOP_K + 1):
        with pytest.raises(ValueError, match="top_k"):
            fastattn.hard_attention(q, k, v, top_k=bad)
    for bad in (1.5, 2.0, True, "2", None):
        with pytest.raises(TypeError, match="top_k"):
            fastattn.hard_attention(q, k, v, top_k=bad)
    with pytest.raises(ValueError, match="heads"):
        fastattn.hard_attention(q, k[:, :1], v[:, :1])
    with pytest.raises(TypeError, match="dtype"):
        fastattn.hard_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="broadcast"):
        fastattn.hard_attention(q, k, v, torch.ones(3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend"):
        fastattn.hard_attention(q, k, v, backend="cuda")
    with pytest.raises(TypeError, match="return_indices"):
        fastattn.hard_attention(q, k, v, return_indices=1)
    assert fastattn.hard_attention(q, k, v, top_k=FH.MAX_TOP_K).shape == (1, 2, 4, 8)


def test_opcheck():
    from fastattn._ops import hard as hard_ops
    q, k, v, dout = _make(2, 4, 2, 9, 11, 16, 8, F32, seed=8, integer=False)
    mask = torch.randn(1, 1, 9, 11)
    torch.library.opcheck(FH.hard_fwd, (q, k, v, mask, 0.25, True, 3, "cpu"))
    torch.library.opcheck(FH.hard_fwd, (q.requires_grad_(), k, v, None, 0.25, False, 1, "cpu"))
    out, idx, prob = FH.hard_fwd(q.detach(), k, v, mask, 0.25, True, 3, "cpu")
    torch.library.opcheck(hard_ops.hard_bwd, (dout, q.detach(), k, v, idx, prob, 0.25, 3, True, "cpu"))


# ============================================================================= Triton (interpreter, tiny)
_TCASES = [  # (B, H, Hk, L, S, E, Ev, mask, causal, layout)
    (1, 2, 1, 20, 35, 16, 12, "bool_full", True, "bshd"),
    (2, 1, 1, 33, 18, 20, 16, "float_LS", False, "bhsd"),
]


@pytest.mark.triton
@pytest.mark.parametrize("case", _TCASES, ids=[_case_id(c) for c in _TCASES])
@pytest.mark.parametrize("K", [1, 3], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DTYPE_IDS.get)
def test_triton_interpreter(dtype, K, case):
    T = _triton_kernels()
    B, H, Hk, L, S, E, Ev, mkind, causal, layout = case
    q, k, v, dout = _make(B, H, Hk, L, S, E, Ev, dtype, layout=layout, seed=L + S + K)
    mask = _mask(mkind, B, H, L, S, dtype)
    scale = 1.0 / math.sqrt(E)
    out, idx, prob = T.hard_fwd(q, k, v, mask, scale=scale, is_causal=causal, top_k=K)
    dq, dk, dv, ds = T.hard_bwd(dout, q, k, v, idx, prob, scale=scale, top_k=K, is_causal=causal)
    _check_all("triton", (out, idx, prob, dq, dk, dv), q, k, v, mask, causal, scale, K, dout)
    # Same selection and (to rounding) the same ds as the C++ kernel.
    _, idx_c, prob_c = _cpu.hard_fwd(q, k, v, mask, scale=scale, is_causal=causal, top_k=K)
    assert torch.equal(idx, idx_c)
    ds_c = _cpu.hard_bwd(dout, q, k, v, idx_c, prob_c, scale=scale, top_k=K)[3]
    assert (ds - ds_c).abs().max().item() < 1e-5


@pytest.mark.triton
def test_triton_public_wide_k_gqa():
    """top_k = 8 (K_PAD = 8 candidate tile, several merges per key block) through the public function."""
    _triton_kernels()
    q, k, v, dout = _make(1, 2, 1, 18, 40, 16, 8, F32, seed=9)
    out, idx, (dq, dk, dv) = _public("triton", q, k, v, None, False, 8, dout)
    ref = _ref(q, k, v, None, False, None, 8, dout, True)
    assert torch.equal(idx, ref[1])
    testing.assert_close("out", out, ref[0])
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[3:6]):
        testing.assert_close(name, g, r, backward=True)
