"""fastattn.scaled_dot_product_attention against torch's own CPU SDPA, argument by argument.

torch's documented contract of ``torch.nn.functional.scaled_dot_product_attention`` (2.13), walked in order:
query / key / value dims (2-D to 5-D), their layouts and the output's, attn_mask kinds and broadcasting,
``torch.nn.attention.bias.CausalBias`` and the ``__torch_function__`` protocol, dropout_p, is_causal, scale,
enable_gqa, then the transforms (autograd, torch.compile, torch.export with dynamic shapes, torch.func.vmap)
and the errors. Values are checked against torch run in float64 (torch's semantics, exactly computed) under
the tolerance policy (fastattn/testing.py); layouts and types against torch's output on the same inputs.

Intended differences (also in the README): dropout draws fastattn's Philox bits, not torch's RNG; bad input
raises ValueError / TypeError naming the argument where torch raises RuntimeError; a CausalBias whose lengths
are not the query's and key's raises (torch ignores its lengths for upper-left).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right, causal_upper_left

import fastattn
from fastattn import reference
from fastattn.testing import assert_close

SDPA = F.scaled_dot_product_attention  # torch's own (the patch tests below restore it)


def torch64(q, k, v, attn_mask=None, **kw):
    """torch's SDPA on float64 copies: torch's semantics, computed (nearly) exactly."""
    m = attn_mask
    if m is not None and not isinstance(m, CausalBias) and m.dtype != torch.bool:
        m = m.double()
    return SDPA(q.detach().double(), k.detach().double(), v.detach().double(), attn_mask=m, **kw)


def check_against_torch(q, k, v, attn_mask=None, **kw):
    """fastattn's output equals torch's in value (policy), shape, dtype, type and memory layout."""
    got = fastattn.scaled_dot_product_attention(q, k, v, attn_mask, **kw)
    want = SDPA(q, k, v, attn_mask=attn_mask, **kw)
    assert type(got) is type(want) is torch.Tensor
    assert got.shape == want.shape and got.dtype == want.dtype
    assert got.stride() == want.stride(), f"layout: fastattn {got.stride()} torch {want.stride()}"
    ref_lp = None
    if q.dtype in (torch.float16, torch.bfloat16):
        offset = _causal_offset(attn_mask, q, k)
        m = None if isinstance(attn_mask, CausalBias) else attn_mask
        ref_lp = reference.scaled_dot_product_attention(
            q, k, v, m, 0.0, kw.get("is_causal", False) or offset is not None, kw.get("scale"),
            kw.get("enable_gqa", False), upcast=False, causal_offset=offset or 0)
    assert_close("out", got, torch64(q, k, v, attn_mask, **kw), ref_lp)
    return got


def _causal_offset(attn_mask, q, k):
    if not isinstance(attn_mask, CausalBias):
        return None
    lower = attn_mask.variant == torch.nn.attention.bias.CausalVariant.LOWER_RIGHT
    return k.shape[-2] - q.shape[-2] if lower else 0


def qkv(*lead, L=5, S=7, E=8, Ev=None, dtype=torch.float32, Hk=None):
    Ev = E if Ev is None else Ev
    klead = lead if Hk is None else (*lead[:-1], Hk)
    return (torch.randn(*lead, L, E, dtype=dtype), torch.randn(*klead, S, E, dtype=dtype),
            torch.randn(*klead, S, Ev, dtype=dtype))


# ------------------------------------------------------------------------------------ query, key, value dims
@pytest.mark.parametrize("lead", [(), (3,), (2, 3), (2, 2, 3)], ids=["2d", "3d", "4d", "5d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_dims(lead, dtype):
    check_against_torch(*qkv(*lead, dtype=dtype))
    check_against_torch(*qkv(*lead, dtype=dtype), is_causal=True)


def test_2d_with_mask_and_lse():
    q, k, v = qkv()
    m = torch.rand(5, 7) > 0.3
    check_against_torch(q, k, v, m)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, m, return_lse=True)
    assert out.shape == (5, 8) and lse.shape == (5,)
    ref = torch.logsumexp((q.double() @ k.double().T / math.sqrt(8)).masked_fill(~m, float("-inf")), -1)
    torch.testing.assert_close(lse.double(), ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- layouts
def _bshd(B, H, N, D):
    return torch.randn(B, N, H, D).transpose(1, 2)


LAYOUTS = {
    "contiguous": lambda: torch.randn(2, 3, 5, 8),
    "bshd": lambda: _bshd(2, 3, 5, 8),
    "sliced-bhsd": lambda: torch.randn(2, 3, 5, 16)[..., :8],
    "sliced-bshd": lambda: torch.randn(2, 5, 3, 16).transpose(1, 2)[..., :8],
    "lhbe": lambda: torch.randn(5, 3, 2, 8).permute(2, 1, 0, 3),
    "hble": lambda: torch.randn(3, 2, 5, 8).transpose(0, 1),
    "head-dim-strided": lambda: torch.randn(2, 3, 8, 5).transpose(2, 3),
    "expanded": lambda: torch.randn(1, 1, 5, 8).expand(2, 3, 5, 8),
    "L1-bshd": lambda: _bshd(2, 3, 1, 8),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_output_layout_follows_torch(layout):
    q = LAYOUTS[layout]()
    k, v = _bshd(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    out = check_against_torch(q, k, v)
    want = SDPA(q, k, v)
    assert torch.empty_like(out).stride() == torch.empty_like(want).stride()
    if want.is_contiguous() or want.transpose(1, 2).is_contiguous():
        # What a model does next: merge heads without a copy where torch can.
        assert out.transpose(1, 2).reshape(2, 5 if q.shape[2] == 5 else 1, -1).shape[-1] == 24
    if want.is_contiguous():
        out.view(2, -1)  # raises for a non-contiguous output


@pytest.mark.parametrize("case", ["Ev-differs", "dropout", "3d-transposed", "5d-transposed", "requires-grad"])
def test_output_layout_other_paths(case):
    """Where torch runs its math path (Ev != E, dropout, 3-D / 5-D inputs) its output is contiguous."""
    torch.manual_seed(0)
    kw = {}
    if case == "Ev-differs":
        q, k, v = _bshd(2, 3, 5, 8), _bshd(2, 3, 7, 8), _bshd(2, 3, 7, 4)
    elif case == "dropout":
        q, k, v = _bshd(2, 3, 5, 8), _bshd(2, 3, 7, 8), _bshd(2, 3, 7, 8)
        kw = dict(dropout_p=0.3)
    elif case == "3d-transposed":
        q, k, v = torch.randn(5, 3, 8).transpose(0, 1), torch.randn(3, 7, 8), torch.randn(3, 7, 8)
    elif case == "5d-transposed":
        q, k, v = torch.randn(2, 2, 5, 3, 8).transpose(2, 3), torch.randn(2, 2, 3, 7, 8), torch.randn(2, 2, 3, 7, 8)
    else:
        q, k, v = _bshd(2, 3, 5, 8).requires_grad_(), _bshd(2, 3, 7, 8), _bshd(2, 3, 7, 8)
    got = fastattn.scaled_dot_product_attention(q, k, v, **kw)
    want = SDPA(q, k, v, **kw)
    assert got.shape == want.shape and got.stride() == want.stride()


# --------------------------------------------------------------------------------------------- attn_mask
MASK_SHAPES = {
    "LS": (5, 7), "1LS": (1, 5, 7), "HLS": (3, 5, 7), "11LS": (1, 1, 5, 7), "B11S": (2, 1, 1, 7),
    "B1LS": (2, 1, 5, 7), "BHLS": (2, 3, 5, 7), "1H1S": (1, 3, 1, 7),
}


@pytest.mark.parametrize("kind", ["bool", "float32", "query-dtype"])
@pytest.mark.parametrize("shape", list(MASK_SHAPES))
def test_mask_broadcasting(shape, kind):
    q, k, v = qkv(2, 3, dtype=torch.float64 if kind == "query-dtype" else torch.float32)
    s = MASK_SHAPES[shape]
    if kind == "bool":
        m = torch.rand(s) > 0.3
    else:
        m = torch.randn(s, dtype=q.dtype if kind == "query-dtype" else torch.float32)
    check_against_torch(q, k, v, m)


@pytest.mark.parametrize("shape", [(1, 2, 1, 5, 7), (2, 1, 3, 1, 7), (2, 2, 3, 5, 7), (3, 5, 7)],
                         ids=["1B1LS", "N1H1S", "full", "HLS"])
def test_mask_broadcasting_5d(shape):
    q, k, v = qkv(2, 2, 3)
    check_against_torch(q, k, v, torch.rand(shape) > 0.2)


def test_mask_non_contiguous_and_stride0():
    q, k, v = qkv(2, 3)
    m = (torch.rand(2, 7, 3, 5) > 0.3).permute(0, 2, 3, 1)  # (B, H, L, S) read through odd strides
    check_against_torch(q, k, v, m)
    check_against_torch(q, k, v, torch.randn(1, 1, 1, 7).expand(2, 3, 5, 7))


def test_mask_with_is_causal_applies_both():
    q, k, v = qkv(2, 3)
    m = torch.rand(2, 1, 5, 7) > 0.3
    check_against_torch(q, k, v, m, is_causal=True)


def test_fully_masked_rows_are_zero_as_torch():
    q, k, v = qkv(2, 3)
    m = torch.rand(2, 3, 5, 7) > 0.3
    m[:, :, 1] = False
    got = check_against_torch(q, k, v, m)
    assert torch.equal(got[:, :, 1], torch.zeros_like(got[:, :, 1]))


# --------------------------------------------------------------------------------- CausalBias, subclasses
CAUSAL_LS = [(5, 7), (7, 7), (7, 5), (1, 9), (9, 1)]


@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize("L,S", CAUSAL_LS, ids=[f"L{a}-S{b}" for a, b in CAUSAL_LS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_causal_bias(variant, L, S, dtype):
    bias = (causal_upper_left if variant == "upper_left" else causal_lower_right)(L, S)
    q, k, v = qkv(2, 3, L=L, S=S, dtype=dtype)
    got = check_against_torch(q, k, v, bias)
    if variant == "lower_right" and L > S:  # rows i < L - S see no key: zeros, as torch gives on the CPU
        assert torch.equal(got[:, :, : L - S], torch.zeros_like(got[:, :, : L - S]))


@pytest.mark.parametrize("L,S", [(5, 7), (7, 5)], ids=["L5-S7", "L7-S5"])
def test_causal_bias_backward(L, S):
    q, k, v = (t.requires_grad_() for t in qkv(2, 3, L=L, S=S))
    dout = torch.randn(2, 3, L, 8)
    fastattn.scaled_dot_product_attention(q, k, v, causal_lower_right(L, S)).backward(dout)
    got = [t.grad for t in (q, k, v)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    SDPA(q64, k64, v64, attn_mask=causal_lower_right(L, S)).backward(dout.double())
    for name, g, r in zip("qkv", got, (q64.grad, k64.grad, v64.grad)):
        assert_close(f"d{name}", g, r, backward=True)


def test_causal_bias_errors():
    q, k, v = qkv(2, 3)
    with pytest.raises(ValueError, match="is_causal=False"):
        fastattn.scaled_dot_product_attention(q, k, v, causal_lower_right(5, 7), is_causal=True)
    with pytest.raises(ValueError, match=r"CausalBias for \(L, S\) = \(5, 6\)"):
        fastattn.scaled_dot_product_attention(q, k, v, causal_lower_right(5, 6))


def test_causal_bias_under_patch():
    q, k, v = qkv(2, 3, L=3, S=9)
    want = torch64(q, k, v, causal_lower_right(3, 9))
    with fastattn.patch() as p:
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(3, 9))
        got_ul = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(3, 9))
    assert p.calls == 2 and p.fallbacks == 0
    assert type(got) is torch.Tensor
    assert_close("out", got, want)
    assert_close("out", got_ul, torch64(q, k, v, is_causal=True))


class Recording(torch.Tensor):
    """A tensor subclass whose __torch_function__ records every function it is offered."""
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("where", ["query", "attn_mask"])
def test_torch_function_protocol(where):
    """A subclass argument is offered the call first, and the result comes back as torch's would."""
    q, k, v = qkv(2, 3)
    m = torch.rand(2, 1, 5, 7) > 0.2
    args = dict(query=q, key=k, value=v, attn_mask=m)
    args[where] = args[where].as_subclass(Recording)
    Recording.seen = []
    got = fastattn.scaled_dot_product_attention(**args)
    assert fastattn.scaled_dot_product_attention in Recording.seen
    want = SDPA(**args)
    assert type(got) is type(want)
    assert_close("out", got.as_subclass(torch.Tensor), torch64(q, k, v, m))
    Recording.seen = []
    with fastattn.patch():
        F.scaled_dot_product_attention(**args)
        assert F.scaled_dot_product_attention in Recording.seen  # the patched function, as torch offers its own


# ------------------------------------------------------------------------------ dropout_p, scale, enable_gqa
def test_scale_and_gqa():
    check_against_torch(*qkv(2, 6, Hk=2), scale=0.3, enable_gqa=True)
    check_against_torch(*qkv(2, 6, Hk=1), enable_gqa=True, is_causal=True)


def test_dropout_reproducible_and_unbiased():
    """Dropout bits are fastattn's (Philox keyed by a seed from torch's generator), not torch's: the same
    torch.manual_seed gives the same output, and the mean over many draws approaches the dropout-free output."""
    q, k, v = qkv(1, 2, L=4, S=6)
    torch.manual_seed(3)
    a = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    b = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b)
    mean = torch.stack([fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5) for _ in range(400)]).mean(0)
    assert (mean - SDPA(q, k, v)).abs().max() < 0.25


# ------------------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("case", ["float-mask", "causal", "bshd-gqa"])
def test_autograd_matches_torch(case):
    """Gradients of q, k, v (and of a float mask) equal torch's. (torch's autograd path refuses a mask together
    with is_causal=True; fastattn's applies both, tests/test_sdpa.py checks that against the reference.)"""
    if case == "bshd-gqa":
        q, k, v = _bshd(2, 6, 5, 8), _bshd(2, 2, 7, 8), _bshd(2, 2, 7, 8)
    else:
        q, k, v = qkv(2, 3)
    m = torch.randn(1, 3, 5, 7) if case == "float-mask" else None
    kw = dict(is_causal=case == "causal", enable_gqa=case == "bshd-gqa")
    leaves = [t.requires_grad_() for t in (q, k, v, m) if t is not None]
    dout = torch.randn(2, q.shape[1], 5, 8)
    fastattn.scaled_dot_product_attention(q, k, v, m, **kw).backward(dout)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    SDPA(*leaves64[:3], attn_mask=leaves64[3] if m is not None else None, **kw).backward(dout.double())
    for name, t, r in zip(("q", "k", "v", "mask"), leaves, leaves64):
        assert_close(f"d{name}", t.grad, r.grad, backward=True)


def test_compile_fullgraph():
    q, k, v = qkv(2, 3)
    m = torch.rand(2, 1, 1, 7) > 0.2

    def f(q, k, v, m):
        return fastattn.scaled_dot_product_attention(q, k, v, m) + fastattn.scaled_dot_product_attention(
            q[0], k[0], v[0], is_causal=True)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, m)
    assert_close("out", got, torch64(q, k, v, m) + torch64(q[0], k[0], v[0], is_causal=True))


class PaddedAttention(torch.nn.Module):
    def forward(self, q, k, v, pad):  # pad: (B, S) bool, True = real token
        return fastattn.scaled_dot_product_attention(q, k, v, pad[:, None, None, :])


def test_export_dynamic_batch_and_length():
    B, L, S = (torch.export.Dim(n, min=m, max=512) for n, m in (("B", 1), ("L", 2), ("S", 2)))
    q, k, v = qkv(2, 3, L=4, S=6)
    pad = torch.ones(2, 6, dtype=torch.bool)
    ep = torch.export.export(PaddedAttention(), (q, k, v, pad),
                             dynamic_shapes=({0: B, 2: L}, {0: B, 2: S}, {0: B, 2: S}, {0: B, 1: S}))
    for b, l, s in ((5, 3, 9), (1, 17, 33), (2, 4, 6)):
        q, k, v = qkv(b, 3, L=l, S=s)
        pad = torch.arange(s)[None, :] < torch.randint(1, s + 1, (b, 1))
        got = ep.module()(q, k, v, pad)
        assert_close("out", got, torch64(q, k, v, pad[:, None, None, :]))


def test_vmap():
    q, k, v = qkv(4, 2, 3)
    m = torch.rand(2, 1, 5, 7) > 0.2
    got = torch.func.vmap(lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, m))(q, k, v)
    want = torch.func.vmap(lambda q, k, v: SDPA(q.double(), k.double(), v.double(), attn_mask=m))(q, k, v)
    assert_close("out", got, want)
    # an unbatched key/value, a batched mask
    mb = torch.rand(4, 2, 1, 5, 7) > 0.2
    got = torch.func.vmap(lambda q, m: fastattn.scaled_dot_product_attention(q, k[0], v[0], m))(q, mb)
    want = torch.stack([torch64(q[i], k[0], v[0], mb[i]) for i in range(4)])
    assert_close("out", got, want)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("case", [
    ("1-D query", lambda q, k, v: (q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]), {}, ValueError, "query must have at least 2"),
    ("dtype mismatch", lambda q, k, v: (q, k.double(), v), {}, TypeError, "key dtype"),
    ("head dim mismatch", lambda q, k, v: (q, k[..., :4], v), {}, ValueError, "key head dim 4"),

    ("heads without gqa", lambda q, k, v: (q, k[:, :2], v[:, :2]), {}, ValueError, "enable_gqa=True"),
    ("batch dims", lambda q, k, v: (q, k[:1].expand(3, 3, 7, 8), v[:1].expand(3, 3, 7, 8)), {}, ValueError,
     "do not broadcast"),
    ("mask shape", lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(5, 6, dtype=torch.bool)}, ValueError,
     "does not broadcast"),
    ("mask dtype", lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(5, 7, dtype=torch.int64)}, TypeError,
     "attn_mask must be bool"),
    ("dropout range", lambda q, k, v: (q, k, v), {"dropout_p": 1.5}, ValueError, "dropout_p must be in"),
    ("is_causal type", lambda q, k, v: (q, k, v), {"is_causal": 1}, TypeError, "is_causal must be a bool"),
    ("not a tensor", lambda q, k, v: ([1.0], k, v), {}, TypeError, "query must be a torch.Tensor"),
], ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_errors_name_the_argument(case):
    """Where torch raises (a RuntimeError or IndexError), fastattn raises ValueError / TypeError naming the argument."""
    _, make, kw, exc, msg = case
    q, k, v = qkv(2, 3)
    args = make(q, k, v)
    with pytest.raises(exc, match=msg):
        fastattn.scaled_dot_product_attention(*args, **kw)
    if isinstance(args[0], torch.Tensor):
        with pytest.raises(Exception):
            SDPA(*args, **kw)  # torch rejects it too


def test_errors_where_torch_does_not_raise():
    """Deliberate differences: torch 2.13's CPU SDPA runs a key and a value of different lengths (reading past
    the shorter one) and a NaN scale (returning NaN); fastattn raises."""
    q, k, v = qkv(2, 3)
    with pytest.raises(ValueError, match="key length 7 does not match value length 3"):
        fastattn.scaled_dot_product_attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="scale must be finite"):
        fastattn.scaled_dot_product_attention(q, k, v, scale=float("nan"))


def test_inputs_never_modified():
    q, k, v = qkv(2, 3)
    m = torch.randn(2, 1, 5, 7)
    before = [t.clone() for t in (q, k, v, m)]
    fastattn.scaled_dot_product_attention(q, k, v, m, is_causal=True)
    fastattn.scaled_dot_product_attention(q, k, v, causal_lower_right(5, 7))
    for a, b in zip(before, (q, k, v, m)):
        assert torch.equal(a, b)
