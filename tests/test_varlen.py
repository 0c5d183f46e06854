"""fastattn.varlen_attention (packed variable-length batches): CPU kernel and Triton interpreter against
the per-sequence float64 reference (fastattn.reference.varlen_attention), forward and gradients.

Tolerances follow fastattn.testing: float32 with a small atol against float64; bfloat16 at most 2x (fwd) /
3x (bwd) the error of the same reference run in bfloat16. Length sets mix empty sequences, length 1,
L != S per sequence and lengths that straddle the kernels' blocks. Triton runs under TRITON_INTERPRET=1
with tiny shapes.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import fastattn
from fastattn import reference as R
from fastattn import _cpu
from fastattn.testing import assert_close
from fastattn.varlen import pad, unpad

DT = {"f32": torch.float32, "bf16": torch.bfloat16}


def _triton_ready() -> bool:
    try:
        mod = importlib.import_module("fastattn.kernels.attention")
    except ImportError:
        return False
    if not mod._interpreting():  # imported earlier without the interpreter: decorate the kernels again
        importlib.reload(mod)
    return True


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def cu_of(lengths: list[int]) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


def make(lq, lk, H, Hk, E, Ev, dtype):
    q = torch.randn(sum(lq), H, E).to(dtype)
    k = torch.randn(sum(lk), Hk, E).to(dtype)
    v = torch.randn(sum(lk), Hk, Ev).to(dtype)
    return q, k, v


def make_mask(kind: str, B, H, L, S, dtype):
    if kind == "none":
        return None
    if kind == "bool":  # full (B, H, L, S), some rows fully hidden
        m = torch.rand(B, H, L, S) > 0.3
        m[:, :, 1] = False
        return m
    if kind == "pad":  # key padding (B, 1, 1, S)
        return torch.rand(B, 1, 1, S) > 0.25
    if kind == "float":  # full float mask with -inf entries, learnable
        m = torch.randn(B, H, L, S)
        m[torch.rand(B, H, L, S) < 0.1] = float("-inf")
        return m.to(dtype)
    if kind == "float-bcast":  # (1, H, L, S): its gradient sums over the batch
        return torch.randn(1, H, L, S).to(dtype)
    raise ValueError(kind)


def check_lse(lse, ref_lse, dtype):
    """lse is float32 for every input dtype: the -inf pattern must match, the values within the bound the
    SDPA kernel tests use (1e-4 for fp32 inputs; 2e-3 for 16-bit inputs, whose CPU path sums the row with a
    shorter exp2 polynomial)."""
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse -inf pattern differs"
    fin = torch.isfinite(ref_lse)
    if fin.any():
        err = (lse[fin].double() - ref_lse[fin].double()).abs().max().item()
        assert err < (1e-4 if dtype in (torch.float32, torch.float64) else 2e-3), f"lse error {err:.3e}"


def check(lq, lk, H, Hk, E, Ev, dtype, *, causal=False, mask_kind="none", backend="cpu", scale=None):
    """Forward, lse and gradients of varlen_attention against the float64 per-sequence reference."""
    B, L, S = len(lq), max(lq), max(lk)
    cq, ck = cu_of(lq), cu_of(lk)
    q, k, v = make(lq, lk, H, Hk, E, Ev, dtype)
    mask = make_mask(mask_kind, B, H, L, S, dtype)
    mask_grad = mask is not None and mask.dtype != torch.bool
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    m = mask.clone().requires_grad_() if mask_grad else mask
    snapshot = [t.clone() for t in (q, k, v)] + ([mask.clone()] if mask is not None else [])
    out, lse = fastattn.varlen_attention(*leaves, cq, ck, L, S, attn_mask=m, is_causal=causal, scale=scale,
                                         enable_gqa=Hk != H, return_lse=True, backend=backend)
    assert out.shape == (sum(lq), H, Ev) and out.dtype == dtype
    assert lse.shape == (H, sum(lq)) and lse.dtype == torch.float32
    dout = torch.randn(out.shape).to(dtype)
    grads = torch.autograd.grad(out, leaves + ([m] if mask_grad else []), dout)

    def ref(upcast: bool):
        cast = (lambda t: t.double()) if upcast else (lambda t: t.clone())  # float64 leaves: float64 grads
        rl = [cast(t).requires_grad_() for t in (q, k, v)]
        rm = cast(mask).requires_grad_() if mask_grad else mask
        ro, rlse = R.varlen_attention(*rl, cq, ck, L, S, attn_mask=rm, is_causal=causal, scale=scale,
                                      enable_gqa=Hk != H, upcast=upcast, return_lse=True)
        rg = torch.autograd.grad(ro, rl + ([rm] if mask_grad else []), dout.to(ro.dtype), allow_unused=True)
        rg = [torch.zeros_like(t) if g is None else g for g, t in zip(rg, rl + ([rm] if mask_grad else []))]
        return ro, rlse, rg

    ro64, rlse, rg64 = ref(True)
    lp = dtype not in (torch.float32, torch.float64)
    ro_lp, _, rg_lp = ref(False) if lp else (None, None, [None] * len(rg64))
    assert_close("out", out, ro64, ro_lp)
    check_lse(lse, rlse, dtype)
    for name, g, r64, rlp in zip(("dq", "dk", "dv", "dmask"), grads, rg64, rg_lp):
        assert_close(name, g, r64, rlp, backward=True)
    # Inputs are never modified.
    for before, after in zip(snapshot, [q, k, v] + ([mask] if mask is not None else [])):
        assert torch.equal(before, after)


# Length sets: (query lengths, key lengths, id). Empty sequences, length 1, L != S, several blocks.
LENGTHS = [
    ([5, 1, 0, 37, 20], [7, 3, 4, 0, 33], "mixed"),
    ([17, 1, 70, 3], [17, 1, 70, 3], "self"),
    ([1, 1, 1], [1, 2, 90], "len1"),
]


# ----------------------------------------------------------------------------------------------------
# CPU kernel
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DT.values(), ids=DT.keys())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lq,lk", [(a, b) for a, b, _ in LENGTHS], ids=[i for _, _, i in LENGTHS])
def test_cpu(lq, lk, causal, dtype):
    check(lq, lk, 4, 2, 24, 40, dtype, causal=causal)


@pytest.mark.parametrize("dtype", DT.values(), ids=DT.keys())
@pytest.mark.parametrize("mask_kind", ["bool", "pad", "float", "float-bcast"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_masks(mask_kind, causal, dtype):
    check([5, 1, 0, 37, 20], [7, 3, 4, 0, 33], 3, 3, 16, 16, dtype, causal=causal, mask_kind=mask_kind)


@pytest.mark.parametrize("E,Ev", [(1, 3), (64, 64), (96, 80)], ids=["E1-Ev3", "E64", "E96-Ev80"])
def test_cpu_head_dims(E, Ev):
    check([9, 130, 2], [140, 7, 2], 2, 1, E, Ev, torch.float32, causal=True, scale=0.3)


@pytest.mark.parametrize("mode", [1, 2], ids=["fused", "split"])
def test_cpu_backward_modes_agree(mode):
    """Fused and split backward give the same bits for a packed batch (and both are deterministic)."""
    lq, lk = [5, 70, 0, 20], [7, 66, 4, 33]
    q, k, v = make(lq, lk, 4, 2, 16, 16, torch.float32)
    cq, ck = cu_of(lq), cu_of(lk)
    out, lse = _cpu.varlen_fwd(q, k, v, cq, ck, 70, 66, None, scale=0.25, is_causal=True, dropout_p=0.0, seed=0)
    dout = torch.randn(out.shape)
    args = (_cpu.module(), dout, q, k, v, out, lse, cq, ck, 70, 66, None)
    kw = dict(scale=0.25, is_causal=True, dropout_p=0.0, seed=0, mask_needs_grad=False)
    a = _cpu._varlen_bwd(*args, **kw, mode=mode)
    b = _cpu._varlen_bwd(*args, **kw, mode=3 - mode)
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_strided_views(backend):
    """q, k, v as views of one fused projection (total, 3, H, E) and a strided cu_seqlens: read in place,
    same bits as contiguous copies."""
    if backend == "triton" and not _triton_ready():
        pytest.skip("Triton is not importable")
    lens = [4, 0, 9, 1]
    qkv = torch.randn(sum(lens), 3, 2, 8)
    q, k, v = qkv.unbind(1)
    cu = torch.zeros(2 * (len(lens) + 1), dtype=torch.int32)
    cu[::2] = cu_of(lens)
    cu_view = cu[::2]
    assert not q.is_contiguous() and not cu_view.is_contiguous()
    a = fastattn.varlen_attention(q, k, v, cu_view, cu_view, 9, 9, is_causal=True, backend=backend)
    b = fastattn.varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu_of(lens), cu_of(lens), 9, 9,
                                  is_causal=True, backend=backend)
    assert torch.equal(a, b)


def test_cpu_gradcheck_f64():
    lq, lk = [3, 0, 2, 1], [2, 1, 3, 0]
    cq, ck = cu_of(lq), cu_of(lk)
    q, k, v = (t.requires_grad_() for t in make(lq, lk, 2, 1, 4, 3, torch.float64))
    mask = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, mask):
        return fastattn.varlen_attention(q, k, v, cq, ck, 3, 3, attn_mask=mask, is_causal=True, enable_gqa=True,
                                         backend="cpu")
    assert torch.autograd.gradcheck(f, (q, k, v, mask))


@pytest.mark.parametrize("dtype,return_lo", [(torch.float32, False), (torch.bfloat16, True)], ids=["f32", "bf16-lo"])
def test_cpu_opcheck(dtype, return_lo):
    from fastattn._ops.varlen import varlen_fwd
    lq, lk = [3, 5], [4, 2]
    q, k, v = (t.requires_grad_() for t in make(lq, lk, 2, 2, 8, 8, dtype))
    args = (q, k, v, cu_of(lq), cu_of(lk), 5, 4, None, 0.3, True, 0.0, torch.zeros((), dtype=torch.int64), "cpu",
            return_lo)
    torch.library.opcheck(varlen_fwd, args)


@pytest.mark.parametrize("total", ["no-queries", "no-keys", "no-batch"])
def test_cpu_empty(total):
    lq, lk = {"no-queries": ([0, 0], [3, 2]), "no-keys": ([2, 3], [0, 0]), "no-batch": ([], [])}[total]
    q, k, v = (t.requires_grad_() for t in make(lq, lk, 2, 2, 8, 4, torch.float32))
    out, lse = fastattn.varlen_attention(q, k, v, cu_of(lq), cu_of(lk), max(lq, default=0), max(lk, default=0),
                                         return_lse=True)
    assert out.shape == (sum(lq), 2, 4) and torch.all(out == 0)
    assert lse.shape == (2, sum(lq)) and torch.all(lse == float("-inf"))
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.all(t.grad == 0)


# ----------------------------------------------------------------------------------------------------
# Dropout: the same seed drops the same entries as padded SDPA, and the reference rebuilds them
# ----------------------------------------------------------------------------------------------------
def _padded(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(total, H, D) packed -> (B, H, max, D) zero-padded."""
    B, n = len(lengths), max(lengths)
    out = x.new_zeros(B, n, *x.shape[1:])
    cu = cu_of(lengths).tolist()
    for b in range(B):
        out[b, : lengths[b]] = x[cu[b]: cu[b + 1]]
    return out.transpose(1, 2)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_matches_padded_sdpa(causal, backend):
    if backend == "triton" and not _triton_ready():
        pytest.skip("Triton is not importable")
    lq, lk = [5, 1, 12, 9], [7, 3, 12, 1]
    cq, ck = cu_of(lq), cu_of(lk)
    q, k, v = make(lq, lk, 2, 2, 8, 8, torch.float32)
    p = 0.3
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(1234)
    out = fastattn.varlen_attention(*leaves, cq, ck, 12, 12, dropout_p=p, is_causal=causal, backend=backend)
    torch.manual_seed(1234)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))  # the draw varlen_attention made
    dout = torch.randn(out.shape)
    grads = torch.autograd.grad(out, leaves, dout)

    # Padded SDPA with a key-padding mask, same generator state: same dropped entries.
    pl = [_padded(t, ls).clone().requires_grad_() for t, ls in ((q, lq), (k, lk), (v, lk))]
    keys = torch.arange(12)[None, :] < torch.tensor(lk)[:, None]
    torch.manual_seed(1234)
    pout = fastattn.scaled_dot_product_attention(*pl, attn_mask=keys[:, None, None, :], dropout_p=p,
                                                 is_causal=causal, backend=backend)
    pd = _padded(dout, lq)
    pgrads = torch.autograd.grad(pout, pl, pd)
    torch.testing.assert_close(_padded(out.detach(), lq), pout.detach() * (torch.arange(12) < torch.tensor(lq)
                                                                          [:, None])[:, None, :, None],
                               atol=1e-6, rtol=1e-5)
    for g, pg, ls in zip(grads, pgrads, (lq, lk, lk)):
        torch.testing.assert_close(_padded(g, ls), pg, atol=1e-5, rtol=1e-5)

    # The reference with the same seed rebuilds the mask (rows of padded queries aside).
    ref = R.varlen_attention(q, k, v, cq, ck, 12, 12, dropout_p=p, is_causal=causal, dropout_seed=seed)
    assert_close("out", out, ref)
    assert (out == 0).any()  # something was dropped


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_dropout_single_key_gradients_are_zero(backend, dtype):
    """Each sequence sees one key (one has none): P = 1, dS = 0, so dq = dk = 0 in exact math. The training
    forward's out_lo keeps delta = rowsum(dO * O) on the fp32 output (fastattn/_ops.py); with O rounded to
    bf16 dq and dk were ~1e-2. The bound is the policy's floor (the naive low-precision reference is exact)."""
    if backend == "triton" and not _triton_ready():
        pytest.skip("Triton is not importable")
    from fastattn.testing import FLOOR
    lq, lk = [6, 9, 0, 4], [1, 1, 0, 1]
    cq, ck = cu_of(lq), cu_of(lk)
    q, k, v = make(lq, lk, 4, 2, 8, 24, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(7)
    out = fastattn.varlen_attention(*leaves, cq, ck, 9, 1, dropout_p=0.1, enable_gqa=True, backend=backend)
    assert (out == 0).all(-1).any() and (out != 0).any()  # rows dropped and rows kept
    dq, dk, _ = torch.autograd.grad(out, leaves, torch.randn(out.shape).to(dtype))
    for name, g in (("dq", dq), ("dk", dk)):
        err = g.abs().max().item()
        assert err <= FLOOR[dtype], f"{name} ({dtype}, {backend}): max |{name}| {err:.3e} > floor {FLOOR[dtype]:.0e}"


# ----------------------------------------------------------------------------------------------------
# Triton (interpreter, tiny shapes)
# ----------------------------------------------------------------------------------------------------
TRITON_CASES = [
    ("mixed-gqa-causal", [5, 1, 0, 37, 20], [7, 3, 4, 0, 33], 4, 2, 12, 20, True, "none"),
    ("self-float-mask", [17, 1, 3], [17, 1, 3], 2, 2, 16, 16, False, "float"),
    ("bcast-float-mask-causal", [6, 0, 19], [9, 4, 19], 2, 1, 8, 8, True, "float-bcast"),
    ("key-padding", [3, 20], [33, 2], 2, 2, 8, 8, False, "pad"),
]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DT.values(), ids=DT.keys())
@pytest.mark.parametrize("case", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton(case, dtype):
    if not _triton_ready():
        pytest.skip("Triton is not importable")
    _, lq, lk, H, Hk, E, Ev, causal, mask_kind = case
    check(lq, lk, H, Hk, E, Ev, dtype, causal=causal, mask_kind=mask_kind, backend="triton")


# ----------------------------------------------------------------------------------------------------
# pad / unpad
# ----------------------------------------------------------------------------------------------------
def test_unpad_pad_round_trip_and_grads():
    B, S, D = 3, 6, 5
    am = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    x = torch.randn(B, S, D, dtype=torch.float64, requires_grad=True)
    packed, idx, cu, mx = unpad(x, am)
    assert packed.shape == (9, D) and cu.tolist() == [0, 3, 9, 9] and cu.dtype == torch.int32 and mx == 6
    back = pad(packed, idx, B, S)
    torch.testing.assert_close(back, x * am[..., None])
    assert torch.autograd.gradcheck(lambda t: pad(unpad(t, am)[0], idx, B, S), (x,))
    y = torch.randn(9, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pad(t, idx, B, S), (y,))


def test_unpad_attention_pad_matches_padded_sdpa():
    """The HuggingFace pattern: padded batch + attention_mask -> unpad -> varlen -> pad."""
    B, S, H, E = 3, 10, 2, 8
    am = torch.arange(S)[None, :] < torch.tensor([10, 4, 1])[:, None]
    q, k, v = (torch.randn(B, S, H, E) for _ in range(3))
    qp, idx, cu, mx = unpad(q, am)
    kp, _, _, _ = unpad(k, am)
    vp, _, _, _ = unpad(v, am)
    out = pad(fastattn.varlen_attention(qp, kp, vp, cu, cu, mx, mx, is_causal=True), idx, B, S)
    ref = fastattn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                attn_mask=am[:, None, None, :], is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, ref * am[..., None, None], atol=2e-6, rtol=1e-5)


def test_pad_unpad_bad_input():
    with pytest.raises(ValueError, match="attention_mask"):
        unpad(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask"):
        unpad(torch.randn(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="indices"):
        pad(torch.randn(3, 4), torch.tensor([0, 1]), 2, 3)


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
def _good():
    lq, lk = [3, 2], [2, 4]
    q, k, v = make(lq, lk, 2, 2, 8, 8, torch.float32)
    return dict(query=q, key=k, value=v, cu_seqlens_q=cu_of(lq), cu_seqlens_k=cu_of(lk), max_seqlen_q=3,
                max_seqlen_k=4)


BAD = [
    ("cu-int64", dict(cu_seqlens_q=torch.tensor([0, 3, 5])), TypeError, "cu_seqlens_q must be int32"),
    ("cu-2d", dict(cu_seqlens_k=torch.tensor([[0, 2, 6]], dtype=torch.int32)), ValueError, "cu_seqlens_k must be 1-D"),
    ("cu-sizes", dict(cu_seqlens_k=torch.tensor([0, 6], dtype=torch.int32)), ValueError, "batch \\+ 1"),
    ("cu-first", dict(cu_seqlens_q=torch.tensor([1, 3, 5], dtype=torch.int32)), ValueError, r"cu_seqlens_q\[0\]"),
    ("cu-last", dict(cu_seqlens_k=torch.tensor([0, 2, 5], dtype=torch.int32)), ValueError, r"cu_seqlens_k\[-1\]"),
    ("cu-decreasing", dict(cu_seqlens_q=torch.tensor([0, 4, 3, 5], dtype=torch.int32),
                           cu_seqlens_k=torch.tensor([0, 2, 3, 6], dtype=torch.int32)), ValueError, "non-decreasing"),
    ("max-small", dict(max_seqlen_k=3), ValueError, "max_seqlen_k"),
    ("max-float", dict(max_seqlen_q=3.0), TypeError, "max_seqlen_q"),
    ("max-negative", dict(max_seqlen_q=-1), ValueError, "max_seqlen_q"),
    ("query-4d", dict(query=torch.randn(1, 5, 2, 8)), ValueError, "query must be packed 3-D"),
    ("dtype-mismatch", dict(key=torch.randn(6, 2, 8, dtype=torch.float64)), TypeError, "key dtype"),
    ("heads", dict(key=torch.randn(6, 1, 8), value=torch.randn(6, 1, 8)), ValueError, "enable_gqa"),
    ("head-dim", dict(key=torch.randn(6, 2, 7)), ValueError, "head dim"),
    ("kv-rows", dict(value=torch.randn(5, 2, 8)), ValueError, "key and value"),
    ("mask-shape", dict(attn_mask=torch.ones(2, 2, 3, 5, dtype=torch.bool)), ValueError, "attn_mask shape"),
    ("mask-dtype", dict(attn_mask=torch.ones(3, 4, dtype=torch.int64)), TypeError, "attn_mask must be bool"),
    ("dropout", dict(dropout_p=1.0), ValueError, "dropout_p"),
    ("backend", dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("bad,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(bad, exc, match):
    kw = {**_good(), **bad}
    with pytest.raises(exc, match=match):
        fastattn.varlen_attention(**kw)


def test_reference_backend_matches():
    kw = _good()
    a = fastattn.varlen_attention(**kw, is_causal=True, backend="reference")
    b = fastattn.varlen_attention(**kw, is_causal=True, backend="cpu")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
