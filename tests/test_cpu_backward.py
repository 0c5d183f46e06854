"""The C++ CPU backward kernel (fastattn._cpu.attention_bwd) against float64 autograd of fastattn.reference.

The kernel gets the reference's own ``out`` (rounded to the input dtype) and ``lse``, so these tests
check the backward alone; test_sdpa.py covers forward + backward through the public API.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

import fastattn
from fastattn import _cpu, reference, testing
from fastattn._ops import out_fp32
from conftest import DTYPE_IDS, isa_module, isa_params, padding_mask, randn_heads

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


# ------------------------------------------------------------------------------------------- inputs
def _randn(*shape, dtype, gen, layout="bhsd"):
    """(B, H, N, D) tensor drawn in float64; layout "bshd" gives a transposed view of a (B, N, H, D) buffer."""
    return randn_heads(*shape, dtype, gen=gen, bshd=layout == "bshd", draw_dtype=torch.float64)


def _mask(kind, B, H, L, S, dtype, gen):
    """Masks by kind: bool_* (True = attend) or float_* (additive; these get a gradient)."""
    if kind is None:
        return None
    if kind == "bool_pad":  # (B,1,1,S) key padding, the last batch keeps 1 key
        lens = torch.tensor([max(1, S - 3 * b) for b in range(B)])
        lens[-1] = 1
        return padding_mask(lens, S)
    if kind == "bool_full":
        return torch.rand(B, H, L, S, generator=gen) > 0.4
    if kind == "bool_rows":  # (B,1,L,S) with every other query row fully masked
        m = torch.rand(B, 1, L, S, generator=gen) > 0.3
        m[:, :, ::2] = False
        return m
    if kind == "bool_dead":  # every key hidden for every query
        return torch.zeros(1, 1, 1, S, dtype=torch.bool)
    shapes = {"float_LS": (1, 1, L, S), "float_BS": (B, 1, 1, S), "float_full": (B, H, L, S),
              "float_BHL1": (B, H, L, 1), "float_1H11": (1, H, 1, 1)}
    if kind in shapes:
        return torch.randn(*shapes[kind], generator=gen, dtype=torch.float64).to(dtype)
    if kind == "float_ninf":  # -inf entries and fully hidden rows
        m = torch.randn(B, 1, L, S, generator=gen, dtype=torch.float64)
        m[torch.rand(B, 1, L, S, generator=gen) > 0.6] = float("-inf")
        m[:, :, 1::3] = float("-inf")
        return m.to(dtype)
    raise ValueError(kind)


def _reference_grads(q, k, v, mask, dout, *, causal, p, seed, scale, upcast, offset=0):
    """(out, lse, (dq, dk, dv, dmask|None)) by autograd through fastattn.reference; ``offset``: the causal
    diagonal offset (key j visible to query i iff j <= i + offset)."""
    dt = F64 if upcast else q.dtype
    leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
    out, lse = reference.scaled_dot_product_attention(*leaves, mask, p, causal, scale, True, upcast=upcast,
                                                      dropout_seed=seed, return_lse=True, causal_offset=offset)
    m = mask
    if mask is not None and mask.dtype != torch.bool:
        # Autograd through softmax gives NaN for a row whose float mask is -inf at every visible key
        # (exp(-inf - -inf)); the true gradient of such a row is 0 and it adds nothing to dk/dv. So the
        # gradients come from a copy whose dead rows have mask 0 and dout 0 (then their dS is exactly 0).
        # (A mask broadcast over the queries cannot be filled per row: it is left as it is.)
        L, S = q.shape[-2], k.shape[-2]
        seen = mask != float("-inf")
        if causal:
            seen = seen & torch.ones(L, S, dtype=torch.bool).tril(diagonal=offset)
        dead = ~seen.any(-1, keepdim=True)
        m = mask.detach()
        if dead.any() and mask.shape[-2] == L:
            m = m.masked_fill(dead, 0.0)
            dout = dout.masked_fill(dead, 0.0)
        m = m.to(dt if upcast else mask.dtype).requires_grad_()
        leaves = [t.detach().requires_grad_() for t in leaves] + [m]
        out_g = reference.scaled_dot_product_attention(*leaves[:3], m, p, causal, scale, True, upcast=upcast,
                                                       dropout_seed=seed, causal_offset=offset)
    else:
        out_g = out
    grads = torch.autograd.grad(out_g, leaves, dout.to(out_g.dtype))
    return out.detach(), lse, (*grads[:3], grads[3] if len(grads) > 3 else None)


def _check(name, got, ref64, reflp, dtype):
    """The tolerance policy of fastattn.testing; a float32 mask gradient of a low-precision call is judged
    by the low-precision rule (its inputs carry that precision's rounding)."""
    if got.dtype != dtype and dtype in (F16, BF16):
        got = got.to(dtype)
    testing.assert_close(name, got, ref64, reflp if dtype in (F16, BF16) else None, backward=True)


def _case(B, H, Hk, L, S, E, Ev, *, dtype=F32, layout="bhsd", mask=None, causal=False, p=0.0, mask_dtype=None,
          seed=1234, module=None, mode=0, offset=0):
    # crc32, not hash(): str hashes change from process to process.
    key = (B, H, Hk, L, S, E, Ev, mask, causal, p) + ((offset,) if offset else ())
    gen = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    q = _randn(B, H, L, E, dtype=dtype, gen=gen, layout=layout)
    k = _randn(B, Hk, S, E, dtype=dtype, gen=gen, layout=layout)
    v = _randn(B, Hk, S, Ev, dtype=dtype, gen=gen, layout=layout)
    m = _mask(mask, B, H, L, S, mask_dtype or dtype, gen)
    dout = _randn(B, H, L, Ev, dtype=dtype, gen=gen, layout=layout)
    scale = 1.0 / math.sqrt(E)
    out64, lse, g64 = _reference_grads(q, k, v, m, dout, causal=causal, p=p, seed=seed, scale=scale, upcast=True,
                                       offset=offset)
    glp = (None,) * 4
    if dtype in (F16, BF16):
        _, _, glp = _reference_grads(q, k, v, m, dout, causal=causal, p=p, seed=seed, scale=scale, upcast=False,
                                     offset=offset)
    mask_grad = m is not None and m.dtype != torch.bool
    kwargs = dict(scale=scale, is_causal=causal, dropout_p=p, seed=seed, mask_needs_grad=mask_grad)
    if offset:
        kwargs["causal_offset"] = offset
    args = (dout, q, k, v, out64.to(dtype), lse, m)
    if module is None and mode == 0:
        got = _cpu.attention_bwd(*args, **kwargs)
    else:
        got = _cpu._attention_bwd(module or _cpu.module(), *args, mode=mode, **kwargs)
    return got, g64, glp, args, kwargs


def _assert_grads(got, g64, glp, dtype):
    dq, dk, dv, dmask = got
    for name, x, r, rl in zip(("dq", "dk", "dv"), (dq, dk, dv), g64, glp):
        assert x.dtype == dtype and x.shape == r.shape
        assert torch.isfinite(x).all(), f"{name} has non-finite values"
        _check(name, x, r, rl, dtype)
    if g64[3] is None:
        assert dmask is None
    else:
        assert dmask is not None and dmask.shape == g64[3].shape
        assert torch.isfinite(dmask).all(), "dmask has non-finite values"
        _check("dmask", dmask, g64[3], glp[3], dtype)


# -------------------------------------------------------------------------------------- shape cases
# (B, H, Hk, L, S, E, Ev): head dims not powers of two, L != S, lengths 1 / not block multiples, GQA.
SHAPES = [
    (1, 2, 2, 1, 7, 16, 16),
    (2, 2, 1, 7, 1, 40, 40),
    (1, 4, 2, 97, 130, 64, 64),
    (2, 3, 3, 130, 97, 111, 111),
    (1, 2, 2, 130, 130, 40, 24),
    (2, 4, 1, 1, 97, 16, 111),
    (1, 1, 1, 97, 7, 64, 16),
]


def _shape_id(s):
    B, H, Hk, L, S, E, Ev = s
    return f"B{B}-H{H}-Hk{Hk}-L{L}-S{S}-E{E}-Ev{Ev}"


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_shapes_f32(shape, layout):
    got, g64, glp, _, _ = _case(*shape, layout=layout)
    _assert_grads(got, g64, glp, F32)


# ------------------------------------------------------------------------- masks, causal, dropout
MASK_CASES = [
    # (mask kind, causal, dropout_p)
    ("bool_pad", False, 0.0),
    ("bool_pad", True, 0.0),
    ("bool_full", False, 0.2),
    ("bool_rows", True, 0.0),
    ("bool_dead", False, 0.0),
    ("float_LS", False, 0.0),
    ("float_LS", True, 0.2),
    ("float_BS", False, 0.0),
    ("float_full", True, 0.0),
    ("float_full", False, 0.2),
    ("float_BHL1", False, 0.0),
    ("float_1H11", True, 0.0),
    ("float_ninf", False, 0.0),
    ("float_ninf", True, 0.2),
    (None, True, 0.0),
    (None, False, 0.3),
]


def _mask_id(c):
    kind, causal, p = c
    return f"{kind or 'nomask'}{'-causal' if causal else ''}{f'-p{p}' if p else ''}"


@pytest.mark.parametrize("dtype", [F32, F64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mc", MASK_CASES, ids=_mask_id)
def test_masks(mc, dtype):
    kind, causal, p = mc
    got, g64, glp, _, _ = _case(2, 4, 2, 97, 130, 40, 24, dtype=dtype, layout="bshd", mask=kind, causal=causal, p=p)
    _assert_grads(got, g64, glp, dtype)


LOWP_CASES = [
    ((2, 4, 2, 97, 130, 40, 24), "float_LS", True, 0.0),
    ((1, 2, 2, 130, 97, 64, 64), "bool_rows", False, 0.2),
    ((2, 2, 1, 7, 130, 111, 16), "float_full", True, 0.2),
    ((1, 2, 2, 97, 97, 16, 16), None, False, 0.0),
]


@pytest.mark.parametrize("dtype", [BF16, F16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", LOWP_CASES, ids=lambda c: f"{_shape_id(c[0])}-{_mask_id(c[1:])}")
def test_low_precision(case, dtype):
    shape, kind, causal, p = case
    got, g64, glp, _, _ = _case(*shape, dtype=dtype, layout="bshd", mask=kind, causal=causal, p=p)
    _assert_grads(got, g64, glp, dtype)


@pytest.mark.parametrize("dtype", [BF16, F64], ids=DTYPE_IDS.get)
def test_float32_mask_of_other_dtype(dtype):
    got, g64, glp, _, _ = _case(2, 2, 2, 33, 70, 32, 32, dtype=dtype, mask="float_BS", mask_dtype=F32, causal=True)
    assert got[3].dtype == F32
    _assert_grads(got, g64, glp, dtype)


def test_fully_masked_rows_give_zero_gradients():
    got, g64, _, args, _ = _case(2, 2, 2, 9, 20, 16, 16, mask="float_ninf")
    dq, dk, dv, dmask = got
    dead = torch.isneginf(args[5])  # lse = -inf rows
    assert dead.any()
    assert torch.equal(dq[dead], torch.zeros_like(dq[dead]))
    assert torch.equal(dmask.expand(2, 2, 9, 20)[dead], torch.zeros_like(dmask.expand(2, 2, 9, 20)[dead]))
    (dq0, dk0, dv0, _), *_ = _case(1, 2, 2, 9, 20, 16, 16, mask="bool_dead")
    for g in (dq0, dk0, dv0):
        assert torch.equal(g, torch.zeros_like(g))


def test_broadcast_dout():
    """dout from out.sum(): an expanded tensor with zero strides, read in place."""
    gen = torch.Generator().manual_seed(3)
    B, H, L, S, E = 2, 2, 11, 13, 8
    q, k, v = (_randn(B, H, n, E, dtype=F32, gen=gen) for n in (L, S, S))
    out, lse = reference.scaled_dot_product_attention(q, k, v, upcast=False, return_lse=True)
    dout = torch.ones(1, 1, 1, 1).expand(B, H, L, E)
    dq, dk, dv, _ = _cpu.attention_bwd(dout, q, k, v, out, lse, None, scale=E**-0.5, is_causal=False,
                                       dropout_p=0.0, seed=0, mask_needs_grad=False)
    _, _, g64 = _reference_grads(q, k, v, None, dout.contiguous(), causal=False, p=0.0, seed=0, scale=E**-0.5,
                                 upcast=True)
    for name, x, r in zip(("dq", "dk", "dv"), (dq, dk, dv), g64):
        _check(name, x, r, None, F32)


@pytest.mark.parametrize("L,S", [(0, 5), (5, 0), (0, 0)])
def test_empty(L, S):
    q, k, v = torch.randn(2, 2, L, 8), torch.randn(2, 2, S, 8), torch.randn(2, 2, S, 4)
    out, lse = torch.zeros(2, 2, L, 4), torch.full((2, 2, L), float("-inf"))
    mask = torch.zeros(1, 1, L, S)
    dq, dk, dv, dm = _cpu.attention_bwd(torch.ones_like(out), q, k, v, out, lse, mask, scale=0.3, is_causal=True,
                                        dropout_p=0.1, seed=1, mask_needs_grad=True)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and dm.shape == mask.shape
    for g in (dq, dk, dv, dm):
        assert not g.any()


# ------------------------------------------------------------------------------------- determinism
def _det_case(**kw):
    return dict(B=2, H=4, Hk=2, L=130, S=97, E=40, Ev=24, mask="float_BS", causal=True, p=0.2) | kw


@pytest.mark.parametrize("dtype", [F32, BF16], ids=DTYPE_IDS.get)
def test_deterministic_runs_and_modes(dtype):
    """Two runs, the fused and the split schedules, and 1 vs several threads: bit-identical."""
    kw = _det_case(dtype=dtype)
    shape = [kw.pop(n) for n in ("B", "H", "Hk", "L", "S", "E", "Ev")]
    first, *_ = _case(*shape, **kw)
    again, *_ = _case(*shape, **kw)
    fused, *_ = _case(*shape, mode=1, **kw)
    split, *_ = _case(*shape, mode=2, **kw)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single, *_ = _case(*shape, **kw)
        torch.set_num_threads(3)
        three, *_ = _case(*shape, mode=2, **kw)
    finally:
        torch.set_num_threads(threads)
    for other in (again, fused, split, single, three):
        for a, b in zip(first, other):
            assert torch.equal(a, b)


def test_split_matches_reference_with_unbroadcast_mask_grad():
    got, g64, glp, _, _ = _case(1, 2, 1, 97, 130, 40, 40, mask="float_full", causal=True, p=0.2, mode=2)
    _assert_grads(got, g64, glp, F32)


# --------------------------------------------------------------------------------------------- ISAs
@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=DTYPE_IDS.get)
def test_isa_modules(isa, dtype):
    mod = isa_module(isa)
    for mode in (1, 2):
        got, g64, glp, _, _ = _case(2, 4, 2, 97, 70, 40, 24, dtype=dtype, layout="bshd", mask="float_LS",
                                    causal=True, p=0.2, module=mod, mode=mode)
        _assert_grads(got, g64, glp, dtype)


# ----------------------------------------------------------------------------- causal diagonal offset
# is_causal with causal_offset: key j is visible to query i iff j <= i + causal_offset (0: top-left, S - L:
# lower-right). (L, S, offset): lower-right for L < S, L == S and L > S (the first L - S rows see no key),
# lengths that are multiples of no block (tiles are 64 x 64), several key / query blocks, whole tiles and query
# blocks that see no key; then other offsets: negative, past S, and ones under which no row sees a key.
OFFSET_CASES = [
    (3, 97, 94), (1, 300, 299), (40, 300, 260), (70, 70, 0), (97, 33, -64), (200, 50, -150), (130, 97, -33),
    (97, 130, -40), (97, 130, 7), (33, 70, 500), (33, 70, -33), (33, 70, -1000),
]


def _off_id(case):
    L, S, off = case
    return f"L{L}-S{S}-off{off}"


def _assert_offset_zeros(got, L, S, offset):
    """dq = 0 on rows that see no key (i + offset < 0); dk = dv = 0 on keys no row sees (j > L - 1 + offset)."""
    dq, dk, dv, _ = got
    dead = torch.arange(L) + offset < 0
    unseen = torch.arange(S) > L - 1 + offset
    assert torch.equal(dq[:, :, dead], torch.zeros_like(dq[:, :, dead]))
    for g in (dk, dv):
        assert torch.equal(g[:, :, unseen], torch.zeros_like(g[:, :, unseen]))


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", OFFSET_CASES, ids=_off_id)
def test_causal_offset(case, dtype, isa):
    """GQA over (B, L, H, E) views, the fused and the split schedules: the reference, and the same bits."""
    L, S, off = case
    mod = isa_module(isa)
    runs = []
    for mode in (1, 2):
        got, g64, glp, _, _ = _case(2, 4, 2, L, S, 40, 24, dtype=dtype, layout="bshd", causal=True, offset=off,
                                    module=mod, mode=mode)
        _assert_grads(got, g64, glp, dtype)
        _assert_offset_zeros(got, L, S, off)
        runs.append(got)
    for a, b in zip(*runs):
        assert (a is None and b is None) or torch.equal(a, b)


OFFSET_MASK_CASES = [
    # (mask kind, dropout_p)
    ("bool_pad", 0.0),
    ("bool_pad", 0.2),
    ("bool_rows", 0.0),
    ("float_LS", 0.0),
    ("float_LS", 0.2),
    ("float_BS", 0.0),
    ("float_full", 0.0),
    ("float_ninf", 0.2),
    (None, 0.3),
]


@pytest.mark.parametrize("dtype", [F32, F64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mc", OFFSET_MASK_CASES, ids=lambda c: _mask_id((c[0], True, c[1])))
@pytest.mark.parametrize("case", [(3, 97, 94), (97, 33, -64), (40, 300, 260), (200, 50, -150), (97, 130, 7)],
                         ids=_off_id)
def test_causal_offset_masks(case, mc, dtype):
    """A mask (and its gradient) and dropout together with the diagonal; rows both leave without a key get
    zero gradients."""
    L, S, off = case
    kind, p = mc
    got, g64, glp, _, _ = _case(2, 4, 2, L, S, 40, 24, dtype=dtype, layout="bshd", mask=kind, causal=True, p=p,
                                offset=off)
    _assert_grads(got, g64, glp, dtype)
    _assert_offset_zeros(got, L, S, off)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mc", [("bool_pad", 0.2), ("float_LS", 0.0), (None, 0.0)],
                         ids=lambda c: _mask_id((c[0], True, c[1])))
@pytest.mark.parametrize("case", [(3, 97, 94), (97, 33, -64), (40, 300, 260), (200, 50, -150)], ids=_off_id)
def test_causal_offset_low_precision(case, mc, dtype):
    """The training path: the kernel's own forward with out_lo, then the backward (delta from the fp32 output,
    csrc/out_lo.h encode_lo), against the reference gradients."""
    L, S, off = case
    kind, p = mc
    _, g64, glp, args, kw = _case(2, 4, 2, L, S, 40, 24, dtype=dtype, layout="bshd", mask=kind, causal=True, p=p,
                                  offset=off)
    dout, q, k, v, _, _, m = args
    out, lse, lo = _cpu.attention_fwd(q, k, v, m, scale=kw["scale"], is_causal=True, dropout_p=p, seed=kw["seed"],
                                      return_lo=True, causal_offset=off)
    assert torch.isneginf(lse[:, :, torch.arange(L) + off < 0]).all()
    got = _cpu.attention_bwd(dout, q, k, v, out, lse, m, out_lo=lo, **kw)
    _assert_grads(got, g64, glp, dtype)
    _assert_offset_zeros(got, L, S, off)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", [(3, 97, 94), (40, 300, 260), (97, 130, 0), (70, 70, 0), (97, 33, -64),
                                  (200, 50, -150), (33, 70, -33), (33, 70, 500)], ids=_off_id)
def test_causal_offset_unseen_keys_never_read(case, dtype, isa):
    """NaN in the keys and values past every row's diagonal (j > L - 1 + offset): every schedule gives the
    same bits as on the clean inputs (tiles past the diagonal are skipped; partly visible tiles give those
    keys P = dS = 0 exactly), and those keys get dk = dv = 0."""
    L, S, off = case
    mod = isa_module(isa)
    gen = torch.Generator().manual_seed(23)
    B, H, Hk, E = 2, 4, 2, 40
    q = _randn(B, H, L, E, dtype=dtype, gen=gen)
    k, v = (_randn(B, Hk, S, E, dtype=dtype, gen=gen) for _ in range(2))
    dout = _randn(B, H, L, E, dtype=dtype, gen=gen)
    scale = E ** -0.5
    out64, lse, g64 = _reference_grads(q, k, v, None, dout, causal=True, p=0.0, seed=0, scale=scale, upcast=True,
                                       offset=off)
    glp = (None,) * 4
    if dtype == BF16:
        _, _, glp = _reference_grads(q, k, v, None, dout, causal=True, p=0.0, seed=0, scale=scale, upcast=False,
                                     offset=off)
    unseen = torch.arange(S) > L - 1 + off
    kn, vn = k.clone(), v.clone()
    kn[:, :, unseen] = float("nan")
    vn[:, :, unseen] = float("nan")
    kw = dict(scale=scale, is_causal=True, dropout_p=0.0, seed=0, mask_needs_grad=False, causal_offset=off)
    for mode in (1, 2):
        clean = _cpu._attention_bwd(mod, dout, q, k, v, out64.to(dtype), lse, None, mode=mode, **kw)
        got = _cpu._attention_bwd(mod, dout, q, kn, vn, out64.to(dtype), lse, None, mode=mode, **kw)
        for name, a, b in zip(("dq", "dk", "dv"), got[:3], clean[:3]):
            assert torch.isfinite(a).all(), f"{name} (mode {mode}) has non-finite values"
            assert torch.equal(a, b), f"{name} (mode {mode}) differs from the clean run"
        _assert_grads(got, g64, glp, dtype)
        _assert_offset_zeros(got, L, S, off)


# ------------------------------------------------------------------------------------------ out_lo
# fp16 / bf16 training: the forward's int16 out_lo codes the rounding residual of its fp32 output in units of
# out's exponent (csrc/out_lo.h, encode_lo); the backward's delta reads the fp32 output back from out and
# out_lo, as fastattn._ops.out_fp32 does.


def _fwd_lo(mod, dtype, S=29, uniform=False):
    """A forward with out_lo. ``uniform``: q = 0, no mask, not causal, so P = 1/S, exact in fp16 / bf16 for S
    a power of two, and the fp32 output is then the exact one up to fp32 rounding (the kernels may round
    P to the input dtype for the P V product, which out_lo does not undo)."""
    gen = torch.Generator().manual_seed(3)
    B, H, Hk, L, E, Ev = 2, 4, 2, 37, 24, 40
    q = _randn(B, H, L, E, dtype=dtype, gen=gen, layout="bshd")
    k = _randn(B, Hk, S, E, dtype=dtype, gen=gen)
    v = _randn(B, Hk, S, Ev, dtype=dtype, gen=gen, layout="bshd")
    m = None if uniform else _mask("float_LS", B, H, L, S, dtype, gen)
    if uniform:
        q.zero_()
    kw = dict(scale=E ** -0.5, is_causal=not uniform, dropout_p=0.1, seed=99)
    return (q, k, v, m), kw, _cpu._attention_fwd(mod, q, k, v, m, return_lo=True, **kw)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", [BF16, F16], ids=DTYPE_IDS.get)
def test_out_lo_forward(isa, dtype):
    """out and lse are the same bits with or without out_lo; out * (1 + out_lo * 2^-K) is the fp32 output."""
    mod = isa_module(isa)
    for uniform in (False, True):
        (q, k, v, m), kw, (out, lse, lo) = _fwd_lo(mod, dtype, S=32 if uniform else 29, uniform=uniform)
        out0, lse0 = _cpu._attention_fwd(mod, q, k, v, m, **kw)
        assert torch.equal(out, out0) and torch.equal(lse, lse0)
        assert lo.dtype == torch.int16 and lo.shape == out.shape and lo.stride() == out.stride()
    ref = reference.scaled_dot_product_attention(q, k, v, m, kw["dropout_p"], False, kw["scale"], True,
                                                 upcast=True, dropout_seed=kw["seed"])
    got = out_fp32(out, lo).double()
    err_out, err_got = (out.double() - ref).abs().max().item(), (got - ref).abs().max().item()
    assert err_got < err_out / 64, f"decoded error {err_got:.3e} vs rounded output's {err_out:.3e}"
    assert err_got < 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", [BF16, F16], ids=DTYPE_IDS.get)
def test_out_lo_backward(isa, dtype):
    """The policy with out_lo, and the same bits for every schedule."""
    mod = isa_module(isa)
    (q, k, v, m), kw, (out, lse, lo) = _fwd_lo(mod, dtype)
    gen = torch.Generator().manual_seed(4)
    dout = _randn(*out.shape, dtype=dtype, gen=gen)
    fused, split = (_cpu._attention_bwd(mod, dout, q, k, v, out, lse, m, mask_needs_grad=True, mode=mode, out_lo=lo,
                                        **kw) for mode in (1, 2))
    for a, b in zip(fused, split):
        assert torch.equal(a, b)
    _, _, g64 = _reference_grads(q, k, v, m, dout, causal=True, p=kw["dropout_p"], seed=kw["seed"],
                                 scale=kw["scale"], upcast=True)
    _, _, glp = _reference_grads(q, k, v, m, dout, causal=True, p=kw["dropout_p"], seed=kw["seed"],
                                 scale=kw["scale"], upcast=False)
    _assert_grads(fused, g64, glp, dtype)


@pytest.mark.parametrize("bf16_dot", ["0", "1"], ids=["fp32-dot", "bf16-dot"])
def test_bf16_single_key_both_forward_paths(monkeypatch, bf16_dot):
    """The bf16 forward has two paths (FASTATTN_BF16_DOT; by default the faster on this CPU): with one
    visible key both give out = v exactly, and with dropout dq = dk = 0 to the policy's floor. (The bf16-dot
    path's degree-3 exp2 once had 2^0 = 0.99993: O = v / 0.99993, and dq / dk ~1e-3.)"""
    if bf16_dot == "1" and not _cpu.module().isa()[1]:
        pytest.skip("the kernel module has no AVX512-BF16 dot path")
    monkeypatch.setenv("FASTATTN_BF16_DOT", bf16_dot)
    gen = torch.Generator().manual_seed(5)
    q = _randn(2, 4, 33, 8, dtype=BF16, gen=gen).requires_grad_()
    k = _randn(2, 2, 1, 8, dtype=BF16, gen=gen).requires_grad_()
    v = _randn(2, 2, 1, 24, dtype=BF16, gen=gen).requires_grad_()
    out = fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="cpu")
    assert torch.equal(out, v.repeat_interleave(2, 1).expand_as(out))
    torch.manual_seed(0)
    out = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.1, enable_gqa=True, backend="cpu")
    dq, dk = torch.autograd.grad(out, (q, k), _randn(*out.shape, dtype=BF16, gen=gen))
    for name, g in (("dq", dq), ("dk", dk)):
        assert g.abs().max().item() <= testing.FLOOR[BF16], f"{name}: max {g.abs().max().item():.3e}"


def test_out_lo_bad_input():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(TypeError, match="return_lo"):
        _cpu.attention_fwd(q, q, q, None, scale=1.0, is_causal=False, dropout_p=0.0, seed=0, return_lo=True)
    qb = q.to(BF16)
    out, lse, lo = _cpu.attention_fwd(qb, qb, qb, None, scale=1.0, is_causal=False, dropout_p=0.0, seed=0,
                                      return_lo=True)
    kw = dict(scale=1.0, is_causal=False, dropout_p=0.0, seed=0, mask_needs_grad=False)
    for bad in (lo.to(BF16), lo[..., :4]):
        with pytest.raises(ValueError, match="out_lo"):
            _cpu.attention_bwd(out, qb, qb, qb, out, lse, None, out_lo=bad, **kw)


# ------------------------------------------------------------------------------ through the public API
def test_sdpa_backward_end_to_end():
    gen = torch.Generator().manual_seed(7)
    q = _randn(2, 4, 50, 24, dtype=F32, gen=gen, layout="bshd").requires_grad_()
    k = _randn(2, 2, 70, 24, dtype=F32, gen=gen).requires_grad_()
    v = _randn(2, 2, 70, 16, dtype=F32, gen=gen).requires_grad_()
    bias = torch.randn(1, 4, 50, 70, generator=gen).requires_grad_()
    out = fastattn.scaled_dot_product_attention(q, k, v, bias, is_causal=True, enable_gqa=True, backend="cpu")
    dout = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (q, k, v, bias), dout)
    ref = reference.scaled_dot_product_attention(q, k, v, bias, 0.0, True, None, True, upcast=True)
    want = torch.autograd.grad(ref, (q, k, v, bias), dout.double())
    for name, x, r in zip(("dq", "dk", "dv", "dmask"), got, want):
        _check(name, x, r, None, F32)


def test_gradcheck_f64():
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 2, 5, 6, generator=gen, dtype=F64, requires_grad=True)
    k = torch.randn(1, 1, 7, 6, generator=gen, dtype=F64, requires_grad=True)
    v = torch.randn(1, 1, 7, 3, generator=gen, dtype=F64, requires_grad=True)
    bias = torch.randn(1, 1, 5, 7, generator=gen, dtype=F64, requires_grad=True)
    f = lambda q, k, v, b: fastattn.scaled_dot_product_attention(q, k, v, b, is_causal=True, enable_gqa=True,  # noqa: E731
                                                                 backend="cpu")
    assert torch.autograd.gradcheck(f, (q, k, v, bias))
