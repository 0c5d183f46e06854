"""The Triton decode kernels (kernels/decode.py) under TRITON_INTERPRET=1 on CPU tensors, against the float64
reference fastattn.reference.decode_attention.

Calls the launcher ``decode_fwd`` directly. Tolerances follow fastattn.testing (fp32: small atol against
float64; fp16/bf16: at most 2x the error of the reference run in the same low precision). The interpreter runs
16-key tiles and 16-row blocks, so the caches here span several key blocks with a partial last one, and the
MQA cases pack more than 16 rows (several row blocks). Cache rows past each sequence's length hold NaN, and a
paged pool's unused pages too: a kernel that reads a key it must not read returns NaN.
"""
from __future__ import annotations

import importlib
import math
import os
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from fastattn.reference.decode import decode_attention  # noqa: E402
from fastattn.testing import assert_close  # noqa: E402

pytestmark = pytest.mark.triton


def _decode_module():
    try:
        mod = importlib.import_module("fastattn.kernels.decode")
    except ImportError:  # source checkout that is not installed: kernels/ is the package directory
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        mod = importlib.import_module("kernels.decode")
    if not mod._INTERPRETED:
        # Imported earlier in this session without the interpreter: decorate the kernels again.
        mod = importlib.reload(mod)
    return mod


D = _decode_module()
DT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
HEADS = {"mha": (2, 2), "gqa": (4, 2), "mqa": (4, 1), "mqa8": (8, 1), "gqa3": (6, 2)}  # name: (H, Hk)
SEQLENS = (37, 0, 2)  # one long, one empty (zeros), one shorter than L = 3 (its first rows see no key)


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def _problem(B=3, L=3, heads="gqa", E=24, Ev=40, S_max=45, seqlens=SEQLENS, dtype="f32", page=0, strided=False):
    """q (B, L, H, E), k_cache / v_cache, cache_seqlens, block_table (None unless ``page``). Cache rows past
    each length are NaN. ``page``: a paged pool of page-sized blocks in shuffled order, two pages unused
    (NaN), capacity S_max rounded up to a page. ``strided``: q, k_cache and v_cache are non-contiguous views."""
    gen = torch.Generator().manual_seed(0)
    H, Hk = HEADS[heads]
    dt = DT[dtype]
    lens = torch.tensor(seqlens[:B], dtype=torch.int32)
    cap = math.ceil(S_max / page) * page if page else S_max

    def cache(d):
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


def _check(q, k, v, lens, table, **kw):
    """decode_fwd against the references; returns (out, lse)."""
    out, lse = D.decode_fwd(q, k, v, lens, block_table=table, **kw)
    B, L, H, _ = q.shape
    assert out.shape == (B, L, H, v.shape[-1]) and out.dtype == q.dtype
    assert lse.shape == (B, H, L) and lse.dtype == torch.float32
    ref_kw = {n: x for n, x in kw.items() if n != "num_splits"}
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
                for layout in ("contig", "paged") for heads in ("mha", "gqa", "mqa") for L in (1, 3)]


@pytest.mark.parametrize("kw", [c[1] for c in LAYOUT_CASES], ids=[c[0] for c in LAYOUT_CASES])
def test_layouts_heads_rows(kw):
    _check(*_problem(**kw))


DTYPE_CASES = [(f"{layout}-gqa-L3-{dtype}", dict(page=8 if layout == "paged" else 0, dtype=dtype))
               for layout in ("contig", "paged") for dtype in ("f16", "bf16")]


@pytest.mark.parametrize("kw", [c[1] for c in DTYPE_CASES], ids=[c[0] for c in DTYPE_CASES])
def test_low_precision(kw):
    _check(*_problem(**kw))


def test_paged_equals_contiguous():
    """Same keys in pages (5 keys a page: tiles straddle pages) or per sequence: the same result, bit for bit
    (only the addresses differ)."""
    contig = D.decode_fwd(*_problem(S_max=45)[:4])
    q, k, v, lens, table = _problem(S_max=45, page=5)
    paged = D.decode_fwd(q, k, v, lens, block_table=table)
    assert torch.equal(contig[0], paged[0]) and torch.equal(contig[1], paged[1])


def test_strided_inputs_and_row_blocks():
    """Non-contiguous q / caches read in place, 8 query heads on 1 kv head with L = 3 (24 packed rows: two row
    blocks), head dims that are not powers of two and E != Ev."""
    _check(*_problem(heads="mqa8", E=20, Ev=12, strided=True), window=(9, -1))
    _check(*_problem(heads="mqa8", E=20, Ev=12, strided=True, page=8), num_splits=2)


def test_row_block_splits_a_query_row():
    """Groups of 3 heads, L = 6: 18 packed rows, and the first 16-row block ends inside query row 5 (heads 0
    of 3): that row's causal and window bounds must still count for the block. With n = 33, row 5's last key
    (32) is the only key of the last key block."""
    _check(*_problem(heads="gqa3", L=6, seqlens=(33, 0, 7)))
    _check(*_problem(heads="gqa3", L=6, seqlens=(33, 0, 7)), window=(4, -1), num_splits=2)


# ----------------------------------------------------------------------------------------------------
# Key splits
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_splits_agree_and_are_deterministic(dtype):
    """1 split, 3 splits, more splits than key blocks (empty splits) and the launcher's choice give the same
    answer (to rounding: the merge regroups the sums); every run repeats bit for bit."""
    p = _problem(dtype=dtype, page=8)
    sinks = torch.randn(HEADS["gqa"][0])
    one = _check(*p, sinks=sinks, num_splits=1)
    for n in (3, 7, None):
        got = _check(*p, sinks=sinks, num_splits=n)
        again = D.decode_fwd(*p[:4], block_table=p[4], sinks=sinks, num_splits=n)
        assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])
        tol = 1e-6 if dtype == "f32" else 1e-2
        torch.testing.assert_close(got[0].float(), one[0].float(), atol=tol, rtol=0)
        torch.testing.assert_close(got[1], one[1], atol=1e-6, rtol=0)


def test_num_splits_heuristic():
    """One split when the programs nearly fill the GPU; else more, never more than there are key blocks."""
    h = D.num_splits_heuristic
    assert h(programs=120, num_sms=132, key_blocks=512) == 1
    assert h(programs=8, num_sms=132, key_blocks=512) > 1
    assert h(programs=8, num_sms=132, key_blocks=3) <= 3
    assert h(programs=1, num_sms=132, key_blocks=1) == 1


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


@pytest.mark.parametrize("kw", [c[1] for c in VARIANT_CASES], ids=[c[0] for c in VARIANT_CASES])
def test_variants(kw):
    _check(*_problem(), **kw)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_variants_combined_low_precision(dtype):
    _check(*_problem(dtype=dtype, page=8, L=1), causal=False, window=(20, 3), softcap=3.0,
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
]


@pytest.mark.parametrize("kind,kw", [c[1:] for c in MASK_CASES], ids=[c[0] for c in MASK_CASES])
def test_masks(kind, kw):
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
    elif kind == "float":
        mask = torch.randn(B, H, L, S_max, generator=gen).to(q.dtype)
        mask[0, 1, 1, :20] = float("-inf")
    else:  # a float32 mask broadcast over batch and query rows
        mask = torch.randn(1, H, 1, S_max, generator=gen)
        mask[..., 5] = float("-inf")
    out, _ = _check(q, k, v, lens, None, mask=mask, **call)
    if kind == "bool":
        assert (out[0, 0] == 0).all()  # the row that sees no key


def test_mask_with_block_table_is_rejected():
    q, k, v, lens, table = _problem(page=8)
    with pytest.raises(ValueError, match="contiguous cache only"):
        D.decode_fwd(q, k, v, lens, block_table=table, mask=torch.ones(1, 1, 1, 1, dtype=torch.bool))


@pytest.mark.parametrize("page", [0, 8], ids=["contig", "paged"])
def test_out_into_transposed_view(page):
    """out= a (B, L, H, Ev) view of a (B, H, L, Ev) tensor: written in place, returned, the same bits as a
    fresh output (also with splits, where the merge kernel writes it)."""
    q, k, v, lens, table = _problem(page=page)
    B, L, H, _ = q.shape
    for n in (1, 2):
        fresh, fresh_lse = D.decode_fwd(q, k, v, lens, block_table=table, num_splits=n)
        buf = torch.full((B, H, L, v.shape[-1]), 7.0)
        got, lse = D.decode_fwd(q, k, v, lens, block_table=table, num_splits=n, out=buf.transpose(1, 2))
        assert got.data_ptr() == buf.data_ptr() and got.stride() == buf.transpose(1, 2).stride()
        assert torch.equal(buf.transpose(1, 2), fresh) and torch.equal(lse, fresh_lse)


def test_window_skips_key_blocks():
    """A sliding window never reads the key blocks before it: poisoning them with NaN changes nothing (a
    masked-but-loaded NaN key would turn the output into NaN through p = 0 times NaN)."""
    q, k, v, lens, table = _problem(B=1, seqlens=(45,), L=1)
    clean = _check(q, k, v, lens, table, window=(8, -1), num_splits=1)
    k[0, :32] = float("nan")  # query position 44 sees keys 36..44: blocks [0, 16) and [16, 32) are skipped
    v[0, :32] = float("nan")
    out, lse = D.decode_fwd(q, k, v, lens, window=(8, -1), num_splits=1)
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
        D.decode_fwd(**args, **extra)


def test_empty_batch():
    q, k, v, lens, _ = _problem(B=2)
    out, lse = D.decode_fwd(q[:0], k[:0], v[:0], lens[:0])
    assert out.shape == (0, 3, 4, 40) and lse.shape == (0, 4, 3)
