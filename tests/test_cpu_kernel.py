"""The C++ CPU forward kernel (fastattn._cpu.attention_fwd) against the float64 reference formulas.

Runs the launcher directly on every instruction-set module that is built and that this CPU runs.
Shape legend: B batch, H query heads, Hk key/value heads, L query length, S key length, E head dim,
Ev value head dim.
"""
from __future__ import annotations

import math
import multiprocessing
import threading

import pytest
import torch

from fastattn import _cpu, _philox, reference, testing
from conftest import DTYPE_IDS, isa_module, isa_params, make_qkv, padding_mask

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
ALL_DTYPES = [F32, BF16, F16, F64]


def _module(isa: str | None):
    return _cpu.module() if isa is None else isa_module(isa)


def _mask(kind, B, H, L, S, dtype, gen):
    if kind is None:
        return None
    if kind == "bool_pad":  # (B, 1, 1, S): a padding mask, batch element b keeps its first keys
        return padding_mask(torch.randint(1, S + 1, (B,), generator=gen), S)
    if kind == "bool_full":
        return torch.rand(B, H, L, S, generator=gen) > 0.4
    if kind == "bool_rows_hidden":  # some query rows see no key at all
        m = torch.rand(B, 1, L, S, generator=gen) > 0.3
        m[:, :, ::3] = False
        return m
    if kind == "bool_group_hidden":  # query rows 32..63 see no key: whole row groups of every ISA's kernel
        m = torch.rand(B, 1, L, S, generator=gen) > 0.3
        m[:, :, 32:64] = False
        return m
    if kind == "float_LS":  # (1, 1, L, S) additive bias, with some -inf
        m = torch.randn(1, 1, L, S, generator=gen)
        m[torch.rand(1, 1, L, S, generator=gen) < 0.2] = float("-inf")
        return m.to(dtype)
    if kind == "float32_B1LS":  # float32 mask with a low-precision q
        return torch.randn(B, 1, L, S, generator=gen)
    if kind == "bool_expanded":  # stride-0 dims that are NOT size 1
        return (torch.rand(1, 1, 1, S, generator=gen) > 0.3).expand(B, H, L, S)
    raise ValueError(kind)


def _check(B, H, Hk, L, S, E, Ev, *, dtype=F32, layout="bhsd", mask=None, causal=False, p=0.0, isa=None,
           scale=None, seed=1234, offset=0):
    """Kernel vs reference; ``offset``: the causal diagonal offset (key j visible to query i iff j <= i + offset)."""
    key = (B, H, Hk, L, S, E, Ev, str(dtype), mask, causal, p) + ((offset,) if offset else ())
    gen = torch.Generator().manual_seed(hash(key) % 2**31)
    q, k, v = make_qkv(B, H, Hk, L, S, E, Ev, dtype, gen=gen, bshd=layout == "bshd")
    m = _mask(mask, B, H, L, S, dtype, gen)
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    out, lse = _cpu._attention_fwd(_module(isa), q, k, v, m, scale=scale, is_causal=causal, dropout_p=p, seed=seed,
                                   causal_offset=offset)
    assert out.shape == (B, H, L, Ev) and out.dtype == dtype
    assert lse.shape == (B, H, L) and lse.dtype == F32
    ref, ref_lse = reference.scaled_dot_product_attention(
        q, k, v, m, p, causal, scale, enable_gqa=True, upcast=True, dropout_seed=seed, return_lse=True,
        causal_offset=offset)
    ref_lp = None
    if dtype in (F16, BF16):
        ref_lp = reference.scaled_dot_product_attention(q, k, v, m, p, causal, scale, enable_gqa=True, upcast=False,
                                                        dropout_seed=seed, causal_offset=offset)
    testing.assert_close("out", out, ref, ref_lp)
    # lse is float32 in every dtype: compare with a float32-level tolerance (inf pattern must match).
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse -inf pattern differs"
    fin = torch.isfinite(ref_lse)
    if fin.any():
        err = (lse[fin].double() - ref_lse[fin].double()).abs().max().item()
        assert err < (1e-4 if dtype in (F32, F64) else 2e-3), f"lse error {err:.3e}"
    return out, lse


def _id(**kw):
    return "-".join(f"{k}{v}" for k, v in kw.items())


# --------------------------------------------------------------------------------- head dims x dtypes
_E_CASES = [(16, 1, 1), (40, 7, 97), (64, 97, 130), (80, 130, 7), (96, 257, 97), (111, 33, 257), (128, 130, 130),
            (256, 7, 40)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("E,L,S", _E_CASES, ids=[_id(E=e, L=l, S=s) for e, l, s in _E_CASES])
def test_head_dims(E, L, S, dtype):
    _check(2, 2, 2, L, S, E, E, dtype=dtype)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("L,S", [(1, 257), (257, 1), (97, 130), (130, 97), (7, 7)])
def test_lengths_causal(L, S, dtype):
    _check(1, 2, 1, L, S, 40, 24, dtype=dtype, causal=True)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
def test_gqa_bshd_views_ev_differs(dtype):
    _check(2, 6, 2, 97, 70, 64, 40, dtype=dtype, layout="bshd")


# ------------------------------------------------------------------------------------------ masks
_MASKS = ["bool_pad", "bool_full", "bool_rows_hidden", "float_LS", "float32_B1LS", "bool_expanded"]


@pytest.mark.parametrize("causal", [False, True], ids=["nocausal", "causal"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mask", _MASKS)
def test_masks(mask, dtype, causal):
    _check(2, 4, 2, 97, 130, 40, 40, dtype=dtype, mask=mask, causal=causal, layout="bshd")


def test_fully_masked_rows_give_zero_and_neg_inf():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 50, 32, generator=gen) for _ in range(3))
    m = torch.ones(1, 1, 50, 50, dtype=torch.bool)
    m[..., 5, :] = False
    m[..., 20:40, :] = False
    out, lse = _cpu.attention_fwd(q, k, v, m, scale=0.2, is_causal=False, dropout_p=0.0, seed=0)
    hidden = torch.zeros(50, dtype=torch.bool)
    hidden[5] = True
    hidden[20:40] = True
    assert torch.equal(out[:, :, hidden], torch.zeros_like(out[:, :, hidden]))
    assert torch.isneginf(lse[:, :, hidden]).all() and torch.isfinite(lse[:, :, ~hidden]).all()
    # L > S with is_causal: no key is hidden for i >= S; all -inf float mask rows too.
    fm = torch.zeros(1, 1, 50, 50)
    fm[..., 7, :] = float("-inf")
    out, lse = _cpu.attention_fwd(q, k, v, fm, scale=0.2, is_causal=True, dropout_p=0.0, seed=0)
    assert torch.equal(out[:, :, 7], torch.zeros_like(out[:, :, 7])) and torch.isneginf(lse[:, :, 7]).all()


# ---------------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_matches_rebuilt_mask(dtype, p):
    _check(2, 3, 1, 97, 130, 40, 24, dtype=dtype, p=p, mask="bool_pad", causal=True, seed=2**62 + 12345)


def test_dropout_is_deterministic_and_seeded():
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    kw = dict(scale=0.25, is_causal=False, dropout_p=0.3)
    a, _ = _cpu.attention_fwd(q, k, v, None, seed=7, **kw)
    b, _ = _cpu.attention_fwd(q, k, v, None, seed=7, **kw)
    c, _ = _cpu.attention_fwd(q, k, v, None, seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_philox_words_match_spec():
    mod = _cpu.module()
    for seed, b, h, i, j0, n in [(0, 0, 0, 0, 0, 64), (2**63 - 1, 3, 7, 1000, 5, 37), (123456789, 1, 2, 3, 130, 1)]:
        got = torch.frombuffer(bytearray(mod.philox_words_row(seed, b, h, i, j0, n)), dtype=torch.int32)
        got = got.to(torch.int64) & 0xFFFFFFFF
        want = _philox.dropout_words(seed, b + 1, h + 1, i + 1, j0 + n)[b, h, i, j0:]
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------- ISAs
@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
def test_isa_modules(isa, dtype):
    _check(2, 4, 2, 97, 130, 111, 40, dtype=dtype, layout="bshd", mask="float_LS", causal=True, p=0.2, isa=isa)
    _check(1, 2, 2, 33, 17, 16, 80, dtype=dtype, mask="bool_pad", isa=isa)


def test_isa_selection_env(monkeypatch):
    name = _cpu.isa_name()
    assert name in _cpu.ISAS
    _cpu.module.cache_clear()
    try:
        monkeypatch.setenv("FASTATTN_ISA", "portable")
        assert _cpu.isa_name() == "portable"
        _cpu.module.cache_clear()
        monkeypatch.setenv("FASTATTN_ISA", "sse9")
        with pytest.raises(ValueError, match="FASTATTN_ISA"):
            _cpu.module()
    finally:
        monkeypatch.delenv("FASTATTN_ISA")
        _cpu.module.cache_clear()
    assert _cpu.isa_name() == name


# -------------------------------------------------------------------------------- edges and layout
def test_empty_sizes():
    kw = dict(scale=1.0, is_causal=False, dropout_p=0.0, seed=0)
    out, lse = _cpu.attention_fwd(torch.randn(2, 2, 0, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 4), None, **kw)
    assert out.shape == (2, 2, 0, 4) and lse.shape == (2, 2, 0)
    out, lse = _cpu.attention_fwd(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 0, 8), torch.randn(2, 2, 0, 4), None, **kw)
    assert torch.equal(out, torch.zeros(2, 2, 3, 4)) and torch.isneginf(lse).all()
    out, lse = _cpu.attention_fwd(torch.randn(0, 2, 3, 8), torch.randn(0, 2, 4, 8), torch.randn(0, 2, 4, 4), None, **kw)
    assert out.shape == (0, 2, 3, 4)


def test_output_layout_follows_the_query():
    """The output is laid out as torch's SDPA lays out its own (fastattn._ops.empty_output): like the query when
    Ev == E and there is no dropout, else contiguous; the kernel writes through whatever strides it gets."""
    kw = dict(scale=1.0, is_causal=False, seed=0)
    k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    q_bshd = torch.randn(2, 5, 3, 8).transpose(1, 2)
    for q, vv, p, want in ((torch.randn(2, 3, 5, 8), v, 0.0, "contiguous"), (q_bshd, v, 0.0, "bshd"),
                           (q_bshd, v[..., :4], 0.0, "contiguous"), (q_bshd, v, 0.5, "contiguous")):
        out, _ = _cpu.attention_fwd(q, k, vv, None, dropout_p=p, **kw)
        assert (out.is_contiguous() if want == "contiguous" else out.stride() == q.stride()), (want, out.stride())
        if p == 0.0:
            ref = reference.scaled_dot_product_attention(q, k, vv, scale=1.0)
            testing.assert_close("out", out, ref)


def test_large_head_dim_and_odd_strides():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 20, 600, generator=gen)[..., ::2]  # E = 300, element stride 2
    k = torch.randn(1, 2, 30, 300, generator=gen)
    v = torch.randn(1, 2, 30, 70, generator=gen)
    out, _ = _cpu.attention_fwd(q, k, v, None, scale=0.05, is_causal=False, dropout_p=0.0, seed=0)
    ref = reference.scaled_dot_product_attention(q, k, v, scale=0.05)
    testing.assert_close("out", out, ref)


def test_threads_agree():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 200, 40, generator=gen) for _ in range(3))
    kw = dict(scale=0.2, is_causal=True, dropout_p=0.1, seed=9)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, la = _cpu.attention_fwd(q, k, v, None, **kw)
        torch.set_num_threads(max(2, n))
        b, lb = _cpu.attention_fwd(q, k, v, None, **kw)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_concurrent_python_threads():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 4, 130, 32, generator=gen) for _ in range(3))
    kw = dict(scale=0.2, is_causal=False, dropout_p=0.0, seed=0)
    want, _ = _cpu.attention_fwd(q, k, v, None, **kw)
    results = []

    def work():
        for _ in range(5):
            results.append(torch.equal(_cpu.attention_fwd(q, k, v, None, **kw)[0], want))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results and all(results)


def _child(conn):
    q, k, v = (torch.ones(1, 2, 64, 16) for _ in range(3))
    out, _ = _cpu.attention_fwd(q, k, v, None, scale=0.25, is_causal=False, dropout_p=0.0, seed=0)
    conn.send(bool(torch.allclose(out, torch.ones_like(out))))


def test_works_after_fork():
    # The parent's pool threads do not exist in a forked child: the kernel must re-create them.
    q, k, v = (torch.ones(1, 2, 64, 16) for _ in range(3))
    _cpu.attention_fwd(q, k, v, None, scale=0.25, is_causal=False, dropout_p=0.0, seed=0)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0 and parent.recv()


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=DTYPE_IDS.get)
def test_nan_stays_in_its_row(isa, dtype):
    q, k, v = (torch.randn(1, 2, 40, 16).to(dtype) for _ in range(3))
    q[0, 1, 7, 3] = float("nan")
    out, lse = _cpu._attention_fwd(_module(isa), q, k, v, None, scale=0.25, is_causal=False, dropout_p=0.0, seed=0)
    bad = torch.isnan(out)
    assert bad[0, 1, 7].all() and torch.isnan(lse[0, 1, 7])
    bad[0, 1, 7] = False
    assert not bad.any()


@pytest.mark.parametrize("dot", ["1", "0"], ids=["vdpbf16ps", "widen-to-f32"])
@pytest.mark.parametrize("case", [
    dict(B=2, H=3, Hk=3, L=97, S=130, E=64, Ev=64),
    dict(B=1, H=4, Hk=2, L=33, S=257, E=40, Ev=80, mask="bool_full", causal=True),
    dict(B=2, H=2, Hk=2, L=64, S=64, E=111, Ev=32, mask="float_LS", p=0.2),
    dict(B=3, H=2, Hk=2, L=7, S=100, E=16, Ev=16, mask="bool_pad", layout="bshd"),
], ids=["plain", "gqa-mask-causal", "floatmask-dropout", "pad-bshd"])
def test_bf16_both_paths(monkeypatch, dot, case):
    # The AVX-512 module picks the bf16 path per CPU (a timing of vdpbf16ps vs fp32 FMA); both must be right.
    if _cpu._unusable_reason("avx512") is not None or not _module("avx512").isa()[1]:
        pytest.skip("needs the AVX512-BF16 module")
    monkeypatch.setenv("FASTATTN_BF16_DOT", dot)
    case = dict(case)
    B, H, Hk, L, S, E, Ev = (case.pop(k) for k in ("B", "H", "Hk", "L", "S", "E", "Ev"))
    _check(B, H, Hk, L, S, E, Ev, dtype=BF16, isa="avx512", **case)


@pytest.mark.parametrize("case", [
    dict(L=45, S=300, E=64, Ev=64, layout="bshd", causal=True),
    dict(L=130, S=200, E=32, Ev=48, mask="bool_pad"),
    dict(L=17, S=90, E=128, Ev=128, layout="bshd", mask="float_LS"),
    dict(L=40, S=150, E=96, Ev=24, mask="bool_rows_hidden"),
], ids=["E64-blocks-causal-bshd", "E32-pad-Ev48", "E128-oneblock-floatmask-bshd", "E96-rows-hidden"])
def test_bf16_even_odd_packing(monkeypatch, case):
    # bf16 with E % 32 == 0 on the widening path packs Q^T and widens K in even-odd order (csrc/forward_packing.h,
    # convert_rows_eo): partial row groups, strided (B, S, H, E) rows, several key blocks and one block (Q^T
    # packed per group) must all agree with the reference.
    if _cpu._unusable_reason("avx512") is not None:
        pytest.skip("needs the AVX-512 module")
    monkeypatch.setenv("FASTATTN_BF16_DOT", "0")
    case = dict(case)
    L, S, E, Ev = (case.pop(k) for k in ("L", "S", "E", "Ev"))
    _check(2, 3, 3, L, S, E, Ev, dtype=BF16, isa="avx512", **case)


@pytest.mark.parametrize("isa", isa_params())
def test_bf16_subnormal_outputs_are_rounded_not_flushed(isa, monkeypatch):
    # The AVX-512 module stores bf16 with vcvtneps2bf16, which flushes subnormal inputs to zero; vectors that
    # hold one take the integer rounding path instead, so tiny outputs keep their bits (as torch rounds them).
    # The widening path is forced: vdpbf16ps itself (chosen where it is faster) treats subnormal inputs as 0.
    monkeypatch.setenv("FASTATTN_BF16_DOT", "0")
    tiny = torch.tensor([1e-39, -3e-39, 2e-40, 5e-39]).to(BF16)  # bf16 subnormals
    assert (tiny.float().abs() < torch.finfo(torch.float32).tiny).all()
    q = torch.zeros(1, 1, 5, 32, dtype=BF16)  # every score 0: out = mean of the value rows
    k = torch.randn(1, 1, 8, 32).to(BF16)
    v = tiny.repeat(8)[:32].expand(1, 1, 8, 32).contiguous()  # every value row the same: out = that row
    v[0, 0, :, 16:] = v[0, 0, :, 16:] * 1e30  # one vector of normals beside the subnormal one
    out, _ = _cpu._attention_fwd(_module(isa), q, k, v, None, scale=1.0, is_causal=False, dropout_p=0.0, seed=0)
    expect = v[0, 0, 0].float().expand(5, 32).to(BF16)
    assert torch.equal(out[0, 0].view(torch.int16), expect.view(torch.int16)), (out[0, 0], expect)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("L,S,Ev", [(80, 40, 40), (100, 130, 64)], ids=["one-block-Ev40", "one-block-S130"])
def test_single_key_block_writes_output_from_pv(isa, dtype, L, S, Ev):
    # S <= 132 runs as one key block, whose PV tiles store the output rows themselves (OutRows): the Ev tail,
    # the (B, L, H, Ev) output rows and whole row groups that see no key (written by write_output) must agree.
    _check(2, 3, 3, L, S, 48, Ev, dtype=dtype, isa=isa, mask="bool_group_hidden")


# ----------------------------------------------------------------------------- causal diagonal offset
# is_causal with causal_offset: key j is visible to query i iff j <= i + causal_offset (0: top-left, S - L:
# lower-right). (L, S, offset): lower-right for L < S, L == S and L > S (the first L - S rows see no key);
# lengths that are multiples of no block, several key blocks of every ISA (32 to 96 keys, or one block of up to
# 11 micro-tiles), whole query row groups / items that see no key; then other offsets: negative, past S, and
# ones under which no row sees a key.
OFFSET_CASES = [
    (3, 97, 94), (1, 300, 299), (40, 300, 260), (70, 70, 0), (97, 33, -64), (200, 50, -150), (130, 97, -33),
    (97, 130, 0), (97, 130, -40), (97, 130, 7), (33, 70, 500), (33, 70, -33), (33, 70, -1000),
]


def _off_id(case):
    L, S, off = case
    return f"L{L}-S{S}-off{off}"


def _check_no_key_rows(out, lse, offset):
    """Rows i with i + offset < 0 see no key: out exactly 0 and lse -inf; nothing is NaN."""
    L = out.shape[2]
    dead = torch.arange(L) + offset < 0
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[:, :, dead], torch.zeros_like(out[:, :, dead]))
    assert torch.isneginf(lse[:, :, dead]).all()


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", OFFSET_CASES, ids=_off_id)
def test_causal_offset(case, dtype, isa):
    L, S, off = case
    # GQA over (B, L, H, E) views; and B1 H2, whose few heads split L into several query-block items.
    out, lse = _check(2, 4, 2, L, S, 40, 24, dtype=dtype, layout="bshd", causal=True, offset=off, isa=isa)
    _check_no_key_rows(out, lse, off)
    out, lse = _check(1, 2, 1, L, S, 64, 40, dtype=dtype, causal=True, offset=off, isa=isa)
    _check_no_key_rows(out, lse, off)


_OFFSET_MASK_CASES = [(3, 97, 94), (97, 33, -64), (40, 300, 260), (97, 130, -40), (200, 50, -150)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mask", ["bool_pad", "float_LS", "float32_B1LS", "bool_rows_hidden", "bool_group_hidden"])
@pytest.mark.parametrize("case", _OFFSET_MASK_CASES, ids=_off_id)
def test_causal_offset_masks(case, mask, dtype):
    # A mask hides more keys; rows the diagonal and the mask together leave without a key give 0 / -inf.
    L, S, off = case
    if mask == "bool_group_hidden" and L < 64:
        pytest.skip("the mask hides rows 32..63")
    out, lse = _check(2, 4, 2, L, S, 40, 40, dtype=dtype, mask=mask, causal=True, offset=off, layout="bshd")
    _check_no_key_rows(out, lse, off)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", [(3, 97, 94), (97, 33, -64), (40, 300, 260), (97, 130, 7)], ids=_off_id)
def test_causal_offset_dropout(case, dtype, isa):
    # The reference rebuilds the kernels' keep mask from the seed; dropout does not depend on the diagonal.
    L, S, off = case
    out, lse = _check(2, 3, 1, L, S, 40, 24, dtype=dtype, p=0.3, mask="bool_pad", causal=True, offset=off, isa=isa,
                      seed=2**62 + 777)
    _check_no_key_rows(out, lse, off)


@pytest.mark.parametrize("dot", ["1", "0"], ids=["vdpbf16ps", "widen-to-f32"])
@pytest.mark.parametrize("case", [(3, 97, 94), (97, 33, -64), (40, 300, 260), (200, 50, -150), (33, 70, -1000)],
                         ids=_off_id)
def test_causal_offset_bf16_both_paths(monkeypatch, dot, case):
    if _cpu._unusable_reason("avx512") is not None or not _module("avx512").isa()[1]:
        pytest.skip("needs the AVX512-BF16 module")
    monkeypatch.setenv("FASTATTN_BF16_DOT", dot)
    L, S, off = case
    out, lse = _check(1, 4, 2, L, S, 64, 40, dtype=BF16, isa="avx512", causal=True, offset=off, mask="bool_pad")
    _check_no_key_rows(out, lse, off)
    out, lse = _check(2, 2, 2, L, S, 64, 64, dtype=BF16, isa="avx512", causal=True, offset=off, p=0.2)
    _check_no_key_rows(out, lse, off)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", [BF16, F16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", [(97, 33, -64), (40, 300, 260), (33, 70, -1000)], ids=_off_id)
def test_causal_offset_out_lo(case, dtype, isa):
    # With out_lo the output goes through the O buffer even for one key block: the same out and lse bits.
    L, S, off = case
    gen = torch.Generator().manual_seed(31)
    q, k, v = (torch.randn(2, 2, n, 32, generator=gen).to(dtype) for n in (L, S, S))
    kw = dict(scale=0.2, is_causal=True, dropout_p=0.0, seed=0, causal_offset=off)
    out, lse, lo = _cpu._attention_fwd(_module(isa), q, k, v, None, return_lo=True, **kw)
    out0, lse0 = _cpu._attention_fwd(_module(isa), q, k, v, None, **kw)
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    dead = torch.arange(L) + off < 0
    assert torch.equal(lo[:, :, dead], torch.zeros_like(lo[:, :, dead]))
    _check_no_key_rows(out, lse, off)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", [(3, 97, 94), (1, 300, 299), (40, 300, 260), (97, 130, 0), (97, 33, -64),
                                  (200, 50, -150), (33, 70, -33), (33, 70, 500)], ids=_off_id)
def test_causal_offset_unseen_keys_never_read(case, dtype, isa):
    # Keys j > L - 1 + offset are past every row's diagonal: NaN there must change no bit of out / lse (their
    # key blocks are skipped, and no partly visible block reads them either).
    L, S, off = case
    gen = torch.Generator().manual_seed(17)
    q = torch.randn(2, 4, L, 40, generator=gen).to(dtype)
    k, v = (torch.randn(2, 2, S, 40, generator=gen).to(dtype) for _ in range(2))
    unseen = torch.arange(S) > L - 1 + off
    kn, vn = k.clone(), v.clone()
    kn[:, :, unseen] = float("nan")
    vn[:, :, unseen] = float("nan")
    kw = dict(scale=0.3, is_causal=True, dropout_p=0.0, seed=0, causal_offset=off)
    out, lse = _cpu._attention_fwd(_module(isa), q, kn, vn, None, **kw)
    clean, clean_lse = _cpu._attention_fwd(_module(isa), q, k, v, None, **kw)
    assert torch.isfinite(out).all()
    assert torch.equal(out, clean) and torch.equal(lse, clean_lse)
    ref = reference.scaled_dot_product_attention(q, k, v, None, 0.0, True, 0.3, enable_gqa=True, causal_offset=off)
    ref_lp = None
    if dtype in (F16, BF16):
        ref_lp = reference.scaled_dot_product_attention(q, k, v, None, 0.0, True, 0.3, enable_gqa=True, upcast=False,
                                                        causal_offset=off)
    testing.assert_close("out", out, ref, ref_lp)
