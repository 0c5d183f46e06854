"""The decoder variants (sliding window, logit soft-capping, ALiBi, attention sinks) in the Triton attention
kernels, under TRITON_INTERPRET=1, against the float64 reference.

Calls the launchers directly (``attention_fwd`` / ``attention_bwd`` with ``window`` / ``softcap`` /
``alibi_slopes`` / ``sinks``: the contract the CPU kernels share) and compares with
``fastattn.reference.scaled_dot_product_attention`` run with the same variants; autograd through the reference
gives the gradients, and the kernels' backward gets the forward's own out and lse (which holds the sinks).
Tolerances follow fastattn.testing. Shapes are tiny (the interpreter is slow) but span several
``INTERPRETER_CONFIGS`` blocks, partial blocks and L != S.
"""
from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from fastattn import reference as R  # noqa: E402
from fastattn.testing import assert_close  # noqa: E402
from conftest import padding_mask, randn_heads, triton_kernels  # noqa: E402

pytestmark = pytest.mark.triton

A = triton_kernels("attention")
DT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
ALL = dict(window=(6, 2), softcap=1.5, alibi="bh", sinks=True)


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def _variant_tensors(B, H, alibi, sinks, gen):
    """(alibi_slopes, sinks) as the op passes them: "h" per-head slopes expanded over the batch with
    stride 0, "bh" one slope per (b, h) read through a transposed (non-contiguous) view."""
    slopes = None
    if alibi == "h":
        slopes = (torch.rand(H, generator=gen) * 0.5).expand(B, H)
    elif alibi == "bh":
        slopes = (torch.rand(H, B, generator=gen) * 0.5).t()
    sink = torch.randn(H, generator=gen) * 2.0 if sinks else None
    return slopes, sink


def _mask(kind, B, H, L, S, dtype, gen):
    """none | bool (B, H, L, S) | float (1, H, L, S) (broadcast over the batch: the dmask kernel) |
    pad (bool (B, 1, 1, S) padding: the key-range path)."""
    if kind == "none":
        return None
    if kind == "bool":
        return torch.rand(B, H, L, S, generator=gen) > 0.3
    if kind == "float":
        return torch.randn(1, H, L, S, generator=gen).to(dtype)
    if kind == "pad":
        return padding_mask([S - 3, max(1, S // 2)][:B], S)
    raise ValueError(kind)


def _reference(q, k, v, mask, dout, *, upcast, mask_grad, variants, **kw):
    """(out, lse, dq, dk, dv, dmask) of fastattn.reference in float64 (upcast) or the input precision."""
    dt = torch.float64 if upcast else q.dtype
    qr, kr, vr = (x.detach().to(dt).requires_grad_() for x in (q, k, v))
    m = mask
    if mask is not None and mask.dtype != torch.bool:
        m = mask.detach().to(dt).requires_grad_(mask_grad)
    out, lse = R.scaled_dot_product_attention(qr, kr, vr, attn_mask=m, scale=kw["scale"], is_causal=kw["is_causal"],
                                              dropout_p=kw["dropout_p"], dropout_seed=kw["seed"], enable_gqa=True,
                                              upcast=upcast, return_lse=True, causal_offset=kw["causal_offset"],
                                              **variants)
    out.backward(dout.to(out.dtype))
    return out.detach(), lse, qr.grad, kr.grad, vr.grad, m.grad if mask_grad else None


def _check(B=2, H=4, Hk=2, L=21, S=27, E=16, Ev=16, dtype="f32", causal=False, offset=0, mask="none",
           mask_grad=False, dropout_p=0.0, window=(-1, -1), softcap=0.0, alibi=None, sinks=False):
    """Forward and backward of the kernels against the references (the fp16 / bf16 forward hands its out_lo
    to the backward, as training does). ``offset`` "lower-right" is S - L."""
    gen = torch.Generator().manual_seed(0)
    dt = DT[dtype]
    q, k, v, dout = (randn_heads(B, h, n, e, dt, gen=gen) for h, n, e in ((H, L, E), (Hk, S, E), (Hk, S, Ev),
                                                                            (H, L, Ev)))
    m = _mask(mask, B, H, L, S, dt, gen)
    slopes, sink = _variant_tensors(B, H, alibi, sinks, gen)
    if offset == "lower-right":
        offset = S - L
    kw = dict(scale=1.0 / math.sqrt(E), is_causal=causal, dropout_p=dropout_p, seed=77, causal_offset=offset)
    variants = dict(window=window, softcap=softcap, alibi_slopes=slopes)
    lp16 = dt != torch.float32
    out, lse, *lo = A.attention_fwd(q, k, v, m, **kw, **variants, sinks=sink, return_lo=lp16)
    dq, dk, dv, dm = A.attention_bwd(dout, q, k, v, out, lse, m, **kw, **variants, mask_needs_grad=mask_grad,
                                     out_lo=lo[0] if lo else None)
    want_dm = mask_grad and m is not None and m.dtype != torch.bool
    variants["sinks"] = sink
    ref = _reference(q, k, v, m, dout, upcast=True, mask_grad=want_dm, variants=variants, **kw)
    lp = (_reference(q, k, v, m, dout, upcast=False, mask_grad=want_dm, variants=variants, **kw) if lp16
          else [None] * 6)
    assert_close("out", out, ref[0], lp[0])
    assert_close("lse", lse, ref[1], lp[1])
    for name, got, r64, rlp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[2:5], lp[2:5]):
        assert got.shape == r64.shape and got.dtype == dt
        assert_close(name, got, r64, rlp, backward=True)
    if want_dm:
        assert dm.shape == m.shape
        assert_close("dmask", dm, ref[5], lp[5], backward=True)
    return out, lse, (dq, dk, dv)


# ----------------------------------------------------------------------------------------------------
# Each variant alone and all together, against the reference
# ----------------------------------------------------------------------------------------------------
ALONE = [
    ("window-L21-S27", dict(window=(4, 3))),
    ("window-left-only-causal-LR-gqa2-bool", dict(window=(5, -1), causal=True, offset="lower-right", mask="bool")),
    ("softcap-L21-S27", dict(softcap=0.8)),
    ("softcap-causal-LR-gqa2-bool", dict(softcap=2.0, causal=True, offset="lower-right", mask="bool")),
    ("alibi-h-L21-S27", dict(alibi="h")),
    ("alibi-bh-causal-LR-gqa2-bool", dict(alibi="bh", causal=True, offset="lower-right", mask="bool")),
    ("sinks-L21-S27", dict(sinks=True)),
    ("sinks-causal-LR-gqa2-bool", dict(sinks=True, causal=True, offset="lower-right", mask="bool")),
]

COMBINED = [
    ("all-f32-L21-S27-gqa2", dict()),
    ("all-f32-causal-LR-float-dmask-bcast", dict(causal=True, offset="lower-right", mask="float", mask_grad=True)),
    ("all-f32-offset3-noncausal-L19-S37-gqa4", dict(H=4, Hk=1, L=19, S=37, offset=3)),
    ("all-f32-pad-causal-L33-S20-Ev24", dict(B=2, L=33, S=20, Ev=24, causal=True, mask="pad")),
    ("all-f32-dropout-causal", dict(causal=True, dropout_p=0.2)),
    ("all-f16-causal-LR-bool", dict(dtype="f16", causal=True, offset="lower-right", mask="bool")),
    ("all-bf16-causal-LR-float-dmask", dict(dtype="bf16", causal=True, offset="lower-right", mask="float",
                                            mask_grad=True)),
    ("all-bf16-L21-S27-noncausal", dict(dtype="bf16")),
]


@pytest.mark.parametrize("kw", [c[1] for c in ALONE], ids=[c[0] for c in ALONE])
def test_variant_alone(kw):
    _check(**kw)


@pytest.mark.parametrize("kw", [c[1] for c in COMBINED], ids=[c[0] for c in COMBINED])
def test_variants_combined(kw):
    _check(**{**ALL, **kw})


# ----------------------------------------------------------------------------------------------------
# Rows and key blocks the window hides
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sinks", [False, True], ids=["no-sinks", "sinks"])
def test_window_hides_rows_and_key_blocks(sinks):
    """Not causal, offset -10, window (3, 2): query row i sees keys [i - 13, i - 8], so rows 0..7 see no key
    (out 0, lse -inf, or the sink; dq 0) and keys past L - 9 no query (dk = dv = 0), whole key blocks of them."""
    L, S, off = 21, 70, -10
    out, lse, (dq, dk, dv) = _check(B=1, H=2, Hk=1, L=L, S=S, offset=off, window=(3, 2), sinks=sinks, alibi="h",
                                    softcap=3.0)
    dead = 8
    assert (out[:, :, :dead] == 0).all() and (dq[:, :, :dead] == 0).all()
    if sinks:
        assert torch.isfinite(lse[:, :, :dead]).all()
    else:
        assert torch.isneginf(lse[:, :, :dead]).all()
    unseen = L - 1 + off + 2 + 1
    assert (dk[:, :, unseen:] == 0).all() and (dv[:, :, unseen:] == 0).all()


def test_window_blocks_are_skipped():
    """Key blocks wholly outside the window are never read, and the dK/dV kernel never loads the query
    blocks wholly outside it: NaN planted there cannot leak (0 * NaN would). One forward / dQ query block
    (L = its BLOCK_M) at positions 40..71 with window (3, 2) sees keys 37..73."""
    cfg = A.INTERPRETER_CONFIGS
    L = cfg["fwd"].block_m
    assert cfg["bwd_dq"].block_m == L and cfg["fwd"].block_n == cfg["bwd_dq"].block_n
    bn = cfg["fwd"].block_n
    S, off, window = 96, 40, (3, 2)
    B, H, E = 1, 2, 16
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, n, E, generator=gen) for n in (L, S, S))
    kw = dict(scale=0.25, is_causal=False, dropout_p=0.0, seed=0, causal_offset=off, window=window)
    ref, ref_lse = A.attention_fwd(q, k, v, None, **kw)
    dout = torch.randn(ref.shape, generator=gen)
    ref_grads = A.attention_bwd(dout, q, k, v, ref, ref_lse, None, **kw, mask_needs_grad=False)

    # Forward / dQ: key blocks below rounddown(37, bn) and from roundup(74, bn) on are skipped.
    lo, hi = (off - window[0]) // bn * bn, -(-(off + L + window[1]) // bn) * bn
    assert lo > 0 and hi < S
    k_nan, v_nan = k.clone(), v.clone()
    for sl in (slice(0, lo), slice(hi, S)):
        k_nan[:, :, sl] = float("nan")
        v_nan[:, :, sl] = float("nan")
    out, lse = A.attention_fwd(q, k_nan, v_nan, None, **kw)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    dq = A.attention_bwd(dout, q, k_nan, v_nan, ref, ref_lse, None, **kw, mask_needs_grad=False)[0]
    assert torch.equal(dq, ref_grads[0])

    # dK/dV: the last key block [n, n + BLOCK_N) is seen from query rows >= n - right - off on, so the query
    # blocks below rounddown(n - right - off, BLOCK_M) are skipped; NaN in their dO cannot reach it.
    bm, bn2 = cfg["bwd_dkdv"].block_m, cfg["bwd_dkdv"].block_n
    last_n = -(-S // bn2) * bn2 - bn2
    above = (last_n - window[1] - off) // bm * bm
    assert 0 < above < L
    dout_nan = dout.clone()
    dout_nan[:, :, :above] = float("nan")
    _, dk, dv, _ = A.attention_bwd(dout_nan, q, k, v, ref, ref_lse, None, **kw, mask_needs_grad=False)
    assert torch.equal(dk[:, :, last_n:], ref_grads[1][:, :, last_n:])
    assert torch.equal(dv[:, :, last_n:], ref_grads[2][:, :, last_n:])


# ----------------------------------------------------------------------------------------------------
# Edges, arguments and the plain path
# ----------------------------------------------------------------------------------------------------
def test_sinks_without_keys():
    """S = 0: every row sees only the sink (out 0, lse = sink_h)."""
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 0, 8), torch.randn(2, 3, 0, 8)
    sinks = torch.tensor([0.5, -1.0, 2.0])
    out, lse = A.attention_fwd(q, k, v, None, scale=0.3, is_causal=False, dropout_p=0.0, seed=0, sinks=sinks)
    assert (out == 0).all() and torch.equal(lse, sinks.view(1, 3, 1).expand(2, 3, 5))


def test_plain_calls_pass_no_variant_arguments():
    """Without variants every variant argument is None (the JIT makes it a constexpr and drops it) and every
    switch off, so the plain kernels compile as they did before the variants existed."""
    q, k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    out, lse = torch.empty_like(q), torch.empty(1, 2, 8)
    kw = dict(scale=0.25, is_causal=True, dropout_p=0.0, seed=0)
    launches = A._fwd_plan(q, k, v, None, out, lse, **kw)
    launches += A._bwd_plan(q, q, k, v, out, lse, None, q, k, v, None, lse, **kw)
    names = ("Alibi", "Sinks", "stride_ab", "stride_ah", "window_left", "window_right", "softcap")
    for launch in launches:
        if launch.name == "bwd_preprocess":
            continue
        for n in names:
            assert launch.args.get(n, None) is None, (launch.name, n)
        for flag in ("WINDOW", "SOFTCAP", "ALIBI", "SINKS"):
            assert not launch.args.get(flag, False), (launch.name, flag)


@pytest.mark.parametrize("bad,err", [
    (dict(window=(-2, 3)), "window"),
    (dict(softcap=-1.0), "softcap"),
    (dict(alibi_slopes=torch.ones(3, 2)), "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(1, 2, dtype=torch.float64)), "alibi_slopes"),
    (dict(sinks=torch.ones(3)), "sinks"),
], ids=["window", "softcap", "alibi-shape", "alibi-dtype", "sinks-shape"])
def test_bad_variant_arguments(bad, err):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=err):
        A.attention_fwd(q, q, q, None, scale=0.3, is_causal=False, dropout_p=0.0, seed=0, **bad)


def test_every_decoder_call_has_configs():
    """Rows that spill with the decoder variants are left out of those calls, never all of a kernel's rows."""
    for name in A.CONFIGS:
        for bucket in A.HEAD_BUCKETS:
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for heavy in (False, True):
                    rows = A.candidate_configs(name, bucket, dtype, heavy, decoder=True)
                    assert rows, (name, bucket, dtype, heavy)
                    assert all(c.decoder for c in rows)
