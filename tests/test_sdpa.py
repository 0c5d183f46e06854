"""fastattn.scaled_dot_product_attention (the CPU backend) against fastattn.reference."""
from __future__ import annotations

import math

import pytest
import torch

import fastattn
from fastattn import reference
from conftest import DTYPE_IDS, padding_mask
from conftest import make_qkv as _shared_qkv
from fastattn.testing import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_qkv(B, H, Hk, L, S, E, Ev, dtype, *, bshd=False, requires_grad=False):
    """query, key, value from torch's global generator, drawn in ``dtype``."""
    return _shared_qkv(B, H, Hk, L, S, E, Ev, dtype, bshd=bshd, draw_dtype=dtype, requires_grad=requires_grad)


def make_mask(kind, B, H, L, S, dtype):
    g = torch.Generator().manual_seed(1)
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(B, H, L, S, generator=g) > 0.3
    elif kind == "bool-pad":  # BERT padding mask (B, 1, 1, S)
        m = padding_mask(torch.randint(1, S + 1, (B,), generator=g), S)
    elif kind == "float":
        m = torch.randn(B, H, L, S, generator=g).to(dtype)
    elif kind == "float-bcast":  # shared bias (1, 1, L, S) read through stride 0
        m = torch.randn(1, 1, L, S, generator=g).to(dtype)
    elif kind == "float-inf":
        m = torch.randn(B, 1, L, S, generator=g).to(dtype)
        m = m.masked_fill(torch.rand(B, 1, L, S, generator=g) > 0.6, float("-inf"))
    elif kind == "fully-masked":  # some query rows see no key at all
        m = torch.rand(B, H, L, S, generator=g) > 0.3
        m[:, :, ::3, :] = False
    else:
        raise ValueError(kind)
    return m


def check_forward(q, k, v, mask=None, is_causal=False, scale=None, enable_gqa=False, backend="cpu"):
    out = fastattn.scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, scale, enable_gqa,
                                                backend=backend)
    ref64 = reference.scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, scale, enable_gqa, upcast=True)
    ref_lp = reference.scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, scale, enable_gqa, upcast=False)
    assert out.dtype == q.dtype
    assert_close("out", out, ref64, ref_lp)


def check_backward(q, k, v, mask=None, is_causal=False, enable_gqa=False, backend="cpu"):
    inputs = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    do = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    out = fastattn.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, enable_gqa=enable_gqa,
                                                backend=backend)
    grads = torch.autograd.grad(out, inputs, do)
    ref64 = reference.scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, None, enable_gqa, upcast=True)
    grads64 = torch.autograd.grad(ref64, inputs, do.double())
    ref_lp = reference.scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, None, enable_gqa, upcast=False)
    grads_lp = torch.autograd.grad(ref_lp, inputs, do)
    for name, g, g64, glp in zip(["dq", "dk", "dv", "dmask"], grads, grads64, grads_lp):
        assert g.shape == g64.shape
        assert_close(name, g, g64, glp, backward=True)


# ------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("E", [16, 32, 40, 64, 80, 96, 111, 128, 256], ids=lambda e: f"E{e}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_head_dims(E, dtype):
    q, k, v = make_qkv(2, 3, 3, 37, 53, E, E, dtype)
    check_forward(q, k, v)


@pytest.mark.parametrize("L,S", [(1, 1), (7, 7), (97, 97), (130, 130), (257, 257), (1025, 1025),
                                 (1, 130), (97, 33), (33, 97), (257, 7)], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_lengths(L, S, dtype):
    H = 2 if max(L, S) > 500 else 3
    q, k, v = make_qkv(1, H, H, L, S, 64, 64, dtype)
    check_forward(q, k, v)


@pytest.mark.parametrize("mask_kind", [None, "bool", "bool-pad", "float", "float-bcast", "float-inf", "fully-masked"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["nocausal", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_masks(mask_kind, is_causal, dtype):
    B, H, L, S = 2, 3, 70, 97
    q, k, v = make_qkv(B, H, H, L, S, 40, 40, dtype)
    mask = make_mask(mask_kind, B, H, L, S, dtype)
    check_forward(q, k, v, mask, is_causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_gqa_bshd_ev(dtype):
    q, k, v = make_qkv(2, 6, 2, 45, 67, 48, 24, dtype, bshd=True)
    assert not q.is_contiguous()
    check_forward(q, k, v, make_mask("bool-pad", 2, 6, 45, 67, dtype), enable_gqa=True)


def test_float32_mask_with_bf16_inputs():
    q, k, v = make_qkv(2, 2, 2, 20, 30, 32, 32, torch.bfloat16)
    check_forward(q, k, v, make_mask("float", 2, 2, 20, 30, torch.float32))


@pytest.mark.parametrize("shape", [(5, 17, 32), (2, 3, 4, 17, 32)], ids=["3d", "5d"])
def test_batch_dims(shape):
    q = torch.randn(*shape)
    k = torch.randn(*shape[:-2], 23, 32)
    v = torch.randn(*shape[:-2], 23, 16)
    mask = torch.rand(*shape[-3:-1], 23) > 0.2 if len(shape) == 3 else torch.rand(3, 1, 17, 23) > 0.2
    check_forward(q, k, v, mask)
    check_forward(q, k, v, None, True)


def test_scale_and_torch_parity():
    q, k, v = make_qkv(2, 4, 4, 33, 33, 64, 64, torch.float32)
    mask = make_mask("bool-pad", 2, 4, 33, 33, torch.float32)
    for kw in ({}, {"scale": 0.3}, {"is_causal": True}, {"attn_mask": mask}):
        got = fastattn.scaled_dot_product_attention(q, k, v, **kw)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_return_lse():
    q, k, v = make_qkv(2, 3, 3, 20, 30, 32, 32, torch.float32)
    mask = make_mask("fully-masked", 2, 3, 20, 30, torch.float32)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, mask, return_lse=True)
    ref_out, ref_lse = reference.scaled_dot_product_attention(q, k, v, mask, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 20)
    assert torch.isneginf(lse[:, :, ::3]).all()
    assert (out[:, :, ::3] == 0).all()
    assert_close("lse", lse, ref_lse.double())
    assert_close("out", out, ref_out)


def test_empty_lengths():
    for L, S in [(0, 5), (5, 0), (0, 0)]:
        q, k, v = make_qkv(2, 2, 2, L, S, 8, 8, torch.float32, requires_grad=True)
        out = fastattn.scaled_dot_product_attention(q, k, v)
        assert out.shape == (2, 2, L, 8)
        assert (out == 0).all()
        out.sum().backward()
        assert (q.grad == 0).all() and (k.grad == 0).all()


def test_nan_stays_in_its_row():
    q, k, v = make_qkv(2, 2, 2, 10, 12, 16, 16, torch.float32)
    q[1, 0, 3, 5] = float("nan")
    out = fastattn.scaled_dot_product_attention(q, k, v)
    bad = torch.isnan(out)
    assert bad[1, 0, 3].all()
    bad[1, 0, 3] = False
    assert not bad.any()


def test_inputs_not_modified():
    q, k, v = make_qkv(2, 2, 2, 10, 12, 16, 16, torch.float32, requires_grad=True)
    mask = make_mask("float", 2, 2, 10, 12, torch.float32).requires_grad_()
    before = [t.detach().clone() for t in (q, k, v, mask)]
    out = fastattn.scaled_dot_product_attention(q, k, v, mask, dropout_p=0.2, is_causal=True)
    out.sum().backward()
    for t, b in zip((q, k, v, mask), before):
        assert torch.equal(t.detach(), b)


# ----------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("case", [
    dict(B=2, H=3, Hk=3, L=37, S=53, E=64),
    dict(B=1, H=2, Hk=2, L=130, S=97, E=40),
    dict(B=2, H=4, Hk=2, L=33, S=33, E=111, gqa=True),
    dict(B=1, H=2, Hk=2, L=1, S=7, E=16),
    dict(B=2, H=2, Hk=2, L=45, S=45, E=32, bshd=True),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("mask_kind", [None, "bool-pad", "fully-masked"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["nocausal", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_backward(case, mask_kind, is_causal, dtype):
    c = dict(case)
    gqa, bshd = c.pop("gqa", False), c.pop("bshd", False)
    q, k, v = make_qkv(c["B"], c["H"], c["Hk"], c["L"], c["S"], c["E"], c["E"], dtype, bshd=bshd,
                       requires_grad=True)
    mask = make_mask(mask_kind, c["B"], c["H"], c["L"], c["S"], dtype)
    check_backward(q, k, v, mask, is_causal, gqa)


@pytest.mark.parametrize("mask_shape", ["full", "B11S", "11LS"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_mask_gradient(mask_shape, dtype):
    B, H, L, S = 2, 3, 29, 41
    q, k, v = make_qkv(B, H, H, L, S, 32, 32, dtype, requires_grad=True)
    shape = {"full": (B, H, L, S), "B11S": (B, 1, 1, S), "11LS": (1, 1, L, S)}[mask_shape]
    mask = torch.randn(shape).to(dtype).requires_grad_()
    check_backward(q, k, v, mask, is_causal=True)


def test_fully_masked_rows_zero_grad():
    q, k, v = make_qkv(1, 2, 2, 12, 9, 16, 16, torch.float32, requires_grad=True)
    mask = torch.ones(1, 2, 12, 9, dtype=torch.bool)
    mask[:, :, 4] = False
    out = fastattn.scaled_dot_product_attention(q, k, v, mask)
    out.sum().backward()
    assert (q.grad[:, :, 4] == 0).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_gradcheck_float64():
    q, k, v = make_qkv(1, 2, 1, 5, 6, 4, 3, torch.float64, requires_grad=True)
    mask = torch.randn(1, 1, 5, 6, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, m):
        return fastattn.scaled_dot_product_attention(q, k, v, m, is_causal=True, enable_gqa=True)

    assert torch.autograd.gradcheck(f, (q, k, v, mask))


def test_deterministic_backward():
    q, k, v = make_qkv(2, 4, 2, 70, 90, 64, 64, torch.float32, requires_grad=True)
    mask = torch.randn(2, 1, 1, 90, requires_grad=True)
    do = torch.randn(2, 4, 70, 64)
    runs = []
    for _ in range(2):
        out = fastattn.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, is_causal=True)
        runs.append(torch.autograd.grad(out, (q, k, v, mask), do))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ dropout
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("is_causal", [False, True], ids=["nocausal", "causal"])
def test_dropout_matches_rebuilt_mask(dtype, is_causal):
    B, H, L, S, E = 2, 3, 37, 45, 32
    q, k, v = make_qkv(B, H, H, L, S, E, E, dtype, requires_grad=True)
    mask = make_mask("bool-pad", B, H, L, S, dtype)
    p = 0.3
    torch.manual_seed(123)
    out = fastattn.scaled_dot_product_attention(q, k, v, mask, dropout_p=p, is_causal=is_causal)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))  # what fastattn drew
    ref64 = reference.scaled_dot_product_attention(q, k, v, mask, p, is_causal, upcast=True, dropout_seed=seed)
    ref_lp = reference.scaled_dot_product_attention(q, k, v, mask, p, is_causal, upcast=False, dropout_seed=seed)
    assert_close("out", out, ref64, ref_lp)
    do = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), do)
    g64 = torch.autograd.grad(ref64, (q, k, v), do.double())
    glp = torch.autograd.grad(ref_lp, (q, k, v), do)
    for name, a, b, c in zip(["dq", "dk", "dv"], g, g64, glp):
        assert_close(name, a, b, c, backward=True)


def test_dropout_reproducible_and_kept_fraction():
    q, k, v = make_qkv(1, 4, 4, 128, 128, 16, 16, torch.float32)
    p = 0.25
    torch.manual_seed(7)
    a = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=p)
    torch.manual_seed(7)
    b = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=p)
    assert torch.equal(a, b)
    keep = reference.dropout_keep_mask(12345, (1, 4, 128, 128), p)
    frac = keep.float().mean().item()
    # 65536 Bernoulli(0.75) draws: std ~ 0.0017, so 5 sigma ~ 0.0085
    assert abs(frac - (1 - p)) < 0.0085, frac


# -------------------------------------------------------------------------------------- bad inputs
def _err(exc, match, *args, **kw):
    with pytest.raises(exc, match=match):
        fastattn.scaled_dot_product_attention(*args, **kw)


def test_bad_inputs():
    q, k, v = make_qkv(2, 4, 4, 8, 9, 16, 16, torch.float32)
    _err(ValueError, "head dim", q, k[..., :8], v)
    _err(ValueError, "length", q, k, v[:, :, :5])
    _err(ValueError, "heads", q, k[:, :2], v[:, :2])
    _err(ValueError, "divisible", q, k[:, :3], v[:, :3], enable_gqa=True)
    _err(ValueError, "batch dims", q, torch.cat([k, k[:1]]), torch.cat([v, v[:1]]))  # 2 vs 3: no broadcast
    _err(TypeError, "dtype", q, k.double(), v)
    _err(TypeError, "float16, bfloat16", q.int(), k.int(), v.int())
    _err(ValueError, "at least 2 dims", q[0, 0, 0], k[0, 0, 0], v[0, 0, 0])
    _err(TypeError, "attn_mask must be bool", q, k, v, attn_mask=torch.ones(8, 9, dtype=torch.int32))
    _err(TypeError, "attn_mask must be bool", q, k, v, attn_mask=torch.ones(8, 9, dtype=torch.float16))
    _err(ValueError, "does not broadcast", q, k, v, attn_mask=torch.ones(3, 8, 9, dtype=torch.bool))
    _err(ValueError, "dropout_p", q, k, v, dropout_p=1.0)
    _err(ValueError, "dropout_p", q, k, v, dropout_p=-0.1)
    _err(ValueError, "backend", q, k, v, backend="cuda")
    _err(TypeError, "query must be a torch.Tensor", q.numpy(), k, v)
    _err(ValueError, "scale", q, k, v, scale=float("nan"))
    if not _interpreting() and not torch.cuda.is_available():
        _err((ValueError, RuntimeError), "triton", q, k, v, backend="triton")


def _interpreting():
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


def test_reference_backend_matches():
    q, k, v = make_qkv(2, 2, 2, 10, 12, 16, 16, torch.float32)
    a = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="reference")
    b = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
