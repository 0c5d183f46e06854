"""The Triton decode kernels (kernels/decode.py) under TRITON_INTERPRET=1 on CPU tensors, against the float64
reference fastattn.reference.decode_attention.

Calls the launcher ``decode_fwd`` directly. Tolerances follow fastattn.testing (fp32: small atol against
float64; fp16/bf16: at most 2x the error of the reference run in the same low precision). The interpreter runs
16-key tiles and 16-row blocks, so the caches here span several key blocks with a partial last one, and the
MQA cases pack more than 16 rows (several row blocks). Cache rows past each sequence's length hold NaN, and a
paged pool's unused pages too: a kernel that reads a key it must not read returns NaN.
"""
from __future__ import annotations

import pytest
import torch

from conftest import (DECODE_COMBINED, DECODE_ERROR_CASES, DECODE_MASK_CASES, DECODE_VARIANT_CASES, check_decode,
                      check_decode_splits, decode_error_case, decode_mask_case, decode_problem as _problem,
                      triton_kernels)

pytestmark = pytest.mark.triton
D = triton_kernels("decode")


def _run(q, k, v, lens, table, **kw):
    return D.decode_fwd(q, k, v, lens, block_table=table, **kw)


def _check(q, k, v, lens, table, **kw):
    """decode_fwd against the references; returns (out, lse)."""
    return check_decode(_run, q, k, v, lens, table, **kw)


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
    check_decode_splits(_run, _run, _problem(dtype=dtype, page=8), dtype, (3, 7, None), lse_atol=1e-6)


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
@pytest.mark.parametrize("kw", [c[1] for c in DECODE_VARIANT_CASES], ids=[c[0] for c in DECODE_VARIANT_CASES])
def test_variants(kw):
    _check(*_problem(), **kw)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_variants_combined_low_precision(dtype):
    _check(*_problem(dtype=dtype, page=8, L=1), **DECODE_COMBINED)


@pytest.mark.parametrize("kind,kw", [c[1:] for c in DECODE_MASK_CASES], ids=[c[0] for c in DECODE_MASK_CASES])
def test_masks(kind, kw):
    decode_mask_case(_run, kind, kw)


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
@pytest.mark.parametrize("kw,exc,msg", [c[1:] for c in DECODE_ERROR_CASES], ids=[c[0] for c in DECODE_ERROR_CASES])
def test_errors(kw, exc, msg):
    decode_error_case(D.decode_fwd, kw, exc, msg)


def test_empty_batch():
    q, k, v, lens, _ = _problem(B=2)
    out, lse = D.decode_fwd(q[:0], k[:0], v[:0], lens[:0])
    assert out.shape == (0, 3, 4, 40) and lse.shape == (0, 4, 3)
