"""The decoder variants (sliding window, logit soft-capping, ALiBi, attention sinks) in the C++ CPU attention
kernels: fastattn._cpu.attention_fwd / attention_bwd against fastattn.reference in float64.

The backward gets the reference's own ``out`` (rounded to the input dtype) and ``lse`` (which includes the
sinks), so its tests check the backward alone. Query row i sits at i' = i + causal_offset, causal or not.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from fastattn import _cpu, reference, testing
from conftest import DTYPE_IDS, isa_module, isa_params, padding_mask, randn_heads

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
ALL_DTYPES = [F32, F64, BF16, F16]


# ------------------------------------------------------------------------------------------- cases
# (B, H, Hk, L, S, E, Ev, causal, offset, mask kind, variants). Shapes: several forward key blocks (48 keys on
# AVX2) and backward tiles (64 x 64), odd lengths, L != S, GQA, odd head dims.
def _v(window=(-1, -1), softcap=0.0, alibi=False, sinks=False):
    return dict(window=window, softcap=softcap, alibi=alibi, sinks=sinks)


ALL = _v(window=(23, 4), softcap=1.5, alibi=True, sinks=True)
CASES = [
    # each variant alone, top-left and lower-right
    (2, 4, 2, 37, 141, 40, 24, False, 104, None, _v(window=(30, 7))),
    (2, 4, 2, 37, 141, 40, 24, True, 104, None, _v(window=(30, -1))),
    (2, 4, 2, 97, 70, 40, 24, False, 0, None, _v(softcap=1.0)),
    (2, 4, 2, 97, 70, 40, 24, True, 0, None, _v(alibi=True)),
    (2, 4, 2, 97, 70, 40, 24, True, -27, None, _v(sinks=True)),
    # all combined, with masks (the float mask gets a gradient), GQA, odd dims
    (2, 6, 2, 70, 131, 19, 13, True, 61, None, ALL),
    (2, 4, 2, 70, 131, 40, 24, True, 61, "bool_pad", ALL),
    (2, 4, 4, 70, 131, 40, 24, False, 0, "float_LS", ALL),
    (1, 2, 1, 130, 90, 40, 24, True, 0, "float_LS", _v(softcap=0.7, window=(-1, 10))),
    # a window that hides whole rows (i' - left > S - 1 or i' + right < 0) and whole key blocks
    (2, 4, 2, 97, 230, 40, 24, False, -50, None, _v(window=(10, 3))),
    (1, 4, 2, 130, 33, 40, 24, True, -97, None, _v(window=(8, -1), sinks=True)),
    (1, 2, 2, 150, 260, 32, 32, False, 70, None, _v(window=(0, 0), alibi=True)),
    # length 1
    (1, 2, 1, 1, 1, 8, 8, True, 0, None, ALL),
    (1, 2, 1, 1, 77, 8, 8, False, 76, None, ALL),
]


def _case_id(c):
    B, H, Hk, L, S, E, Ev, causal, off, mask, v = c
    parts = [f"B{B}-H{H}-Hk{Hk}-L{L}-S{S}-E{E}-Ev{Ev}"]
    if causal:
        parts.append("causal")
    if off:
        parts.append(f"off{off}")
    if mask:
        parts.append(mask)
    if v["window"] != (-1, -1):
        parts.append(f"win{v['window'][0]}_{v['window'][1]}")
    if v["softcap"]:
        parts.append(f"cap{v['softcap']}")
    if v["alibi"]:
        parts.append("alibi")
    if v["sinks"]:
        parts.append("sinks")
    return "-".join(parts)


def _inputs(case, dtype):
    """q, k, v, mask, dout, scale and the variant keywords of a case, drawn from a case-keyed generator."""
    B, H, Hk, L, S, E, Ev, causal, off, mask_kind, var = case
    gen = torch.Generator().manual_seed(zlib.crc32(_case_id(case).encode()))
    q, k, v, dout = (randn_heads(B, h, n, d, dtype, gen=gen, draw_dtype=F64)
                     for h, n, d in ((H, L, E), (Hk, S, E), (Hk, S, Ev), (H, L, Ev)))
    mask = None
    if mask_kind == "bool_pad":
        mask = padding_mask([max(1, S - 40 * b) for b in range(B)], S)
    elif mask_kind == "float_LS":
        mask = torch.randn(1, 1, L, S, generator=gen, dtype=F64).to(dtype)
    kw = dict(window=var["window"], softcap=var["softcap"])
    if var["alibi"]:
        # Per-head slopes as the op passes them (a stride-0 expand over the batch), with a sign flip for head 0.
        slopes = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)], dtype=F32)
        slopes[0] = -slopes[0]
        kw["alibi_slopes"] = slopes.expand(B, H)
    if var["sinks"]:
        kw["sinks"] = (torch.randn(H, generator=gen, dtype=F64) * 2).float()
    return q, k, v, mask, dout, 1.0 / math.sqrt(E), causal, off, kw


def _ref(q, k, v, mask, *, scale, causal, off, kw, upcast, dout=None):
    """(out, lse) of fastattn.reference, and with ``dout`` the gradients (dq, dk, dv, dmask or None)."""
    dt = F64 if upcast else q.dtype
    leaves = [t.detach().to(dt).requires_grad_(dout is not None) for t in (q, k, v)]
    m = mask
    if dout is not None and mask is not None and mask.dtype != torch.bool:
        m = mask.detach().to(dt if upcast else mask.dtype).requires_grad_()
        leaves.append(m)
    out, lse = reference.scaled_dot_product_attention(*leaves[:3], m, 0.0, causal, scale, True, upcast=upcast,
                                                      return_lse=True, causal_offset=off, **kw)
    if dout is None:
        return out.detach(), lse
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), lse, (*grads[:3], grads[3] if len(grads) > 3 else None)


def _check(name, got, ref64, reflp, dtype, backward=False):
    if got.dtype != dtype and dtype in (F16, BF16):
        got = got.to(dtype)
    testing.assert_close(name, got, ref64, reflp if dtype in (F16, BF16) else None, backward=backward)


def _check_lse(lse, ref_lse, ref_lp_lse, dtype):
    """lse is float32 for every dtype: the float32 policy, or the low-precision one against the naive lse."""
    assert lse.dtype == F32 and lse.shape == ref_lse.shape
    if dtype in (F16, BF16):
        testing.assert_close("lse", lse.to(dtype), ref_lse.double(), ref_lp_lse.to(dtype))
    else:
        testing.assert_close("lse", lse, ref_lse.double())


# --------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward(case, dtype):
    q, k, v, mask, _, scale, causal, off, kw = _inputs(case, dtype)
    out, lse = _cpu.attention_fwd(q, k, v, mask, scale=scale, is_causal=causal, dropout_p=0.0, seed=0,
                                  causal_offset=off, **kw)
    r64, rl64 = _ref(q, k, v, mask, scale=scale, causal=causal, off=off, kw=kw, upcast=True)
    rlp = rllp = None
    if dtype in (F16, BF16):
        rlp, rllp = _ref(q, k, v, mask, scale=scale, causal=causal, off=off, kw=kw, upcast=False)
    assert out.dtype == dtype and torch.isfinite(out).all()
    _check("out", out, r64, rlp, dtype)
    _check_lse(lse, rl64, rllp, dtype)


# -------------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backward(case, dtype):
    q, k, v, mask, dout, scale, causal, off, kw = _inputs(case, dtype)
    out64, lse, g64 = _ref(q, k, v, mask, scale=scale, causal=causal, off=off, kw=kw, upcast=True, dout=dout)
    glp = (None,) * 4
    if dtype in (F16, BF16):
        _, _, glp = _ref(q, k, v, mask, scale=scale, causal=causal, off=off, kw=kw, upcast=False, dout=dout)
    mask_grad = mask is not None and mask.dtype != torch.bool
    # The lse carries the sinks; float64 also takes them, for its lse recomputed in double.
    bkw = kw if dtype == F64 else {key: val for key, val in kw.items() if key != "sinks"}
    for mode in (_cpu.BwdMode.FUSED, _cpu.BwdMode.SPLIT):
        got = _cpu._attention_bwd(_cpu.module(), dout, q, k, v, out64.to(dtype), lse, mask, scale=scale,
                                  is_causal=causal, dropout_p=0.0, seed=0, mask_needs_grad=mask_grad, mode=mode,
                                  causal_offset=off, **bkw)
        for name, x, r, rl in zip(("dq", "dk", "dv", "dmask"), got, g64, glp):
            if r is None:
                assert x is None
                continue
            assert torch.isfinite(x).all(), f"{name} ({mode.name}) has non-finite values"
            _check(f"{name} ({mode.name})", x, r, rl, dtype, backward=True)


def test_backward_float64_sinks_passed_or_read_from_lse():
    """float64 recomputes the lse in double: the sinks, passed or not (then the forward's float32 lse stands in
    for rows it exceeds), give the same gradients within float64's tolerance of the reference."""
    case = (2, 4, 2, 37, 141, 40, 24, True, 104, None, ALL)
    q, k, v, mask, dout, scale, causal, off, kw = _inputs(case, F64)
    out64, lse, g64 = _ref(q, k, v, mask, scale=scale, causal=causal, off=off, kw=kw, upcast=True, dout=dout)
    bkw = {key: val for key, val in kw.items() if key != "sinks"}
    exact = _cpu.attention_bwd(dout, q, k, v, out64, lse, None, scale=scale, is_causal=causal, dropout_p=0.0,
                               seed=0, mask_needs_grad=False, causal_offset=off, sinks=kw["sinks"], **bkw)
    read = _cpu.attention_bwd(dout, q, k, v, out64, lse, None, scale=scale, is_causal=causal, dropout_p=0.0,
                              seed=0, mask_needs_grad=False, causal_offset=off, **bkw)
    for name, a, b, r in zip(("dq", "dk", "dv"), exact, read, g64):
        testing.assert_close(name, a, r, backward=True)
        # the float32 lse caps the second at ~1e-7 relative: float32's tolerance
        testing.assert_close(name, b.float(), r)


# --------------------------------------------------------------------------------------- awkward inputs
def test_keys_before_every_window_are_never_read():
    """NaN in the keys and values before every row's left window bound: the forward never reads them, nor does
    the backward in whole 64-key tiles outside every row's window; those keys get dk = dv = 0."""
    B, H, Hk, L, S, E = 1, 2, 1, 40, 300, 16
    off, window = 200, (10, 5)  # row i sees keys [i + 190, i + 205]: keys < 190 are never visible
    gen = torch.Generator().manual_seed(5)
    q, k, v, dout = (randn_heads(B, h, n, E, F32, gen=gen) for h, n in ((H, L), (Hk, S), (Hk, S), (H, L)))
    kn, vn = k.clone(), v.clone()
    kn[:, :, :190] = float("nan")
    vn[:, :, :190] = float("nan")
    kw = dict(scale=0.25, is_causal=False, dropout_p=0.0, seed=0, causal_offset=off, window=window, softcap=2.0)
    clean = _cpu.attention_fwd(q, k, v, None, **kw)
    got = _cpu.attention_fwd(q, kn, vn, None, **kw)
    assert torch.equal(got[0], clean[0]) and torch.equal(got[1], clean[1])
    kt, vt = k.clone(), v.clone()
    kt[:, :, :128] = float("nan")  # tiles 0 and 1 of the backward see no row
    vt[:, :, :128] = float("nan")
    for mode in (_cpu.BwdMode.FUSED, _cpu.BwdMode.SPLIT):
        ref = _cpu._attention_bwd(_cpu.module(), dout, q, k, v, clean[0], clean[1], None, mask_needs_grad=False,
                                  mode=mode, **kw)
        bwd = _cpu._attention_bwd(_cpu.module(), dout, q, kt, vt, clean[0], clean[1], None, mask_needs_grad=False,
                                  mode=mode, **kw)
        for name, a, b in zip(("dq", "dk", "dv"), bwd[:3], ref[:3]):
            assert torch.equal(a, b), f"{name} ({mode.name}) differs from the clean run"
        assert (bwd[1][:, :, :190] == 0).all() and (bwd[2][:, :, :190] == 0).all()


def test_fully_hidden_rows():
    """Rows the window hides entirely: out = 0, lse = -inf (the sink with sinks), zero gradients."""
    B, H, L, S, E = 1, 2, 20, 10, 8
    gen = torch.Generator().manual_seed(9)
    q, k, v, dout = (randn_heads(B, H, n, E, F32, gen=gen) for n in (L, S, S, L))
    sinks = torch.tensor([0.5, -1.0])
    kw = dict(scale=0.3, is_causal=True, dropout_p=0.0, seed=0, causal_offset=-12, window=(3, -1))
    out, lse = _cpu.attention_fwd(q, k, v, None, **kw)  # rows i < 12 see no key
    assert (out[:, :, :12] == 0).all() and torch.isneginf(lse[:, :, :12]).all()
    assert torch.isfinite(lse[:, :, 12:]).all()
    out_s, lse_s = _cpu.attention_fwd(q, k, v, None, sinks=sinks, **kw)
    assert (out_s[:, :, :12] == 0).all()
    assert torch.equal(lse_s[0, :, :12], sinks[:, None].expand(H, 12))
    dq, dk, dv, _ = _cpu.attention_bwd(dout, q, k, v, out, lse, None, mask_needs_grad=False, **kw)
    assert (dq[:, :, :12] == 0).all() and torch.isfinite(dq).all()


def test_no_keys_with_sinks():
    q = torch.randn(1, 2, 3, 8)
    k = v = torch.randn(1, 2, 0, 8)
    sinks = torch.tensor([0.25, -2.0])
    out, lse = _cpu.attention_fwd(q, k, v, None, scale=1.0, is_causal=False, dropout_p=0.0, seed=0, sinks=sinks)
    assert (out == 0).all() and torch.equal(lse[0], sinks[:, None].expand(2, 3))


def test_non_contiguous_and_dropout():
    """bshd views and dropout with every variant: the kernels' Philox mask rebuilt by the reference."""
    B, H, Hk, L, S, E = 2, 4, 2, 45, 77, 24
    gen = torch.Generator().manual_seed(3)
    q, k, v = (randn_heads(B, h, n, E, F32, gen=gen, bshd=True) for h, n in ((H, L), (Hk, S), (Hk, S)))
    kw = dict(window=(16, 2), softcap=2.0, alibi_slopes=torch.rand(B, H, generator=gen), sinks=torch.randn(H))
    out, lse = _cpu.attention_fwd(q, k, v, None, scale=0.2, is_causal=True, dropout_p=0.25, seed=77,
                                  causal_offset=S - L, **kw)
    ref = reference.scaled_dot_product_attention(q, k, v, None, 0.25, True, 0.2, True, dropout_seed=77,
                                                 causal_offset=S - L, **kw)
    testing.assert_close("out", out, ref)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DTYPE_IDS.get)
def test_isa_modules(isa, dtype):
    """Every instruction-set module, all variants with a float mask, forward and both backward schedules."""
    mod = isa_module(isa)
    case = (2, 4, 2, 70, 131, 40, 24, True, 61, "float_LS", ALL)
    q, k, v, mask, dout, scale, causal, off, kw = _inputs(case, dtype)
    out, lse = _cpu._attention_fwd(mod, q, k, v, mask, scale=scale, is_causal=causal, dropout_p=0.0, seed=0,
                                   causal_offset=off, **kw)
    out64, lse64, g64 = _ref(q, k, v, mask, scale=scale, causal=causal, off=off, kw=kw, upcast=True, dout=dout)
    rlp = rllp = None
    glp = (None,) * 4
    if dtype == BF16:
        rlp, rllp, glp = _ref(q, k, v, mask, scale=scale, causal=causal, off=off, kw=kw, upcast=False, dout=dout)
    _check("out", out, out64, rlp, dtype)
    _check_lse(lse, lse64, rllp, dtype)
    bkw = {key: val for key, val in kw.items() if key != "sinks"}
    for mode in (_cpu.BwdMode.FUSED, _cpu.BwdMode.SPLIT):
        got = _cpu._attention_bwd(mod, dout, q, k, v, out64.to(dtype), lse64, mask, scale=scale, is_causal=causal,
                                  dropout_p=0.0, seed=0, mask_needs_grad=True, mode=mode, causal_offset=off, **bkw)
        for name, x, r, rl in zip(("dq", "dk", "dv", "dmask"), got, g64, glp):
            _check(f"{name} ({mode.name})", x, r, rl, dtype, backward=True)


@pytest.mark.parametrize("bad,match", [
    (dict(window=(-2, 0)), "window"), (dict(softcap=-1.0), "softcap"),
    (dict(alibi_slopes=torch.ones(3)), "alibi_slopes"), (dict(sinks=torch.ones(2, dtype=F64)), "sinks"),
], ids=["window", "softcap", "alibi-shape", "sinks-dtype"])
def test_bad_arguments(bad, match):
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match=match):
        _cpu.attention_fwd(q, q, q, None, scale=1.0, is_causal=False, dropout_p=0.0, seed=0, **bad)
