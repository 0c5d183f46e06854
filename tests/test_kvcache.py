"""fastattn.attention_with_kvcache (fastattn/kvcache.py), the op fastattn::decode_fwd (fastattn/_ops/decode.py)
and scaled_dot_product_attention's decode route, against the float64 reference fastattn.reference.decode_attention
(tolerances of fastattn.testing).

Backends: "triton" (the interpreter, small shapes) and "cpu" (the C++ decode kernel). Cache rows past each
sequence's length hold NaN (and a paged pool's unused pages): a kernel that reads a key it must not read
returns NaN.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import fastattn
from fastattn import _cpu
from fastattn._ops.decode import decode_fwd as decode_op
from fastattn.reference.decode import decode_attention
from fastattn.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import DECODE_DT as DT, DECODE_HEADS as HEADS, nan_past_lengths, paged_pools

BACKENDS = [pytest.param("triton", marks=pytest.mark.triton), "cpu"]


def _need(backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    elif not hasattr(_cpu, "decode_fwd"):
        pytest.skip("the CPU decode launcher (fastattn._cpu.decode_fwd) is not built")


# ----------------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------------
def _problem(B=3, L=2, L_new=2, heads="gqa", E=24, Ev=16, S_max=40, lens=(27, 0, 5), dtype="f32", page=0,
             layout="bshd", seed=0):
    """dict(q, k_cache, v_cache, cache_seqlens, k, v, block_table) in ``layout``; cache rows past each length
    NaN; ``page``: a paged pool with shuffled pages and two unused ones (capacity S_max rounded up a page)."""
    gen = torch.Generator().manual_seed(seed)
    H, Hk = HEADS[heads]
    dt = DT[dtype]
    cap = math.ceil(S_max / page) * page if page else S_max
    lens_t = torch.tensor(lens[:B], dtype=torch.int32)

    def cache(d):
        return nan_past_lengths(torch.randn(B, cap, Hk, d, generator=gen).to(dt), lens_t)
    q = torch.randn(B, L, H, E, generator=gen).to(dt)
    kc, vc = cache(E), cache(Ev)
    k = torch.randn(B, L_new, Hk, E, generator=gen).to(dt) if L_new else None
    v = torch.randn(B, L_new, Hk, Ev, generator=gen).to(dt) if L_new else None
    table = None
    if page:
        kc, vc, table = paged_pools(kc, vc, page, gen)
    if layout == "bhsd":  # the same values in (B, H, L, E) memory
        q = q.transpose(1, 2).contiguous()
        if not page:
            kc, vc = kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()
        if L_new:
            k, v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    return dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=lens_t, k=k, v=v, block_table=table)


def _bshd(p: dict, layout: str) -> dict:
    """The problem's tensors as (B, L, H, E)-ordered views."""
    if layout == "bshd":
        return dict(p)
    t = dict(p)
    t["q"] = p["q"].transpose(1, 2)
    if p["block_table"] is None:
        t["k_cache"], t["v_cache"] = p["k_cache"].transpose(1, 2), p["v_cache"].transpose(1, 2)
    if p["k"] is not None:
        t["k"], t["v"] = p["k"].transpose(1, 2), p["v"].transpose(1, 2)
    return t


def _appended(p: dict, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache, lengths after appending) the call should leave, written key by key (bshd views)."""
    t = _bshd(p, layout)
    kc, vc = t["k_cache"].clone(), t["v_cache"].clone()
    lens = t["cache_seqlens"].clone()
    if t["k"] is not None:
        L_new = t["k"].shape[1]
        for b, n in enumerate(lens.tolist()):
            for j in range(L_new):
                pos = n + j
                if t["block_table"] is None:
                    kc[b, pos], vc[b, pos] = t["k"][b, j], t["v"][b, j]
                else:
                    pg, slot = int(t["block_table"][b, pos // kc.shape[1]]), pos % kc.shape[1]
                    kc[pg, slot], vc[pg, slot] = t["k"][b, j], t["v"][b, j]
        lens = lens + L_new
    return kc, vc, lens


def _check(p: dict, layout="bshd", backend="triton", **kw):
    """attention_with_kvcache against the reference on the appended caches; the caches hold the new keys."""
    kc, vc, lens = _appended(p, layout)
    qb = _bshd(p, layout)["q"]
    table = p["block_table"]
    ref, ref_lse = decode_attention(qb, kc, vc, lens, block_table=table, **kw)
    lp = None
    if qb.dtype != torch.float32:
        lp = decode_attention(qb, kc, vc, lens, block_table=table, upcast=False, **kw)[0]
    out, lse = fastattn.attention_with_kvcache(**p, layout=layout, return_lse=True, backend=backend, **kw)
    B, L, H, _ = qb.shape
    Ev = vc.shape[-1]
    assert out.shape == ((B, L, H, Ev) if layout == "bshd" else (B, H, L, Ev)) and out.is_contiguous()
    assert out.dtype == qb.dtype and lse.shape == (B, H, L) and lse.dtype == torch.float32
    out_bshd = out if layout == "bshd" else out.transpose(1, 2)
    assert_close("out", out_bshd, ref, lp)
    assert_close("lse", lse, ref_lse)
    t = _bshd(p, layout)
    assert torch.equal(t["k_cache"].nan_to_num(7.0), kc.nan_to_num(7.0))
    assert torch.equal(t["v_cache"].nan_to_num(7.0), vc.nan_to_num(7.0))
    return out, lse


# ----------------------------------------------------------------------------------------------------
# attention_with_kvcache against the reference
# ----------------------------------------------------------------------------------------------------
CASES = [(f"{layout}-{'paged' if page else 'contig'}-{heads}-{'append' if L_new else 'noappend'}",
          dict(layout=layout, page=page, heads=heads, L_new=L_new, L=2 if L_new else 1))
         for layout in ("bshd", "bhsd") for page in (0, 8) for heads in ("mha", "gqa", "mqa") for L_new in (0, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_layouts_paged_append_heads(backend, kw):
    _need(backend)
    kw = dict(kw)
    layout = kw.pop("layout")
    _check(_problem(layout=layout, **kw), layout, backend)


H4 = HEADS["gqa"][0]
VARIANTS = [
    ("not-causal", dict(causal=False)),
    ("window", dict(window=(6, -1))),
    ("softcap", dict(softcap=1.5)),
    ("sinks", dict(sinks=torch.linspace(-1.0, 2.0, H4))),
    ("alibi", dict(alibi_slopes=torch.linspace(0.05, 0.4, H4))),
    ("scale", dict(scale=0.7)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [c[1] for c in VARIANTS], ids=[c[0] for c in VARIANTS])
def test_variants(backend, kw):
    _need(backend)
    _check(_problem(page=8), "bshd", backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_low_precision(backend, dtype, layout):
    _need(backend)
    _check(_problem(dtype=dtype, layout=layout, L=3, L_new=3), layout, backend)


def test_int_seqlens_and_reference_backend():
    """cache_seqlens as an int; backend "reference" runs the naive formula (and appends the same way)."""
    p = _problem(lens=(9, 9, 9), L_new=1, L=1)
    p["cache_seqlens"] = 9
    kc, vc, lens = _appended({**p, "cache_seqlens": torch.full((3,), 9, dtype=torch.int32)}, "bshd")
    out = fastattn.attention_with_kvcache(**p, backend="reference")
    ref = decode_attention(p["q"], kc, vc, lens, upcast=False)[0]
    assert torch.equal(out, ref) and torch.equal(p["k_cache"].nan_to_num(7.0), kc.nan_to_num(7.0))


def test_inference_only():
    p = _problem()
    p["q"].requires_grad_()
    with pytest.raises(ValueError, match="q requires grad.*inference only"):
        fastattn.attention_with_kvcache(**p, backend="reference")
    with torch.no_grad():
        fastattn.attention_with_kvcache(**p, backend="reference")


# ----------------------------------------------------------------------------------------------------
# Errors: raised before anything is written
# ----------------------------------------------------------------------------------------------------
def _set(p: dict, **kw) -> dict:
    p = dict(p)
    p.update(kw)
    return p


ERRORS = [
    ("layout", lambda p: (p, dict(layout="bsdh")), ValueError, "layout must be one of"),
    ("k-without-v", lambda p: (_set(p, v=None), {}), ValueError, "k and v must be given together"),
    ("q-3d", lambda p: (_set(p, q=p["q"][0]), {}), ValueError, "q must be 4-D"),
    ("q-int", lambda p: (_set(p, q=p["q"].int()), {}), TypeError, "q must be float16"),
    ("cache-dtype", lambda p: (_set(p, v_cache=p["v_cache"].half()), {}), TypeError, "v_cache must have q's dtype"),
    ("k-dtype", lambda p: (_set(p, k=p["k"].double()), {}), TypeError, "k must have q's dtype"),
    ("cache-dims", lambda p: (_set(p, v_cache=p["v_cache"][:, :-1]), {}), ValueError, "must agree in every dim"),
    ("head-dim", lambda p: (_set(p, q=p["q"][..., :20]), {}), ValueError, "k_cache's head dim must be q's"),
    ("heads", lambda p: (_set(p, q=p["q"][:, :, :3]), {}), ValueError, "multiple of the cache's"),
    ("batch", lambda p: (_set(p, q=p["q"][:2], k=p["k"][:2], v=p["v"][:2]), {}), ValueError,
     "batch dim must be q's"),
    ("k-shape", lambda p: (_set(p, k=p["k"][..., :20]), {}), ValueError, r"k must have shape \(B, L_new, Hk, E\)"),
    ("v-heads", lambda p: (_set(p, v=p["v"].repeat(1, 1, 2, 1)), {}), ValueError, "v must have shape"),
    ("seqlens-dtype", lambda p: (_set(p, cache_seqlens=p["cache_seqlens"].float()), {}), TypeError,
     "cache_seqlens must be int32 or int64"),
    ("seqlens-shape", lambda p: (_set(p, cache_seqlens=p["cache_seqlens"][:2]), {}), ValueError,
     "cache_seqlens must have shape"),
    ("seqlens-negative", lambda p: (_set(p, cache_seqlens=torch.tensor([3, -1, 0], dtype=torch.int32)), {}),
     ValueError, r"cache_seqlens must be >= 0, got cache_seqlens\[1\] = -1"),
    ("seqlens-capacity", lambda p: (_set(p, cache_seqlens=torch.tensor([3, 39, 0], dtype=torch.int32)), {}),
     ValueError, r"cache_seqlens\[1\] = 39 plus 2 new keys exceeds the cache capacity \(S_max = 40\)"),
    ("window", lambda p: (p, dict(window=(-2, 0))), ValueError, "window must be"),
    ("softcap", lambda p: (p, dict(softcap=-1.0)), ValueError, "softcap must be"),
    ("scale", lambda p: (p, dict(scale=float("nan"))), ValueError, "scale must be"),
    ("splits", lambda p: (p, dict(num_splits=0)), ValueError, "num_splits must be"),
    ("sinks", lambda p: (p, dict(sinks=torch.zeros(3))), ValueError, "sinks must be"),
    ("alibi", lambda p: (p, dict(alibi_slopes=torch.zeros(2, 4))), ValueError, "alibi_slopes must be"),
    ("causal", lambda p: (p, dict(causal=1)), TypeError, "causal must be a bool"),
    ("backend", lambda p: (p, dict(backend="cuda")), ValueError, "backend must be one of"),
]
PAGED_ERRORS = [
    ("table-dtype", lambda p: (_set(p, block_table=p["block_table"].long()), {}), ValueError,
     "block_table must be an int32 tensor"),
    ("table-capacity", lambda p: (_set(p, cache_seqlens=torch.tensor([3, 39, 0], dtype=torch.int32)), {}),
     ValueError, r"exceeds the cache capacity \(max_blocks \* page_size = 40\)"),
    ("table-entry", lambda p: (_set(p, block_table=p["block_table"].clone().index_fill_(1, torch.tensor([0]), 17)),
                               {}), ValueError, r"block_table\[0, 0\] = 17 is outside the page pool \[0, 17\)"),
    ("table-negative", lambda p: (_set(p, block_table=p["block_table"].clone().index_fill_(1, torch.tensor([3]), -1)),
                                  {}), ValueError, r"block_table\[0, 3\] = -1 is outside the page pool"),
]


@pytest.mark.parametrize("make,exc,msg", [c[1:] for c in ERRORS + PAGED_ERRORS],
                         ids=[c[0] for c in ERRORS + PAGED_ERRORS])
def test_errors_write_nothing(make, exc, msg):
    paged = any(make is c[1] for c in PAGED_ERRORS)
    args, kw = make(_problem(page=8 if paged else 0))
    before = [t.clone() for t in (args["k_cache"], args["v_cache"])]
    with pytest.raises(exc, match=msg):
        fastattn.attention_with_kvcache(**args, **kw)
    for t, b in zip((args["k_cache"], args["v_cache"]), before):
        assert torch.equal(t.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_table_entries_are_not_checked(backend):
    """Entries past a sequence's pages (padding such as -1) are never read, so they are allowed."""
    _need(backend)
    p = _problem(page=8, lens=(3, 0, 5), L_new=1, L=1)
    p["block_table"][:, 2:] = -1
    _check(p, "bshd", backend)


# ----------------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_layout", ["bshd", "bhsd", "sdpa"])
def test_opcheck(backend, out_layout):
    _need(backend)
    p = _problem(page=8, lens=(9, 3, 5))
    mask = torch.rand(3, 1, 2, 16) > 0.2
    torch.library.opcheck(decode_op, (p["q"], p["k_cache"], p["v_cache"], p["cache_seqlens"], p["block_table"],
                                      None, 0.3, True, -1, -1, 0.0, None, None, 2, backend, out_layout))
    q = _problem(lens=(9, 3, 5))
    torch.library.opcheck(decode_op, (q["q"], q["k_cache"][:, :16], q["v_cache"][:, :16], q["cache_seqlens"], None,
                                      mask, 0.3, False, 4, -1, 2.0, torch.zeros(4), torch.ones(4), None, backend,
                                      out_layout))


class _Seen(TorchDispatchMode):
    """Records the ops dispatched under it (and, being a dispatch mode, makes every call a non-plain one)."""
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def test_plain_cpu_calls_run_the_op_body_and_others_the_op(monkeypatch):
    """A plain eager CPU call that the C++ entry declines (here: the entry switched off) skips the op's dispatch
    and runs its body; under a dispatch mode (as under tracing, torch.compile or a functorch transform) the call
    goes through fastattn::decode_fwd. Same bits either way."""
    _need("cpu")
    from fastattn import _launchers
    monkeypatch.setattr(_launchers, "cpu_kvcache", lambda: None)
    p = _problem(lens=(9, 3, 5), page=8)
    p.pop("k"), p.pop("v")
    with _Seen() as seen:
        through_op = fastattn.attention_with_kvcache(**p, return_lse=True)
    assert "fastattn.decode_fwd.default" in seen.ops
    plain = fastattn.attention_with_kvcache(**p, return_lse=True)
    assert torch.equal(plain[0], through_op[0]) and torch.equal(plain[1], through_op[1])


# ----------------------------------------------------------------------------------------------------
# The C++ entry of plain eager CPU calls (csrc/eager.cpp kvcache_fwd)
# ----------------------------------------------------------------------------------------------------
ROUTE_ORDER = ("q", "k_cache", "v_cache", "cache_seqlens", "k", "v", "block_table", "scale", "causal", "window",
               "softcap", "sinks", "alibi_slopes", "layout", "return_lse", "num_splits", "backend")
ROUTE_DEFAULTS = dict(k=None, v=None, block_table=None, scale=None, causal=True, window=(-1, -1), softcap=0.0,
                      sinks=None, alibi_slopes=None, layout="bshd", return_lse=False, num_splits=None, backend=None)


def _route(p: dict, **kw):
    """kvcache_fwd of the kernel module, called with attention_with_kvcache's arguments in its order."""
    from fastattn import _launchers
    a = {**ROUTE_DEFAULTS, **p, **kw}
    return _launchers.cpu_kvcache()(*(a[n] for n in ROUTE_ORDER))


def _clone(p: dict) -> dict:
    return {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in p.items()}


ROUTE_CASES = (
    [(f"{layout}-{'paged' if page else 'contig'}-{heads}-{dtype}-{'append' if L_new else 'noappend'}",
      dict(layout=layout, page=page, heads=heads, dtype=dtype, L_new=L_new, L=2 if L_new else 1), {})
     for layout in ("bshd", "bhsd") for page in (0, 8) for heads in ("mha", "gqa", "mqa8")
     for dtype in ("f32", "bf16", "f16") for L_new in (0, 2)]
    + [(name, dict(page=8), kw) for name, kw in VARIANTS]
    + [("alibi-per-batch", dict(page=8), dict(alibi_slopes=torch.linspace(0.05, 0.4, 3 * H4).reshape(3, H4))),
       ("window-both-list", dict(), dict(window=[4, 1], causal=False)),
       ("splits-3", dict(), dict(num_splits=3)),
       ("int-scale", dict(), dict(scale=1)),
       ("lse-bhsd", dict(layout="bhsd"), dict(return_lse=True, layout="bhsd")),
       ("seqlens-int64", dict(), "int64"),
       ("seqlens-int", dict(lens=(7, 7, 7)), "int")])


@pytest.mark.parametrize("prob,kw", [c[1:] for c in ROUTE_CASES], ids=[c[0] for c in ROUTE_CASES])
def test_cpu_entry_equals_the_python_path(prob, kw):
    """The C++ entry takes plain eager calls and gives the bits of the Python path (run under a dispatch mode,
    which the entry declines: through the op), the appended caches included."""
    _need("cpu")
    prob = dict(prob)
    layout = prob.pop("layout", "bshd")
    p = _problem(layout=layout, **prob)
    if kw == "int64":
        p["cache_seqlens"], kw = p["cache_seqlens"].long(), {}
    elif kw == "int":
        p["cache_seqlens"], kw = int(p["cache_seqlens"][0]), {}
    kw = {"layout": layout, "return_lse": True, **kw}
    mine, python = _clone(p), _clone(p)
    got = _route(mine, **kw)
    assert got is not None, "the C++ entry declined a plain call"
    with _Seen() as seen:
        want = fastattn.attention_with_kvcache(**python, **kw)
    assert "fastattn.decode_fwd.default" in seen.ops
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.stride() == w.stride() and g.dtype == w.dtype
        assert torch.equal(g, w)
    for name in ("k_cache", "v_cache"):
        assert torch.equal(mine[name].nan_to_num(7.0), python[name].nan_to_num(7.0)), name
    # Through the public function (which takes the entry), the same again.
    again = fastattn.attention_with_kvcache(**_clone(p), **kw)
    assert all(torch.equal(a, w) for a, w in zip(again, want))


@pytest.mark.parametrize("make,exc,msg", [c[1:] for c in ERRORS + PAGED_ERRORS],
                         ids=[c[0] for c in ERRORS + PAGED_ERRORS])
def test_cpu_entry_declines_bad_input_and_writes_nothing(make, exc, msg):
    """Every invalid call is declined (None) before anything is written; the Python path then raises."""
    _need("cpu")
    paged = any(make is c[1] for c in PAGED_ERRORS)
    args, kw = make(_problem(page=8 if paged else 0))
    before = [t.clone() for t in (args["k_cache"], args["v_cache"])]
    assert _route(args, **kw) is None
    for t, b in zip((args["k_cache"], args["v_cache"]), before):
        assert torch.equal(t.nan_to_num(7.0), b.nan_to_num(7.0))


def test_cpu_entry_declines_what_the_python_path_takes():
    """Calls the entry leaves to the Python path: a gradient wanted, sinks / slopes not float32, new rows that
    share memory with the cache, an empty batch; the public function still answers them."""
    _need("cpu")
    p = _problem(lens=(9, 3, 5), L_new=1, L=1)
    q = p["q"].clone().requires_grad_()
    assert _route({**p, "q": q}) is None
    assert _route(p, sinks=torch.zeros(H4, dtype=torch.float64)) is None
    assert _route(p, alibi_slopes=torch.zeros(H4, dtype=torch.float16)) is None
    aliased = dict(p, k=p["k_cache"][:, 20:21])
    assert _route(aliased) is None
    empty = _problem(B=0, lens=())
    assert _route(empty) is None
    expanded = dict(p, k_cache=p["k_cache"][:, :, :1].expand(-1, -1, p["k_cache"].shape[2], -1))
    assert _route(expanded) is None
    ref = fastattn.attention_with_kvcache(**_clone(p), sinks=torch.zeros(H4), backend="cpu")
    got = fastattn.attention_with_kvcache(**_clone(p), sinks=torch.zeros(H4, dtype=torch.float64), backend="cpu")
    assert torch.equal(ref, got)


# ----------------------------------------------------------------------------------------------------
# scaled_dot_product_attention's decode route
# ----------------------------------------------------------------------------------------------------
def _sdpa_problem(B, H, Hk, L, S, E, dtype, mask, transposed, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dt = DT[dtype]
    if transposed:  # what a transformer's projections give: (B, L, H, E) memory
        q = torch.randn(B, L, H, E, generator=gen).to(dt).transpose(1, 2)
        k = torch.randn(B, S, Hk, E, generator=gen).to(dt).transpose(1, 2)
        v = torch.randn(B, S, Hk, E, generator=gen).to(dt).transpose(1, 2)
    else:
        q, k, v = (torch.randn(B, h, n, E, generator=gen).to(dt) for h, n in ((H, L), (Hk, S), (Hk, S)))
    m = None
    if mask == "bool-pad":  # (B, 1, 1, S) padding: batch 1 sees its first S // 3 keys
        m = torch.ones(B, 1, 1, S, dtype=torch.bool)
        m[1, ..., S // 3:] = False
    elif mask == "float":
        m = torch.randn(B, H, L, S, generator=gen).to(dt)
        m[0, 0, 0, : S // 2] = float("-inf")
    elif mask == "bool-rows":  # (1, 1, L, S), first row sees nothing
        m = torch.rand(1, 1, L, S, generator=gen) > 0.4
        m[..., 0, :] = False
    return q, k, v, m


SDPA_CASES = [
    ("L1-S64-gqa-f32", dict(L=1, S=64, H=4, Hk=2)),
    ("L2-S97-mha-f32-transposed", dict(L=2, S=97, H=2, Hk=2, transposed=True)),
    ("L3-S300-mqa-f32-causal", dict(L=3, S=300, H=4, Hk=1, causal="top-left")),
    ("L4-S129-gqa-f32-lower-right", dict(L=4, S=129, H=4, Hk=2, causal="lower-right")),
    ("L4-S129-gqa-f32-boolpad-causal", dict(L=4, S=129, H=4, Hk=2, causal="top-left", mask="bool-pad")),
    ("L2-S80-gqa-f32-float-causal", dict(L=2, S=80, H=4, Hk=2, mask="float", causal="top-left")),
    ("L3-S70-mha-f32-boolrows-transposed", dict(L=3, S=70, H=2, Hk=2, mask="bool-rows", transposed=True)),
    ("L1-S200-gqa-bf16-boolpad-transposed", dict(L=1, S=200, H=4, Hk=2, dtype="bf16", mask="bool-pad",
                                                  transposed=True)),
    ("L4-S64-mqa-f16-float", dict(L=4, S=64, H=4, Hk=1, dtype="f16", mask="float")),
    ("L4-S64-mqa-f16-lower-right", dict(L=4, S=64, H=4, Hk=1, dtype="f16", causal="lower-right")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [c[1] for c in SDPA_CASES], ids=[c[0] for c in SDPA_CASES])
def test_sdpa_decode_route(backend, kw, monkeypatch):
    """Decode-shaped inference calls take fastattn::decode_fwd and equal the reference (tolerance policy),
    with the output laid out as the attention op lays out its own; with a gradient they take the attention op
    and agree within rounding."""
    _need(backend)
    from fastattn import functional
    from fastattn._ops import empty_output
    from torch.nn.attention.bias import causal_lower_right

    kw = dict(kw)
    causal = kw.pop("causal", None)
    q, k, v, m = _sdpa_problem(B=2, E=24, dtype=kw.pop("dtype", "f32"), mask=kw.pop("mask", None),
                               transposed=kw.pop("transposed", False), **kw)
    L, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    args = dict(attn_mask=m, is_causal=causal == "top-left", enable_gqa=gqa)
    mask_ref = m
    if causal == "lower-right":  # a CausalBias (no other mask): key j visible to row i iff j <= i + S - L
        args["attn_mask"] = causal_lower_right(L, S)
        mask_ref = torch.ones(L, S, dtype=torch.bool).tril(S - L)

    calls = []
    monkeypatch.setattr(functional, "decode_fwd", lambda *a: calls.append(a) or decode_op(*a))
    # The Python path (the CPU eager entry runs the same kernel from C++ with the same bits: tests/test_eager.py).
    from fastattn import _launchers
    monkeypatch.setattr(_launchers, "cpu_eager", lambda: None)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, **args, backend=backend, return_lse=True)
    assert len(calls) == 1
    assert out.stride() == empty_output(q, v, 0.0).stride() and out.dtype == q.dtype

    ref, ref_lse = fastattn.reference.scaled_dot_product_attention(
        q, k, v, mask_ref, 0.0, args["is_causal"], None, gqa, return_lse=True)
    lp = None
    if q.dtype != torch.float32:
        lp = fastattn.reference.scaled_dot_product_attention(q, k, v, mask_ref, 0.0, args["is_causal"], None, gqa,
                                                             upcast=False)
    assert_close("out", out, ref, lp)
    assert_close("lse", lse, ref_lse.float())

    # The attention op (taken when a gradient is needed) agrees to rounding.
    qg = q.detach().clone().requires_grad_()
    via_op = fastattn.scaled_dot_product_attention(qg, k, v, **args, backend=backend)
    assert len(calls) == 1
    assert_close("out (attention op)", via_op.detach(), ref, lp)


def test_sdpa_route_rule():
    """The rule: L <= 16 rows against S >= 4 L keys; dropout, a gradient, float64 or a long query block take
    the attention op."""
    from fastattn.functional import decode_shaped

    assert decode_shaped(1, 4) and decode_shaped(16, 64)
    assert not decode_shaped(17, 1000) and not decode_shaped(4, 15)


def test_cpu_entry_bumps_versions_and_respects_inference_tensors():
    """What torch's in-place write does besides writing, the public function does around the C++ entry too: the
    caches' version counters move as on the Python path, and caches made under inference mode cannot be appended to outside it."""
    _need("cpu")
    from fastattn import _launchers
    p = _problem(lens=(9, 3, 5), L_new=1, L=1)
    mine, python = _clone(p), _clone(p)
    before = [t._version for t in (mine["k_cache"], mine["v_cache"])]
    fastattn.attention_with_kvcache(**mine)
    with _Seen():
        fastattn.attention_with_kvcache(**python)
    assert [t._version - b for t, b in zip((mine["k_cache"], mine["v_cache"]), before)] == \
        [t._version - b for t, b in zip((python["k_cache"], python["v_cache"]), before)] == [1, 1]
    # No append, no write: versions unchanged on both paths.
    v0 = mine["k_cache"]._version
    fastattn.attention_with_kvcache(**{**mine, "k": None, "v": None})
    assert mine["k_cache"]._version == v0
    # Inference-mode caches: appended to inside inference mode, refused outside it as torch refuses.
    with torch.inference_mode():
        inf = _clone(p)
        want = fastattn.attention_with_kvcache(**_clone(inf))
        got = fastattn.attention_with_kvcache(**inf)
    assert torch.equal(got, want)
    assert _launchers.cpu_kvcache() is not None


@pytest.mark.skipif(os.environ.get("FASTATTN_SANITIZE", "0") == "1",
                    reason="with the ASan runtime preloaded into an uninstrumented python, a C++ exception thrown in "
                           "torch (autograd's refusal, index_put_'s) aborts the process (torch alone does it too)")
def test_cpu_entry_append_refuses_what_torch_refuses():
    """After an append through the C++ entry, autograd refuses a gradient through cache values saved before it,
    as after torch's own in-place write; caches made under inference mode cannot be appended to outside it."""
    _need("cpu")
    p = _problem(lens=(9, 3, 5), L_new=1, L=1)
    w = torch.ones((), requires_grad=True)
    y = (w * p["k_cache"]).nan_to_num().sum()
    with torch.no_grad():
        fastattn.attention_with_kvcache(**p)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    # Caches made under inference mode: refused outside it, as torch refuses, and nothing written.
    with torch.inference_mode():
        inf = _clone(p)
    before = [t.clone() for t in (inf["k_cache"], inf["v_cache"])]
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        fastattn.attention_with_kvcache(**inf)
    for t, b in zip((inf["k_cache"], inf["v_cache"]), before):
        assert torch.equal(t.nan_to_num(7.0), b.nan_to_num(7.0))


def test_call_cost_example_runs(monkeypatch, capsys):
    """examples/kvcache_call_cost.py (the README's per-call figures) runs and prints its three cases."""
    _need("cpu")
    import runpy
    import sys
    from pathlib import Path
    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))
    monkeypatch.setattr(sys, "argv", ["kvcache_call_cost.py", "--rounds", "1"])
    runpy.run_path(str(examples / "kvcache_call_cost.py"), run_name="__main__")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("B")]
    assert [ln.split(":")[0] for ln in lines] == ["B1 S64", "B1 S1024", "B8 S256"]
