"""The C++ CPU decode kernel (fastattn._cpu.decode_fwd, csrc/decode.cpp) against the float64 reference
fastattn.reference.decode_attention, on every instruction-set module this CPU runs.

Calls the launcher with an explicit kernel module (``_cpu._decode_fwd``). Tolerances follow fastattn.testing
(fp32: small atol against float64; fp16/bf16: at most 2x the error of the reference run in the same low
precision). The kernel walks keys in 32-key blocks (8 or 16 when a key's rows of every kv head span more
than 1 KiB) and tiles query rows by 4, so the caches here span several blocks with a partial last one and the
GQA / MQA cases pack several row tiles with a partial last one. Cache rows past each sequence's length hold
NaN, and a paged pool's unused pages too: a kernel that reads a key it must not read returns NaN.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch

from fastattn import _cpu
from conftest import (DECODE_COMBINED, DECODE_ERROR_CASES, DECODE_MASK_CASES, DECODE_VARIANT_CASES, check_decode,
                      check_decode_splits, decode_error_case, decode_mask_case, decode_problem as _problem, isa_module,
                      isa_params)

LONG = dict(S_max=200, seqlens=(200, 0, 131))  # several 32-key blocks, lengths not multiples of any block
ISAS = isa_params()


def _run(isa, q, k, v, lens, table, **kw):
    return _cpu._decode_fwd(isa_module(isa), q, k, v, lens, block_table=table, **kw)


def _cache_params(mod, k, v):
    """DecodeParams holding what the work split reads of (B, S, Hk, E) caches k / v: B, Hk, dtype, strides."""
    p = mod.DecodeParams()
    p.B, p.Hk, p.dtype = k.shape[0], k.shape[2], _cpu.DTYPE_CODES[k.dtype]
    p.k, p.v = (mod.Tensor4(0, c.stride(0), c.stride(2), c.stride(1), c.stride(3)) for c in (k, v))
    return p


def _check(isa, q, k, v, lens, table, **kw):
    """decode_fwd on module ``isa`` against the references; returns (out, lse)."""
    return check_decode(partial(_run, isa), q, k, v, lens, table, **kw)


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
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("splits", [1, 3])
def test_heads_side_by_side_equal_heads_apart(isa, dtype, splits):
    """A cache that stores a key's kv heads side by side ((B, S, Hk, E), paged) is read by items that take every
    kv head of a sequence at once, block by block; the same values with the heads apart ((B, Hk, S, E) viewed as
    (B, S, Hk, E)) by one item per head. Same splits, same answer bit for bit while both walk 32-key blocks (a
    key's rows of every head within 1 KiB, as here); wider keys take shorter blocks for the heads-together
    items, which rescale the online softmax at other keys (test_wide_keys_take_shorter_blocks)."""
    mod = isa_module(isa)
    size = dict(LONG, S_max=208)  # a whole number of 16-key pages: the paged pool holds the same values
    q, k, v, lens, _ = _problem(dtype=dtype, **size)
    apart = [c.transpose(1, 2).contiguous().transpose(1, 2) for c in (k, v)]
    for cache, items in ((k, 3), (apart[0], 3 * k.shape[2])):  # 3 sequences; x Hk when one item per head
        assert mod.decode_items(_cache_params(mod, cache, cache)) == items
    together = _check(isa, q, k, v, lens, None, num_splits=splits)
    one_by_one = _run(isa, q, *apart, lens, None, num_splits=splits)
    paged = _run(isa, *_problem(dtype=dtype, page=16, **size), num_splits=splits)
    for got in (one_by_one, paged):
        assert torch.equal(got[0], together[0]) and torch.equal(got[1], together[1])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_wide_keys_take_shorter_blocks(isa, dtype):
    """8 kv heads of 128 dims side by side: a key's rows span 4 KiB (f32) or 2 KiB (bf16), so the items that take
    every kv head walk 8- or 16-key blocks instead of 32 (block_keys). Sequences of 200 and 131 keys (partial last
    blocks), pages of 5 keys (blocks straddle pages) and of 16, key splits, a window and causal rows."""
    mod = isa_module(isa)
    size = dict(LONG, heads="gqa8", E=128, Ev=128, dtype=dtype)

    def block_keys(k, v):
        return mod.decode_block_keys(_cache_params(mod, k, v))
    _, k, v, _, _ = _problem(**size)
    assert block_keys(k, v) == (8 if dtype == "f32" else 16)
    apart = [c.transpose(1, 2).contiguous().transpose(1, 2) for c in (k, v)]  # one head per item
    assert block_keys(*apart) == 32
    assert block_keys(*_problem(dtype=dtype)[1:3]) == 32  # 2 kv heads of 24 / 40: narrow keys
    _check(isa, *_problem(L=1, **size))
    _check(isa, *_problem(L=3, page=5, **size), num_splits=3)
    _check(isa, *_problem(L=3, page=16, **size), causal=True, window=(37, -1))
    _check(isa, *_problem(L=1, **size), num_splits=5, window=(70, 0))


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
    def one_thread(*args, **kw):
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            return _run(isa, *args, **kw)
        finally:
            torch.set_num_threads(threads)
    check_decode_splits(partial(_run, isa), one_thread, _problem(dtype=dtype, page=8, **LONG), dtype, (3, 11, None),
                        lse_atol=1e-5)


def test_num_splits_heuristic():
    """No split while the items give each thread several; else more, each reading at least ~1024 key rows
    (keys x the item's kv heads)."""
    h = _cpu.decode_num_splits
    assert h(items=8, keys=4096, threads=2) == 1
    assert h(items=1, keys=32768, threads=2) == 8
    assert h(items=1, keys=2000, threads=2) == 2
    assert h(items=1, keys=10, threads=4) == 1
    # One item of all 8 kv heads (a (B, S, Hk, E) cache): 1024 keys are 8192 key rows, enough for 8 splits.
    assert h(items=1, keys=1024, threads=2, heads=8) == 8
    assert h(items=1, keys=256, threads=2, heads=8) == 2


# ----------------------------------------------------------------------------------------------------
# Masks and variants
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kw", [c[1] for c in DECODE_VARIANT_CASES], ids=[c[0] for c in DECODE_VARIANT_CASES])
def test_variants(isa, kw):
    _check(isa, *_problem(), **kw)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_variants_combined_low_precision(isa, dtype):
    _check(isa, *_problem(dtype=dtype, page=8, L=1), **DECODE_COMBINED)


MASK_CASES = DECODE_MASK_CASES + [("bool-111S-expanded", "bool_expanded", dict())]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind,kw", [c[1:] for c in MASK_CASES], ids=[c[0] for c in MASK_CASES])
def test_masks(isa, kind, kw):
    decode_mask_case(partial(_run, isa), kind, kw)


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
ERROR_CASES = DECODE_ERROR_CASES + [
    ("mask-with-table", dict(block_table=torch.zeros(2, 6, dtype=torch.int32),
                             mask=torch.ones(1, 1, 1, 1, dtype=torch.bool)), ValueError, "contiguous cache only"),
]


@pytest.mark.parametrize("kw,exc,msg", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors(kw, exc, msg):
    decode_error_case(_cpu.decode_fwd, kw, exc, msg)


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


def test_num_splits_rule():
    """The one split rule (csrc/decode.h), which the launcher and the eager route (csrc/eager.cpp) both call
    (decode_auto_splits): none while the items give every thread 4, else enough for that, each split reading
    >= 1024 key rows (keys x heads per item), at most 64."""
    from fastattn import _cpu
    mod = _cpu.module()

    def rule(items, keys, heads, threads):
        want = 4 * max(1, threads)
        if items >= want:
            return 1
        return max(1, min(-(-want // max(1, items)), -(-(keys * heads) // 1024), 64))

    for items in (1, 2, 3, 7, 8, 9, 32, 128):
        for keys in (1, 127, 128, 129, 1023, 1024, 1025, 4096, 32768, 10**6):
            for heads in (1, 8):
                for threads in (1, 2, 3, 16):
                    assert mod.decode_num_splits(items, keys, heads, threads) == rule(items, keys, heads, threads), \
                        (items, keys, heads, threads)
    # decode_auto_splits applies it to a call: items and heads per item from the cache layout.
    S, Hk, E = 64, 8, 128
    side_by_side = (S * Hk * E, E, Hk * E, 1)  # (b, h, i, e) strides of a (B, S, Hk, E) cache
    apart = (Hk * S * E, S * E, E, 1)  # of a (B, Hk, S, E) one
    for strides, items, heads in ((side_by_side, 2, Hk), (apart, 2 * Hk, 1)):
        p = mod.DecodeParams()
        p.B, p.H, p.Hk, p.num_threads = 2, 32, Hk, 2
        p.k = p.v = mod.Tensor4(0, *strides)
        assert mod.decode_auto_splits(p, 1000) == rule(items, 1000, heads, 2)
