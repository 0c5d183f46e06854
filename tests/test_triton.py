"""The Triton attention kernels under TRITON_INTERPRET=1 on CPU tensors, against the float64 reference.

Calls the launchers directly (``attention_fwd`` / ``attention_bwd``: the contract both devices
implement). Tolerances follow fastattn.testing (fp32: small atol against float64; fp16/bf16: at most
2x (fwd) / 3x (bwd) the error of the reference run in the same low precision). The interpreter runs
each kernel with the small ``INTERPRETER_CONFIGS`` tiles, so lengths here cover several blocks, partial
blocks and L != S. The last test compiles a subset of the kernels for sm_80 / sm_90 (no GPU needed).
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

triton = pytest.importorskip("triton")

from fastattn import _philox  # noqa: E402
from fastattn._ops import LO_SHIFT, out_fp32  # noqa: E402
from fastattn import reference as R  # noqa: E402
from fastattn.testing import assert_close  # noqa: E402
from conftest import padding_mask, randn_heads, triton_kernels  # noqa: E402

pytestmark = pytest.mark.triton


A = triton_kernels("attention")
DT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def _make(B, H, Hk, L, S, E, Ev, dtype, layout="bhsd", gen=None):
    """q, k, v (and a dout for q's output) in the (B, H, L, E) view; "bshd" gives transposed views of
    (B, L, H, E) buffers, the layout a transformer's projections produce."""
    return tuple(randn_heads(B, h, n, e, dtype, gen=gen, bshd=layout == "bshd")
                 for h, n, e in ((H, L, E), (Hk, S, E), (Hk, S, Ev), (H, L, Ev)))


def _mask(kind: str, shape, B, H, L, S, dtype, gen):
    """kind: none | bool | float | float32 | pad / pad0 (bool (B,1,1,S) padding; pad0: a batch element
    without keys) | dead (float with -inf rows)."""
    if kind == "none":
        return None
    full = tuple(n if n != 1 else 1 for n in shape)
    if kind == "bool":
        return torch.rand(full, generator=gen) > 0.35
    if kind in ("pad", "pad0"):  # pad0: the first batch element has no key at all
        return padding_mask([0 if kind == "pad0" else S, max(1, S // 3), S - 5][:B], S)
    m = torch.randn(full, generator=gen).to(torch.float32 if kind == "float32" else dtype)
    if kind == "dead":
        m[..., 1::3, :] = float("-inf")  # hide every key of some query rows
        m[..., 5:9] = float("-inf")
    return m


def _reference(q, k, v, mask, dout, *, scale, is_causal, dropout_p, seed, upcast, mask_grad, causal_offset=0):
    """(out, lse, dq, dk, dv, dmask) of fastattn.reference in float64 (upcast) or the input precision;
    autograd sums the mask gradient over its broadcast dims."""
    dt = torch.float64 if upcast else q.dtype
    qr, kr, vr = (x.detach().to(dt).requires_grad_() for x in (q, k, v))
    m = mask
    if mask is not None and mask.dtype != torch.bool:
        m = mask.detach().to(torch.float64 if upcast else mask.dtype).requires_grad_(mask_grad)
    out, lse = R.scaled_dot_product_attention(qr, kr, vr, attn_mask=m, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, enable_gqa=True, upcast=upcast, dropout_seed=seed,
                                              return_lse=True, causal_offset=causal_offset)
    out.backward(dout.to(out.dtype))
    return out.detach(), lse, qr.grad, kr.grad, vr.grad, m.grad if mask_grad else None


def _check(B=2, H=4, Hk=2, L=37, S=45, E=40, Ev=24, dtype="f32", causal=False, mask="none",
           mask_shape=None, dropout_p=0.0, layout="bhsd", mask_grad=False, seed=1234, offset=0):
    """Run the kernels' forward and backward and compare every output with the references. fp16 / bf16 run
    as the op does for training: the forward's out_lo goes to the backward. ``offset``: the causal offset
    (key j visible to query i iff j <= i + offset); "lower-right" stands for S - L."""
    gen = torch.Generator().manual_seed(0)
    dt = DT[dtype]
    q, k, v, dout = _make(B, H, Hk, L, S, E, Ev, dt, layout, gen)
    m = _mask(mask, mask_shape or (B, H, L, S), B, H, L, S, dt, gen)
    scale = 1.0 / math.sqrt(E)
    if offset == "lower-right":
        offset = S - L
    kw = dict(scale=scale, is_causal=causal, dropout_p=dropout_p, seed=seed)
    if offset:
        kw["causal_offset"] = offset
    lp16 = dt != torch.float32
    out, lse, *lo = A.attention_fwd(q, k, v, m, **kw, return_lo=lp16)
    assert out.shape == (B, H, L, Ev) and out.dtype == dt
    assert lse.shape == (B, H, L) and lse.dtype == torch.float32
    dq, dk, dv, dm = A.attention_bwd(dout, q, k, v, out, lse, m, **kw, mask_needs_grad=mask_grad,
                                     out_lo=lo[0] if lo else None)
    want_dm = mask_grad and m is not None and m.dtype != torch.bool
    ref = _reference(q, k, v, m, dout, upcast=True, mask_grad=want_dm, **kw)
    lp = _reference(q, k, v, m, dout, upcast=False, mask_grad=want_dm, **kw) if dt != torch.float32 else [None] * 6
    assert_close("out", out, ref[0], lp[0])
    assert_close("lse", lse, ref[1], None if lp[1] is None else lp[1])
    for name, got, r64, rlp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[2:5], lp[2:5]):
        assert got.shape == r64.shape and got.dtype == dt
        assert_close(name, got, r64, rlp, backward=True)
    if want_dm:
        assert dm.shape == m.shape and dm.dtype == m.dtype
        # A float32 mask on fp16/bf16 inputs: its gradient carries the inputs' precision, so the
        # low-precision policy applies (the cast's rounding is within that reference's error).
        assert_close("dmask", dm.to(dt) if lp[5] is not None else dm, ref[5], lp[5], backward=True)
    else:
        assert dm is None
    if causal:
        # Exactly what a row with no visible key gives: rows i + offset < 0 see no key (out 0, lse -inf,
        # dq 0), and keys j > L - 1 + offset are seen by no row (dk = dv = 0).
        dead = min(max(-offset, 0), L)
        assert (out[:, :, :dead] == 0).all() and torch.isneginf(lse[:, :, :dead]).all()
        assert (dq[:, :, :dead] == 0).all()
        unseen = min(max(L + offset, 0), S)
        assert (dk[:, :, unseen:] == 0).all() and (dv[:, :, unseen:] == 0).all()
    return out, lse, (dq, dk, dv, dm)


# ----------------------------------------------------------------------------------------------------
# Forward + backward against the reference
# ----------------------------------------------------------------------------------------------------
CASES = [
    # id, kwargs
    ("B2-H4-Hk2-L37-S45-E40-Ev24-f32", dict()),
    ("B2-H4-Hk2-L37-S45-E40-Ev24-bf16", dict(dtype="bf16")),
    ("B1-H2-L50-S20-E72-f32-causal", dict(B=1, H=2, Hk=2, L=50, S=20, E=72, Ev=72, causal=True)),
    ("B1-H2-L20-S50-E72-bf16-causal", dict(B=1, H=2, Hk=1, L=20, S=50, E=72, Ev=72, dtype="bf16", causal=True)),
    ("B2-H3-L33-S33-E16-f16-causal-bshd", dict(H=3, Hk=3, L=33, S=33, E=16, Ev=16, dtype="f16", causal=True,
                                               layout="bshd")),
    ("B2-H4-Hk1-L29-S41-E8-Ev40-f32-gqa4", dict(Hk=1, L=29, S=41, E=8, Ev=40)),
    ("B1-H2-L1-S1-E32-f32", dict(B=1, H=2, Hk=2, L=1, S=1, E=32, Ev=32)),
    ("B1-H2-L3-S70-E200-Ev136-f32", dict(B=1, H=2, Hk=1, L=3, S=70, E=200, Ev=136)),
    ("B2-H4-L37-S45-E40-f32-bool", dict(mask="bool")),
    ("B2-H4-L37-S45-E40-bf16-bool-causal", dict(mask="bool", dtype="bf16", causal=True)),
    ("B2-H4-L37-S45-E40-f16-bool-b1h1", dict(mask="bool", dtype="f16", mask_shape=(1, 1, 37, 45))),
    ("B3-H2-L21-S64-E32-f32-pad", dict(B=3, H=2, Hk=2, L=21, S=64, E=32, Ev=32, mask="pad")),
    ("B3-H2-L21-S64-E32-f16-pad-causal-bshd", dict(B=3, H=2, Hk=1, L=21, S=64, E=32, Ev=32, mask="pad",
                                                   dtype="f16", causal=True, layout="bshd")),
    ("B2-H2-L21-S50-E24-bf16-pad0", dict(H=2, Hk=1, L=21, S=50, E=24, Ev=24, mask="pad0", dtype="bf16")),
    ("B2-H4-L37-S45-E40-f32-float", dict(mask="float")),
    ("B2-H4-L37-S45-E40-f16-float32mask-causal", dict(mask="float32", dtype="f16", causal=True)),
    ("B2-H4-L37-S45-E40-f32-dead-rows", dict(mask="dead")),
    ("B2-H4-L37-S45-E40-bf16-dead-rows-causal", dict(mask="dead", dtype="bf16", causal=True)),
]


@pytest.mark.parametrize("kw", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_forward_backward(kw):
    _check(**kw)


MASK_GRAD_CASES = [
    ("full-f32-causal", dict(mask="float", causal=True)),
    ("b1h1-f32", dict(mask="float", mask_shape=(1, 1, 37, 45))),
    ("b1-bf16-causal", dict(mask="float", mask_shape=(1, 4, 37, 45), dtype="bf16", causal=True)),
    ("keys-only-f32", dict(mask="float", mask_shape=(2, 1, 1, 45))),
    ("queries-only-f32-gqa", dict(mask="float", mask_shape=(1, 4, 37, 1))),
    ("h1-i1-j1-f32", dict(mask="float", mask_shape=(2, 1, 1, 1))),
    ("dead-rows-f32", dict(mask="dead", mask_shape=(2, 1, 37, 45))),
    ("float32mask-f16", dict(mask="float32", mask_shape=(1, 4, 37, 45), dtype="f16")),
    ("full-f32-dropout", dict(mask="float", dropout_p=0.25, causal=True)),
    ("b1h1-f32-dropout", dict(mask="float", mask_shape=(1, 1, 37, 45), dropout_p=0.25)),
]


@pytest.mark.parametrize("kw", [c[1] for c in MASK_GRAD_CASES], ids=[c[0] for c in MASK_GRAD_CASES])
def test_mask_gradient(kw):
    _check(mask_grad=True, **kw)


DROPOUT_CASES = [
    ("f32", dict(dropout_p=0.3)),
    ("f32-causal-gqa-bshd", dict(dropout_p=0.2, causal=True, layout="bshd")),
    ("bf16-bool", dict(dropout_p=0.4, dtype="bf16", mask="bool")),
    ("f16-pad-seed-hi", dict(B=3, H=2, Hk=2, L=21, S=64, E=32, Ev=32, mask="pad", dtype="f16", dropout_p=0.1,
                             seed=(7 << 40) + 0xFFFFFFF3)),
]


@pytest.mark.parametrize("kw", [c[1] for c in DROPOUT_CASES], ids=[c[0] for c in DROPOUT_CASES])
def test_dropout_matches_rebuilt_mask(kw):
    """Forward and backward with dropout match the reference that rebuilds the mask from the seed."""
    _check(**kw)


@pytest.mark.parametrize("seed,p", [(0, 0.5), (1234, 0.1), (2**32 + 5, 0.9), (2**63 - 1, 0.3)])
def test_dropout_mask_bits(seed, p):
    """The exact kept elements: q = 0 makes P uniform (1/S) and v = I reads P o Z back as the output."""
    B, H, L, S = 2, 3, 19, 40
    q = torch.zeros(B, H, L, 16)
    k = torch.randn(B, H, S, 16)
    v = torch.eye(S).expand(B, H, S, S)
    out, _ = A.attention_fwd(q, k, v, None, scale=1.0, is_causal=False, dropout_p=p, seed=seed)
    got = (out * S * (1 - p)).round()
    keep = _philox.dropout_keep_mask(seed, B, H, L, S, p)
    assert torch.equal(got, keep.float()), f"{(got != keep.float()).sum()} elements differ"


# ----------------------------------------------------------------------------------------------------
# Causal offset: key j visible to query i iff j <= i + offset (S - L: lower-right)
# ----------------------------------------------------------------------------------------------------
# Interpreter tiles: forward / dQ 32 x 16, dK/dV 16 x 32, dmask 32 x 32 (INTERPRETER_CONFIGS). "LR" is the
# lower-right offset S - L; with L > S it is negative and the first L - S rows see no key (at L - S >= 32 a
# whole forward / dQ query block has an empty key range).
_SMALL = dict(B=1, H=2, Hk=1, E=24, Ev=16)
OFFSET_CASES = [
    ("B1-H2-Hk1-L20-S50-E24-f32-LR30", dict(L=20, S=50)),
    ("B1-H2-Hk1-L20-S50-E24-f16-LR30", dict(L=20, S=50, dtype="f16")),
    ("B1-H2-Hk1-L37-S37-E24-bf16-LR0", dict(L=37, S=37, dtype="bf16")),
    ("B1-H2-Hk1-L70-S21-E24-f32-LR-49-empty-block", dict(L=70, S=21)),
    ("B1-H2-Hk1-L45-S13-E24-bf16-LR-32-empty-block", dict(L=45, S=13, dtype="bf16")),
    ("B1-H2-Hk1-L37-S45-E24-bf16-off-5", dict(L=37, S=45, dtype="bf16", offset=-5)),
    ("B1-H2-Hk1-L29-S41-E24-f32-off100", dict(L=29, S=41, offset=100)),
    ("B1-H2-Hk1-L20-S30-E24-f32-off-1000", dict(L=20, S=30, offset=-1000)),
    ("B1-H4-Hk1-L29-S61-E40-Ev24-f32-LR32-gqa4", dict(H=4, E=40, Ev=24, L=29, S=61)),
    ("B3-H2-Hk1-L21-S64-E24-bf16-LR43-pad", dict(B=3, L=21, S=64, dtype="bf16", mask="pad")),
    ("B2-H2-Hk1-L40-S24-E24-f16-LR-16-pad0", dict(B=2, L=40, S=24, dtype="f16", mask="pad0")),
    ("B1-H2-Hk1-L37-S45-E24-f16-LR8-bool", dict(L=37, S=45, dtype="f16", mask="bool")),
    ("B1-H2-Hk1-L37-S45-E24-f32-off-9-dead-rows", dict(L=37, S=45, mask="dead", offset=-9)),
]


def _offset_case(kw: dict) -> dict:
    return {**_SMALL, "causal": True, "offset": "lower-right", **kw}


@pytest.mark.parametrize("kw", [c[1] for c in OFFSET_CASES], ids=[c[0] for c in OFFSET_CASES])
def test_causal_offset(kw):
    _check(**_offset_case(kw))


OFFSET_GRAD_CASES = [
    # Full-shaped float mask: the dQ kernel stores dS; broadcast ones: the dmask kernel reduces it.
    ("full-f32-LR-25", dict(L=45, S=20, mask="float")),
    ("b1h1-f32-LR27", dict(L=18, S=45, mask="float", mask_shape=(1, 1, 18, 45))),
    ("keys-only-bf16-LR-36", dict(L=50, S=14, mask="float", mask_shape=(1, 1, 1, 14), dtype="bf16")),
    ("full-f32-dropout-LR13", dict(L=24, S=37, mask="float", dropout_p=0.25)),
]


@pytest.mark.parametrize("kw", [c[1] for c in OFFSET_GRAD_CASES], ids=[c[0] for c in OFFSET_GRAD_CASES])
def test_causal_offset_mask_gradient(kw):
    _check(mask_grad=True, **_offset_case(kw))


OFFSET_DROPOUT_CASES = [
    ("f32-gqa-LR21", dict(H=4, L=24, S=45, dropout_p=0.3)),
    ("bf16-LR-40-bshd", dict(L=56, S=16, dtype="bf16", dropout_p=0.2, layout="bshd", seed=(3 << 35) + 17)),
]


@pytest.mark.parametrize("kw", [c[1] for c in OFFSET_DROPOUT_CASES], ids=[c[0] for c in OFFSET_DROPOUT_CASES])
def test_causal_offset_dropout(kw):
    """Dropout with an offset: the kept elements are the same Philox bits (rows and keys keep their indices)."""
    _check(**_offset_case(kw))


def test_causal_offset_is_a_runtime_int():
    """One compiled kernel serves every offset: the JIT signature (as kernels/aot.py derives it, the way the
    compiled launcher specialises) has causal_offset as a plain i32, the same for 0, 1, multiples of 16 and
    negative offsets. The launcher clamps it to [-L, S] (exact: beyond, every / no key is visible), uses 0
    without is_causal and refuses a non-integer."""
    from triton.runtime.jit import JITFunction
    aot = importlib.import_module(A.__name__.rsplit(".", 1)[0] + ".aot")
    B, H, L, S, E = 1, 2, 40, 72, 16
    q, k, v = torch.randn(B, H, L, E), torch.randn(B, H, S, E), torch.randn(B, H, S, E)
    out, lse = torch.empty(B, H, L, E), torch.empty(B, H, L)
    mask = torch.zeros(1, 1, L, S)  # a broadcast float mask with a gradient: the dmask kernel runs too
    sigs = []
    for off in (0, 1, 16, -32, S - L):
        kw = dict(scale=0.25, is_causal=True, dropout_p=0.0, seed=0, causal_offset=off)
        plan = A._fwd_plan(q, k, v, mask, out, lse, **kw)
        plan += A._bwd_plan(out, q, k, v, out, lse, mask, torch.empty_like(q), torch.empty_like(k),
                            torch.empty_like(v), torch.zeros_like(mask), torch.empty_like(lse), **kw)
        per_kernel = {}
        for launch in plan:
            if launch.name == "bwd_preprocess":
                continue
            assert launch.args["causal_offset"] == off, launch.name
            kernel = A.KERNELS[launch.name]  # the interpreter's wrapper keeps the decorator's arguments
            dns = kernel.kwargs["do_not_specialize"] if hasattr(kernel, "kwargs") else kernel.do_not_specialize
            fn = JITFunction(getattr(kernel, "fn", kernel), do_not_specialize=dns)
            args = {**launch.args, **A.INTERPRETER_CONFIGS[launch.name].kwargs()}
            per_kernel[launch.name] = aot._signature(fn, args)
            assert per_kernel[launch.name][0]["causal_offset"] == "i32", launch.name
        assert set(per_kernel) == {"fwd", "bwd_dkdv", "bwd_dq", "bwd_dmask"}
        sigs.append(per_kernel)
    assert all(s == sigs[0] for s in sigs[1:])
    assert A._causal_offset(7, True, 10, 20) == 7
    assert A._causal_offset(10**12, True, 10, 20) == 20 and A._causal_offset(-10**12, True, 10, 20) == -10
    assert A._causal_offset(-5, False, 10, 20) == 0
    with pytest.raises(TypeError):
        A._causal_offset(2.5, True, 10, 20)


# ----------------------------------------------------------------------------------------------------
# Structure: skipped blocks, empty inputs, determinism
# ----------------------------------------------------------------------------------------------------
def test_padding_blocks_are_skipped():
    """Key blocks past a padding mask's last visible key are never read: NaN there cannot leak."""
    bn = min(A.INTERPRETER_CONFIGS[n].block_n for n in ("fwd", "bwd_dq"))
    B, H, L, S, E = 2, 2, 24, 4 * bn, 16
    valid = torch.tensor([bn + 3, 2 * bn])
    mask = padding_mask(valid, S)
    q, k, v = torch.randn(B, H, L, E), torch.randn(B, H, S, E), torch.randn(B, H, S, E)
    k_nan, v_nan = k.clone(), v.clone()
    for b in range(B):
        first_dead_block = -(-int(valid[b]) // bn) * bn
        k_nan[b, :, first_dead_block:] = float("nan")
        v_nan[b, :, first_dead_block:] = float("nan")
    kw = dict(scale=0.25, is_causal=False, dropout_p=0.0, seed=0)
    out, lse = A.attention_fwd(q, k_nan, v_nan, mask, **kw)
    ref, ref_lse = A.attention_fwd(q, k, v, mask, **kw)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    dout = torch.randn_like(out)
    grads = A.attention_bwd(dout, q, k_nan, v_nan, out, lse, mask, **kw, mask_needs_grad=False)
    ref_grads = A.attention_bwd(dout, q, k, v, ref, ref_lse, mask, **kw, mask_needs_grad=False)
    assert torch.equal(grads[0], ref_grads[0])
    for got, want in zip(grads[1:3], ref_grads[1:3]):  # hidden keys: zero gradient, not NaN
        assert torch.equal(got, want)


def _up(x: int, n: int) -> int:
    return -(-x // n) * n


SKIP_CASES = [  # (L, S, offset)
    ("top-left-L20-S64", 20, 64, 0),
    ("LR-L40-S72", 40, 72, 32),
    ("LR-L72-S40", 72, 40, -32),
    ("off-7-L40-S72", 40, 72, -7),
]


@pytest.mark.parametrize("L,S,off", [c[1:] for c in SKIP_CASES], ids=[c[0] for c in SKIP_CASES])
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # rows that see planted NaN
def test_causal_blocks_are_skipped(L, S, off):
    """Key blocks past the diagonal j <= i + off are never read (NaN planted there cannot leak):
    keys that no query sees (j >= L + off) by any kernel; keys past query block 0's diagonal by the forward
    and dQ kernels (which then still write block 0's rows: out 0 / lse -inf where its key range is empty);
    query blocks above the last key block's diagonal by the dK/dV kernel."""
    B, H, E = 1, 2, 16
    q, k, v = torch.randn(B, H, L, E), torch.randn(B, H, S, E), torch.randn(B, H, S, E)
    cfg = A.INTERPRETER_CONFIGS
    kw = dict(scale=0.25, is_causal=True, dropout_p=0.0, seed=0, causal_offset=off)
    ref, ref_lse = A.attention_fwd(q, k, v, None, **kw)
    dout = torch.randn_like(ref)
    ref_grads = A.attention_bwd(dout, q, k, v, ref, ref_lse, None, **kw, mask_needs_grad=False)

    # Keys no query sees: a forward / dQ query block m reads key blocks below roundup(m + BLOCK_M + off,
    # BLOCK_N); a dK/dV key block n runs when n < L + off.
    first_hidden = max(max(_up(_up(L, cfg[n].block_m) + off, cfg[n].block_n) for n in ("fwd", "bwd_dq")),
                       _up(L + off, cfg["bwd_dkdv"].block_n), 0)
    if first_hidden < S:
        k_nan, v_nan = k.clone(), v.clone()
        k_nan[:, :, first_hidden:] = float("nan")
        v_nan[:, :, first_hidden:] = float("nan")
        out, lse = A.attention_fwd(q, k_nan, v_nan, None, **kw)
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
        dq, dk, dv, _ = A.attention_bwd(dout, q, k_nan, v_nan, out, lse, None, **kw, mask_needs_grad=False)
        assert torch.isfinite(dq).all()
        assert (dk[:, :, L + off:] == 0).all() and (dv[:, :, L + off:] == 0).all()
        assert torch.equal(dq, ref_grads[0]) and torch.equal(dk, ref_grads[1]) and torch.equal(dv, ref_grads[2])

    # Query block 0 of the forward and dQ kernels: keys from roundup(BLOCK_M + off, BLOCK_N) on are past its
    # diagonal. NaN in v there reaches the output through 0 * NaN if such a key block is loaded.
    rows0 = min(L, cfg["fwd"].block_m, cfg["bwd_dq"].block_m)
    cut = min(max(max(_up(cfg[n].block_m + off, cfg[n].block_n) for n in ("fwd", "bwd_dq")), 0), S)
    assert cut < S
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, cut:] = float("nan")
    v_nan[:, :, cut:] = float("nan")
    out, lse = A.attention_fwd(q, k_nan, v_nan, None, **kw)
    assert torch.equal(out[:, :, :rows0], ref[:, :, :rows0]) and torch.equal(lse[:, :, :rows0], ref_lse[:, :, :rows0])
    if off + cfg["fwd"].block_m <= 0:  # an empty key range: block 0 is still written, out 0 and lse -inf
        assert (out[:, :, :rows0] == 0).all() and torch.isneginf(lse[:, :, :rows0]).all()
    dq = A.attention_bwd(dout, q, k_nan, v_nan, ref, ref_lse, None, **kw, mask_needs_grad=False)[0]
    assert torch.equal(dq[:, :, :rows0], ref_grads[0][:, :, :rows0])

    # The last key block of the dK/dV kernel starts at query block rounddown(n - off, BLOCK_M): NaN in dO of
    # the rows above reaches dK / dV (0 * NaN) if such a query block is loaded.
    bm, bn = cfg["bwd_dkdv"].block_m, cfg["bwd_dkdv"].block_n
    last_n = _up(S, bn) - bn
    above = min(max(last_n - off, 0) // bm * bm, L)
    assert above > 0
    dout_nan = dout.clone()
    dout_nan[:, :, :above] = float("nan")
    _, dk, dv, _ = A.attention_bwd(dout_nan, q, k, v, ref, ref_lse, None, **kw, mask_needs_grad=False)
    assert torch.equal(dk[:, :, last_n:], ref_grads[1][:, :, last_n:])
    assert torch.equal(dv[:, :, last_n:], ref_grads[2][:, :, last_n:])


def test_kv_range():
    mask = torch.zeros(3, 2, 1, 10, dtype=torch.bool)
    mask[0, 0, 0, 2:5] = True
    mask[0, 1, 0, [0, 9]] = True
    mask[2, :, 0, 7] = True
    r = A._kv_range_of(mask, 10)
    assert r.tolist() == [[[2, 5], [0, 10]], [[0, 0], [0, 0]], [[7, 8], [7, 8]]]
    fm = torch.zeros(1, 1, 1, 10).masked_fill(~mask[:1, :1], float("-inf"))
    assert A._kv_range_of(fm, 10).tolist() == [[[2, 5]]]


@pytest.mark.parametrize("shape", [(0, 2, 5, 3), (2, 2, 0, 3), (2, 2, 5, 0)], ids=["B0", "L0", "S0"])
def test_empty(shape):
    B, H, L, S = shape
    q, k, v = torch.randn(B, H, L, 8), torch.randn(B, H, S, 8), torch.randn(B, H, S, 4)
    kw = dict(scale=0.3, is_causal=False, dropout_p=0.0, seed=0)
    out, lse = A.attention_fwd(q, k, v, None, **kw)
    assert out.shape == (B, H, L, 4) and lse.shape == (B, H, L)
    if S == 0:
        assert (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv, dm = A.attention_bwd(torch.randn_like(out), q, k, v, out, lse, None, **kw, mask_needs_grad=False)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and dm is None
    assert not dq.any() and not dk.any() and not dv.any()


def test_output_layout_and_strided_mask():
    """out follows the query's layout (fastattn._ops.empty_output: a contiguous query here, a contiguous out);
    masks are read through any strides, including stride-0 expanded dims, without copies."""
    B, H, L, S, E = 2, 3, 17, 23, 16
    q, k, v = torch.randn(B, H, L, E), torch.randn(B, H, S, E), torch.randn(B, H, S, E)
    base = torch.randn(B, S, L).transpose(1, 2)  # (B, L, S) with transposed strides
    mask = base.unsqueeze(1).expand(B, H, L, S)  # stride 0 over heads at full size
    kw = dict(scale=0.25, is_causal=False, dropout_p=0.0, seed=0)
    out, lse = A.attention_fwd(q, k, v, mask, **kw)
    assert out.is_contiguous()
    ref = R.scaled_dot_product_attention(q, k, v, attn_mask=mask.contiguous())
    assert_close("out", out, ref)
    q_bshd = q.transpose(1, 2).contiguous().transpose(1, 2)  # a (B, L, H, E) buffer: out is (B, L, H, Ev) too
    out, _ = A.attention_fwd(q_bshd, k, v, mask, **kw)
    assert out.stride() == q_bshd.stride()
    assert_close("out", out, ref)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_out_lo(dtype):
    """out_lo (fp16 / bf16 training): out and lse keep their bits, out * (1 + out_lo * 2^-K) is the fp32
    output, and the backward reads it (strided copies of out_lo too) with or without it within the policy."""
    gen = torch.Generator().manual_seed(2)
    dt = DT[dtype]
    q, k, v, dout = _make(2, 4, 2, 37, 32, 24, 40, dt, "bshd", gen)
    kw = dict(scale=0.2, is_causal=True, dropout_p=0.1, seed=99)
    out, lse, lo = A.attention_fwd(q, k, v, None, **kw, return_lo=True)
    out0, lse0 = A.attention_fwd(q, k, v, None, **kw)
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    assert lo.dtype == torch.int16 and lo.stride() == out.stride() and A._LO_SHIFT[dt] == LO_SHIFT[dt]
    # q = 0, not causal: P = 1/32, exact in fp16 / bf16 (the kernel rounds P for the P V dot, which out_lo
    # does not undo), so the fp32 output is the exact one up to fp32 rounding.
    kw0 = dict(kw, is_causal=False)
    out, _, lo = A.attention_fwd(torch.zeros_like(q), k, v, None, **kw0, return_lo=True)
    ref = R.scaled_dot_product_attention(torch.zeros_like(q), k, v, dropout_p=0.1, scale=0.2, enable_gqa=True,
                                         upcast=True, dropout_seed=99)
    got = out_fp32(out, lo).double()
    err_out, err_got = (out.double() - ref).abs().max().item(), (got - ref).abs().max().item()
    assert err_got < err_out / 64 and err_got < 1e-5 * ref.abs().max().item(), (err_got, err_out)
    a = A.attention_bwd(dout, q, k, v, out, lse, None, **kw, mask_needs_grad=False, out_lo=lo)
    b = A.attention_bwd(dout, q, k, v, out, lse, None, **kw, mask_needs_grad=False, out_lo=lo.contiguous())
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)
    with pytest.raises(TypeError, match="return_lo"):
        A.attention_fwd(q.float(), k.float(), v.float(), None, **kw, return_lo=True)


def test_deterministic():
    gen = torch.Generator().manual_seed(1)
    q, k, v, dout = _make(2, 4, 2, 37, 45, 32, 32, torch.float16, "bshd", gen)
    mask = torch.randn(1, 4, 37, 45, generator=gen)
    kw = dict(scale=0.2, is_causal=True, dropout_p=0.2, seed=99)
    runs = []
    for _ in range(2):
        out, lse = A.attention_fwd(q, k, v, mask, **kw)
        runs.append((out, lse, *A.attention_bwd(dout, q, k, v, out, lse, mask, **kw, mask_needs_grad=True)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_config_table_covers_every_bucket():
    for name, table in A.CONFIGS.items():
        assert name in A.KERNELS and name in A.INTERPRETER_CONFIGS
        for bucket in A.HEAD_BUCKETS:
            for dclass in ("16", "32"):
                rows = table[(bucket, dclass)]
                assert rows, (name, bucket, dclass)
                for c in rows:
                    assert c.block_n == 0 or c.block_n % 16 == 0
    for name in A.CONFIGS:  # every call, whatever its features, has at least one config to run
        for bucket in A.HEAD_BUCKETS:
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                assert A.candidate_configs(name, bucket, dtype, heavy=True)
                assert len(A.candidate_configs(name, bucket, dtype, heavy=False)) >= len(
                    A.candidate_configs(name, bucket, dtype, heavy=True))
    assert A.head_bucket(40, 24) == 64 and A.head_bucket(72, 16) == 128 and A.head_bucket(8, 200) == 256
    with pytest.raises(ValueError):
        A.head_bucket(257, 64)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_80 / sm_90
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_aot_compile_subset():
    """Every kernel, first config of the 128 bucket, both feature variants, sm_80 and sm_90: compiles,
    runs on tensor cores, does not spill, fits shared memory. (`fastattn kernels` does all configs.)"""
    aot = importlib.import_module(A.__name__.rsplit(".", 1)[0] + ".aot")
    rows = aot.compile_report(archs=(80, 90), dtypes=("bf16",), buckets=(128,), max_configs=1, workers=2)
    assert rows
    print("\n" + aot.format_table(rows))
    for r in rows:
        where = f"{r['kernel']} {r['config']} {r['variant']} sm_{r['arch']}"
        assert r["error"] is None, f"{where}: {r['error']}"
        assert r["spill_bytes"] == 0 and r["local_bytes"] == 0, f"{where}: spills {r['spill_bytes']} bytes"
        assert r["shared"] <= r["shared_limit"], f"{where}: {r['shared']} bytes of shared memory"
        if r["kernel"] != "bwd_preprocess":
            assert r["tensor_cores"] in (("mma",) if r["arch"] == 80 else ("mma", "wgmma")), where
