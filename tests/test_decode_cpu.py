"""The C++ CPU decode kernel (fastattn._cpu.decode_fwd, csrc/decode.cpp) against the float64 reference
fastattn.reference.decode_attention, on every instruction-set module this CPU runs.

Calls the launcher with an explicit kernel module (``_cpu._decode_fwd``). Tolerances follow fastattn.testing
(fp32: small atol against float64; fp16/bf16: at most 2x the error of the reference run in the same low
precision). The kernel walks keys in 32-key blocks and tiles query rows by 4, so the caches here span several
blocks with a partial last one and the GQA / MQA cases pack several row tiles with a partial last one. Cache
rows past each sequence's length hold NaN, and a paged pool's unused pages too: a kernel that reads a key it
must not read returns NaN.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from fastattn import _cpu
from fastattn.reference.decode import decode_attention
from fastattn.testing import assert_close

DT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
HEADS = {"mha": (2, 2), "gqa": (4, 2), "mqa": (4, 1), "mqa8": (8, 1), "gqa3": (6, 2)}  # name: (H, Hk)
SEQLENS = (37, 0, 2)  # one long, one empty (zeros), one shorter than L = 3 (its first rows see no key)
LONG = dict(S_max=200, seqlens=(200, 0, 131))  # several 32-key blocks, lengths not multiples of any block


def _isa_params():
    out = []
    for isa in ("portable", "avx2", "avx512"):
        why = _cpu._unusable_reason(isa)
        out.append(pytest.param(isa, marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return out


ISAS = _isa_params()


def _module(isa: str):
    return importlib.import_module(f"fastattn._C_{isa}")


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def _problem(B=3, L=3, heads="gqa", E=24, Ev=40, S_max=45, seqlens=SEQLENS, dtype="f32", page=0, strided=False,
             torch_layout=False):
    """q (B, L, H, E), k_cache / v_cache, cache_seqlens, block_table (None unless ``page``). Cache rows past
    each length are NaN. ``page``: a paged pool of page-sized blocks in shuffled order, two pages unused
    (NaN), capacity S_max rounded up to a page. ``strided``: q, k_cache and v_cache are non-contiguous views
    (head dim sliced out of a wider one). ``torch_layout``: caches are (B, Hk, S, E) tensors viewed as
    (B, S, Hk, E) (key stride E, head stride S * E)."""
    gen = torch.Generator().manual_seed(0)
    H, Hk = HEADS[heads]
    dt = DT[dtype]
    lens = torch.tensor(seqlens[:B], dtype=torch.int32)
    cap = math.ceil(S_max / page) * page if page else S_max

    def cache(d):
        if torch_layout:
            c = torch.randn(B, Hk, cap, d, generator=gen).to(dt).transpose(1, 2)
        else:
            c = torch.randn(B, cap, Hk, d + 8 if strided else d, generator=gen).to(dt)[..., :d]
        for b, n in enumerate(lens.tolist()):
            c[b, n:] = float("nan")
        return c
    if strided:
        q = torch.randn(B, H, L, E, generator=gen).to(dt).transpose(1, 2)
    else:
        q = torch.randn(B, L, H, E, generator=gen).to(dt)
    k, v = cache(E), cache(Ev)
    if not page:
        return q, k, v, lens, None
    nb = cap // page
    ids = torch.randperm(B * nb + 2, generator=gen)
    table = ids[:B * nb].reshape(B, nb).to(torch.int32)

    def pool(c):
        p = torch.full((B * nb + 2, page, Hk, c.shape[-1]), float("nan"), dtype=dt)
        p[ids[:B * nb]] = c.reshape(B * nb, page, Hk, c.shape[-1])
        return p
    return q, pool(k), pool(v), lens, table


def _run(isa, q, k, v, lens, table, **kw):
    return _cpu._decode_fwd(_module(isa), q, k, v, lens, block_table=table, **kw)


def _check(isa, q, k, v, lens, table, **kw):
    """decode_fwd on module ``isa`` against the references; returns (out, lse)."""
    out, lse = _run(isa, q, k, v, lens, table, **kw)
    B, L, H, _ = q.shape
    assert out.shape == (B, L, H, v.shape[-1]) and out.dtype == q.dtype
    assert lse.shape == (B, H, L) and lse.dtype == torch.float32
    ref_kw = {n: x for n, x in kw.items() if n not in ("num_splits", "out")}
    ref, ref_lse = decode_attention(q, k, v, lens, block_table=table, **ref_kw)
    lp = None
    if q.dtype != torch.float32:
        lp = decode_attention(q, k, v, lens, block_table=table, upcast=False, **ref_kw)[0]
    assert_close("out", out, ref, lp)
    assert_close("lse", lse, ref_lse)
    # A sequence with no key: zeros, lse -inf (the sink's logit with sinks).
    for b in (lens == 0).nonzero().flatten().tolist():
        assert (out[b] == 0).all()
        sinks = kw.get("sinks")
        want = torch.full((H, L), float("-inf")) if sinks is None else sinks.float()[:, None].expand(H, L)
        assert torch.equal(lse[b], want)
    return out, lse


# ----------------------------------------------------------------------------------------------------
# Layouts, heads, query rows, dtypes
# ----------------------------------------------------------------------------------------------------
LAYOUT_CASES = [(f"{layout}-{heads}-L{L}", dict(page=8 if layout == "paged" else 0, heads=heads, L=L))
                for layout in ("contig", "paged") for heads in ("mha", "gqa", "mqa") for L in (1, 3, 16)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kw", [c[1] for c in LAYOUT_CASES], ids=[c[0] for c in LAYOUT_CASES])
def test_layouts_heads_rows(isa, kw):
    _check(isa, *_problem(**kw))


DTYPE_CASES = [(f"{layout}-gqa-L3-{dtype}", dict(page=8 if layout == "paged" else 0, dtype=dtype))
               for layout in ("contig", "paged") for dtype in ("f16", "bf16")]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kw", [c[1] for c in DTYPE_CASES], ids=[c[0] for c in DTYPE_CASES])
def test_low_precision(isa, kw):
    _check(isa, *_problem(**kw))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_long_cache_head_dim_128(isa, dtype):
    """Head dims of a full vector multiple (128), several key blocks per sequence, a sequence of 131 keys."""
    _check(isa, *_problem(E=128, Ev=128, dtype=dtype, L=1, **LONG))
    _check(isa, *_problem(E=128, Ev=128, dtype=dtype, L=1, page=16, **LONG), num_splits=3)


@pytest.mark.parametrize("isa", ISAS)
def test_paged_equals_contiguous(isa):
    """Same keys in pages (5 keys a page: blocks straddle pages) or per sequence: the same result, bit for bit
    (only the addresses differ)."""
    contig = _run(isa, *_problem(S_max=45))
    paged = _run(isa, *_problem(S_max=45, page=5))
    assert torch.equal(contig[0], paged[0]) and torch.equal(contig[1], paged[1])


@pytest.mark.parametrize("isa", ISAS)
def test_strided_and_torch_layout_caches(isa):
    """Non-contiguous q / caches read in place, 8 query heads on 1 kv head with L = 3 (24 rows), head dims
    that are not powers of two and E != Ev; torch's (B, Hk, S, E) caches viewed as (B, S, Hk, E)."""
    _check(isa, *_problem(heads="mqa8", E=20, Ev=12, strided=True), window=(9, -1))
    _check(isa, *_problem(heads="mqa8", E=20, Ev=12, strided=True, page=8), num_splits=2)
    _check(isa, *_problem(heads="gqa", torch_layout=True, **LONG))
    _check(isa, *_problem(heads="mha", torch_layout=True, dtype="bf16", L=1, **LONG), num_splits=4)


@pytest.mark.parametrize("isa", ISAS)
def test_head_dim_strides_other_than_one(isa):
    """Caches whose head dim is not unit-stride (staged by the kernel) and a q of any strides."""
    q, k, v, lens, _ = _problem(E=16, Ev=16)
    k2 = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, head-dim stride S * Hk... > 1
    v2 = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert k2.stride(-1) != 1 and v2.stride(-1) != 1
    _check(isa, q, k2, v2, lens, None)


# ----------------------------------------------------------------------------------------------------
# Key splits
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_splits_agree_and_are_deterministic(isa, dtype):
    """1 split, 3 splits, more splits than key blocks (empty splits) and the launcher's choice give the same
    answer (to rounding: the merge regroups the sums); every run repeats bit for bit, with 1 thread or more."""
    p = _problem(dtype=dtype, page=8, **LONG)
    sinks = torch.randn(HEADS["gqa"][0])
    one = _check(isa, *p, sinks=sinks, num_splits=1)
    threads = torch.get_num_threads()
    for n in (3, 11, None):
        got = _check(isa, *p, sinks=sinks, num_splits=n)
        try:
            torch.set_num_threads(1)
            again = _run(isa, *p, sinks=sinks, num_splits=n)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])
        tol = 1e-6 if dtype == "f32" else 1e-2
        torch.testing.assert_close(got[0].float(), one[0].float(), atol=tol, rtol=0)
        torch.testing.assert_close(got[1], one[1], atol=1e-5, rtol=0)


def test_num_splits_heuristic():
    """No split while the (b, kv head) items give each thread several; else more, at least ~1024 keys each."""
    h = _cpu.decode_num_splits
    assert h(items=8, keys=4096, threads=2) == 1
    assert h(items=1, keys=32768, threads=2) == 8
    assert h(items=1, keys=2000, threads=2) == 2
    assert h(items=1, keys=10, threads=4) == 1


# ----------------------------------------------------------------------------------------------------
# Masks and variants
# ----------------------------------------------------------------------------------------------------
H4 = HEADS["gqa"][0]
VARIANT_CASES = [
    ("not-causal", dict(causal=False)),
    ("window-left7", dict(window=(7, -1))),
    ("window-left0", dict(window=(0, -1))),
    ("window-7-2-not-causal", dict(causal=False, window=(7, 2))),
    ("window-right1-not-causal", dict(causal=False, window=(-1, 1))),
    ("softcap", dict(softcap=1.5)),
    ("sinks", dict(sinks=torch.linspace(-1.0, 2.0, H4))),
    ("alibi-h", dict(alibi_slopes=torch.linspace(0.05, 0.4, H4))),
    ("alibi-bh", dict(alibi_slopes=torch.linspace(0.05, 0.6, 3 * H4).reshape(3, H4), causal=False)),
    ("scale", dict(scale=0.7)),
    ("all", dict(window=(11, -1), softcap=2.0, sinks=torch.linspace(-1.0, 2.0, H4),
                 alibi_slopes=torch.linspace(0.05, 0.4, H4), num_splits=2)),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kw", [c[1] for c in VARIANT_CASES], ids=[c[0] for c in VARIANT_CASES])
def test_variants(isa, kw):
    _check(isa, *_problem(), **kw)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_variants_combined_low_precision(isa, dtype):
    _check(isa, *_problem(dtype=dtype, page=8, L=1), causal=False, window=(20, 3), softcap=3.0,
           sinks=torch.linspace(-1.0, 2.0, H4), alibi_slopes=torch.linspace(0.05, 0.4, H4))


def _padding_mask(B, L, S_max, gen):
    """A bool (B, 1, L, S_max) mask (True = attend): random holes, and batch 0's first query row hides every key."""
    m = torch.rand(B, 1, L, S_max, generator=gen) > 0.3
    m[0, :, 0] = False
    return m


MASK_CASES = [
    ("bool-B1LS", "bool", dict()),
    ("bool-B1LS-gqa3-split", "bool", dict(heads="gqa3", L=6, seqlens=(33, 0, 7), num_splits=2)),
    ("float-BHLS", "float", dict()),
    ("float32-1H1S-mqa8", "float1", dict(heads="mqa8")),
    ("float-BHLS-bf16", "float", dict(dtype="bf16")),
    ("bool-B1LS-f16-window", "bool", dict(dtype="f16", window=(9, -1))),
    ("bool-111S-expanded", "bool_expanded", dict()),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind,kw", [c[1:] for c in MASK_CASES], ids=[c[0] for c in MASK_CASES])
def test_masks(isa, kind, kw):
    """Bool (True = attend) and float (added) masks, read through broadcast strides; keys past each length
    stay hidden (NaN there) whatever the mask says."""
    kw = dict(kw)
    call = {n: kw.pop(n) for n in ("num_splits", "window") if n in kw}
    q, k, v, lens, _ = _problem(**kw)
    B, L, H, _ = q.shape
    S_max = k.shape[1]
    gen = torch.Generator().manual_seed(1)
    if kind == "bool":
        mask = _padding_mask(B, L, S_max, gen)
    elif kind == "bool_expanded":  # stride-0 dims that are not size 1
        mask = (torch.rand(1, 1, 1, S_max, generator=gen) > 0.3).expand(B, H, L, S_max)
    elif kind == "float":
        mask = torch.randn(B, H, L, S_max, generator=gen).to(q.dtype)
        mask[0, 1, 1, :20] = float("-inf")
    else:  # a float32 mask broadcast over batch and query rows
        mask = torch.randn(1, H, 1, S_max, generator=gen)
        mask[..., 5] = float("-inf")
    out, _ = _check(isa, q, k, v, lens, None, mask=mask, **call)
    if kind == "bool":
        assert (out[0, 0] == 0).all()  # the row that sees no key


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("page", [0, 8], ids=["contig", "paged"])
def test_out_into_transposed_view(isa, page):
    """out= a (B, L, H, Ev) view of a (B, H, L, Ev) tensor: written in place, returned, the same bits as a
    fresh output (also with splits)."""
    q, k, v, lens, table = _problem(page=page)
    B, L, H, _ = q.shape
    for n in (1, 2):
        fresh, fresh_lse = _run(isa, q, k, v, lens, table, num_splits=n)
        buf = torch.full((B, H, L, v.shape[-1]), 7.0)
        got, lse = _run(isa, q, k, v, lens, table, num_splits=n, out=buf.transpose(1, 2))
        assert got.data_ptr() == buf.data_ptr() and got.stride() == buf.transpose(1, 2).stride()
        assert torch.equal(buf.transpose(1, 2), fresh) and torch.equal(lse, fresh_lse)


@pytest.mark.parametrize("isa", ISAS)
def test_window_skips_key_blocks(isa):
    """A sliding window never reads the keys before it: poisoning them with NaN changes nothing (a
    masked-but-loaded NaN key would turn the output into NaN through p = 0 times NaN)."""
    q, k, v, lens, table = _problem(B=1, seqlens=(45,), L=1)
    clean = _check(isa, q, k, v, lens, table, window=(8, -1), num_splits=1)
    k[0, :36] = float("nan")  # query position 44 sees keys 36..44
    v[0, :36] = float("nan")
    out, lse = _run(isa, q, k, v, lens, None, window=(8, -1), num_splits=1)
    assert torch.equal(out, clean[0]) and torch.equal(lse, clean[1])


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------
def _bad(**kw):
    q, k, v, lens, _ = _problem(B=2)
    args = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=lens)
    args.update({n: x for n, x in kw.items() if n in args})
    return args, {n: x for n, x in kw.items() if n not in args}


ERROR_CASES = [
    ("q-3d", dict(q=torch.zeros(2, 3, 24)), ValueError, "q must be a 4-D tensor"),
    ("q-int", dict(q=torch.zeros(2, 3, 4, 24, dtype=torch.int32)), TypeError, "q must be float16"),
    ("cache-dtype", dict(k_cache=torch.zeros(2, 45, 2, 24, dtype=torch.float16)), TypeError, "q's dtype"),
    ("head-dim", dict(k_cache=torch.zeros(2, 45, 2, 16), v_cache=torch.zeros(2, 45, 2, 40)), ValueError,
     "head dim must be q's"),
    ("heads", dict(k_cache=torch.zeros(2, 45, 3, 24), v_cache=torch.zeros(2, 45, 3, 40)), ValueError,
     "multiple of the cache's"),
    ("seqlens-dtype", dict(cache_seqlens=torch.zeros(2, dtype=torch.int64)), ValueError, "cache_seqlens must be"),
    ("seqlens-shape", dict(cache_seqlens=torch.zeros(3, dtype=torch.int32)), ValueError, "shape (2,)"),
    ("batch", dict(k_cache=torch.zeros(3, 45, 2, 24), v_cache=torch.zeros(3, 45, 2, 40)), ValueError,
     "batch dim must be q's"),
    ("table", dict(block_table=torch.zeros(2, 4, dtype=torch.int64)), ValueError, "block_table must be"),
    ("mask-with-table", dict(block_table=torch.zeros(2, 6, dtype=torch.int32),
                             mask=torch.ones(1, 1, 1, 1, dtype=torch.bool)), ValueError, "contiguous cache only"),
    ("window", dict(window=(-2, 0)), ValueError, "window must be"),
    ("softcap", dict(softcap=-1.0), ValueError, "softcap must be"),
    ("sinks", dict(sinks=torch.zeros(3)), ValueError, "sinks must be"),
    ("alibi", dict(alibi_slopes=torch.zeros(2, 3)), ValueError, "alibi_slopes must be"),
    ("splits", dict(num_splits=0), ValueError, "num_splits must be"),
    ("mask-shape", dict(mask=torch.ones(2, 4, 3, 44, dtype=torch.bool)), ValueError, "mask must be a 4-D tensor"),
    ("mask-dtype", dict(mask=torch.ones(2, 4, 3, 45, dtype=torch.int32)), TypeError, "mask must be bool"),
    ("out-shape", dict(out=torch.empty(2, 3, 4, 24)), ValueError, "out must be a tensor of shape"),
    ("out-dtype", dict(out=torch.empty(2, 3, 4, 40, dtype=torch.float16)), TypeError, "out must have q's dtype"),
]


@pytest.mark.parametrize("kw,exc,msg", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors(kw, exc, msg):
    args, extra = _bad(**kw)
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        _cpu.decode_fwd(**args, **extra)


def test_empty_batch_and_rows():
    q, k, v, lens, _ = _problem(B=2)
    out, lse = _cpu.decode_fwd(q[:0], k[:0], v[:0], lens[:0])
    assert out.shape == (0, 3, 4, 40) and lse.shape == (0, 4, 3)
    out, lse = _cpu.decode_fwd(q[:, :0], k, v, lens)
    assert out.shape == (2, 0, 4, 40) and lse.shape == (2, 4, 0)


@pytest.mark.parametrize("E,Ev", [(0, 8), (8, 0)], ids=["E0", "Ev0"])
def test_empty_head_dims(E, Ev):
    """E = 0: every score is 0 (uniform weights); Ev = 0: an empty output, the lse still computed."""
    q, k, v, lens, _ = _problem(E=E, Ev=Ev)
    _check("avx512" if _cpu._unusable_reason("avx512") is None else "portable", q, k, v, lens, None, scale=1.0)
