"""The decoder variants (sliding window, soft-capping, ALiBi, attention sinks) through the public
``fastattn.scaled_dot_product_attention``, on every backend: forward, lse and gradients (the sinks' included)
against the float64 reference, each route (main kernels, decode kernels), and the argument checks.

The kernels' own sweeps are tests/test_variants_cpu.py (every C++ instruction-set module) and
tests/test_variants_triton.py (the Triton kernels under the interpreter)."""
from __future__ import annotations

import pytest
import torch
from conftest import make_qkv, padding_mask

import fastattn
from fastattn import reference
from fastattn.testing import assert_close

BACKENDS = ["cpu", "triton"]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

# (name, keywords): each variant alone and all together; sinks / slopes are filled in per call (H heads).
VARIANTS = [
    ("window", dict(window=(5, 2))),
    ("window-causal", dict(window=(4, 0), is_causal=True)),
    ("softcap", dict(softcap=1.5)),
    ("alibi", dict(alibi="h")),
    ("alibi-bh-lower-right", dict(alibi="bh", lower_right=True)),
    ("sinks", dict(sinks=True)),
    ("all-lower-right-causal", dict(window=(6, 0), softcap=2.0, alibi="h", sinks=True, is_causal=True,
                                    lower_right=True)),
    ("all-mask", dict(window=(3, 3), softcap=2.0, alibi="bh", sinks=True, mask=True)),
]


def _call_kwargs(spec: dict, B: int, H: int, S: int, gen: torch.Generator) -> dict:
    kw = {k: v for k, v in spec.items() if k not in ("alibi", "sinks", "mask")}
    if spec.get("alibi") == "h":
        kw["alibi_slopes"] = torch.rand(H, generator=gen) * 0.3
    elif spec.get("alibi") == "bh":
        kw["alibi_slopes"] = torch.rand(B, H, generator=gen) * 0.3
    if spec.get("sinks"):
        kw["sinks"] = torch.randn(H, generator=gen)
    if spec.get("mask"):
        kw["attn_mask"] = padding_mask([S, S - 7], S)
    return kw


def _reference(q, k, v, kw, upcast: bool):
    """The float64 (``upcast``) or same-precision reference of the public call with keywords ``kw``."""
    kw = dict(kw)
    S, L = k.shape[-2], q.shape[-2]
    offset = S - L if kw.pop("lower_right", False) else 0
    window = kw.pop("window", None) or (-1, -1)
    return reference.scaled_dot_product_attention(
        q, k, v, kw.pop("attn_mask", None), is_causal=kw.pop("is_causal", False), enable_gqa=True, upcast=upcast,
        return_lse=True, causal_offset=offset, window=window, softcap=kw.pop("softcap", 0.0),
        sinks=kw.pop("sinks", None), alibi_slopes=kw.pop("alibi_slopes", None))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("name,spec", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_forward_and_gradients_match_reference(backend, dt, name, spec):
    """B2 H4/Hk2 L13 S21 E16: out, lse and dq / dk / dv / d sinks against the float64 reference."""
    gen = torch.Generator().manual_seed(7)
    dtype = DTYPES[dt]
    B, H, Hk, L, S, E = 2, 4, 2, 13, 21, 16
    q, k, v = make_qkv(B, H, Hk, L, S, E, E, dtype, gen=gen, requires_grad=True)
    kw = _call_kwargs(spec, B, H, S, gen)
    if "sinks" in kw:
        kw["sinks"].requires_grad_(True)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend=backend, return_lse=True,
                                                     **kw)
    ins = [q, k, v] + ([kw["sinks"]] if "sinks" in kw else [])
    dout = torch.randn(out.shape, generator=gen).to(dtype)
    grads = torch.autograd.grad(out, ins, dout)

    def ref(upcast):
        leaves = [t.detach().clone().requires_grad_(True) for t in ins]
        rkw = dict(kw)
        if "sinks" in kw:
            rkw["sinks"] = leaves[3]
        o, l = _reference(*leaves[:3], rkw, upcast)
        g = torch.autograd.grad(o, leaves, dout.to(o.dtype))
        return o, l, g

    o64, l64, g64 = ref(True)
    olp, _, glp = ref(False) if dtype != torch.float32 else (None, None, [None] * len(ins))
    tag = f"{backend}-{dt}-{name}"
    assert_close(f"{tag} out", out, o64, olp)
    torch.testing.assert_close(lse, l64, atol=2e-3 if dtype != torch.float32 else 1e-5, rtol=0)
    for n, got, r64, rlp in zip(("dq", "dk", "dv", "dsinks"), grads, g64, glp):
        if n == "dsinks":  # a sum over every row: float32 accumulation, compared in float32
            torch.testing.assert_close(got.double(), r64.double(), atol=5e-2 if dtype != torch.float32 else 1e-4, rtol=1e-2)
        else:
            assert_close(f"{tag} {n}", got, r64, rlp, backward=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,spec", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_decode_route_matches_main_kernels(backend, name, spec):
    """A decode-shaped inference call (L 2 against S 37) takes the decode kernels; under autograd the same call
    takes the main kernels: both give the reference's numbers."""
    gen = torch.Generator().manual_seed(3)
    B, H, Hk, L, S, E = 2, 4, 2, 2, 37, 16
    q, k, v = make_qkv(B, H, Hk, L, S, E, E, gen=gen)
    kw = _call_kwargs(spec, B, H, S, gen)
    with torch.no_grad():
        dec, dlse = fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend=backend,
                                                          return_lse=True, **kw)
    main, mlse = fastattn.scaled_dot_product_attention(q.requires_grad_(), k, v, enable_gqa=True, backend=backend,
                                                       return_lse=True, **kw)
    o64, l64 = _reference(q.detach(), k, v, kw, True)
    assert_close(f"decode {name}", dec, o64)
    assert_close(f"main {name}", main.detach(), o64)
    torch.testing.assert_close(dlse, l64, atol=1e-5, rtol=0)
    torch.testing.assert_close(mlse, l64, atol=1e-5, rtol=0)


def test_decode_route_taken_for_variants(monkeypatch):
    """Inference with a window / sinks / softcap at decode shapes runs the decode op, not the attention op."""
    import fastattn.functional as F
    calls = []
    real = F.decode_fwd
    monkeypatch.setattr(F, "decode_fwd", lambda *a: calls.append(1) or real(*a))
    q, k, v = make_qkv(1, 4, 2, 1, 40, 16, 16)
    fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, window=(7, 0), is_causal=True,
                                          lower_right=True, softcap=3.0, sinks=torch.zeros(4))
    assert calls == [1]


def test_window_top_left_without_causal_takes_main_kernels():
    """A top-left window without the causal flag places row i at i; at decode shapes it must not take the
    decode kernel (which places it at S - L + i): the numbers say which alignment ran."""
    q, k, v = make_qkv(1, 2, 2, 2, 40, 16, 16)
    out = fastattn.scaled_dot_product_attention(q, k, v, window=(0, 3))
    ref, _ = _reference(q, k, v, dict(window=(0, 3)), True)
    assert_close("top-left window", out, ref)


def test_causal_bias_lower_right_aligns_variants():
    """A lower-right CausalBias is lower_right=True for the window and ALiBi too."""
    from torch.nn.attention.bias import causal_lower_right
    q, k, v = make_qkv(1, 2, 2, 5, 11, 8, 8)
    slopes = torch.tensor([0.5, 0.25])
    a = fastattn.scaled_dot_product_attention(q, k, v, causal_lower_right(5, 11), window=(3, 0),
                                              alibi_slopes=slopes)
    b = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, lower_right=True, window=(3, 0),
                                              alibi_slopes=slopes)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_sinks_rows_with_no_key():
    """A row whose keys the window hides: out 0, lse = the sink, gradients finite (zero)."""
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, 8, requires_grad=True)
    sinks = torch.tensor([0.5, -1.0], requires_grad=True)
    # Lower-right with L = S and window (-1 .. ) right bound -3 is not allowed; hide rows with a bool mask.
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 1, :] = False
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, mask, sinks=sinks, return_lse=True)
    assert torch.equal(out[0, :, 1], torch.zeros(2, 8))
    torch.testing.assert_close(lse[0, :, 1], sinks.detach())
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, sinks))


def test_inputs_unchanged():
    q, k, v = make_qkv(2, 4, 2, 6, 9, 8, 8)
    sinks, slopes = torch.randn(4), torch.rand(2, 4)
    saved = [t.clone() for t in (q, k, v, sinks, slopes)]
    fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, window=(2, 1), softcap=1.0, sinks=sinks,
                                          alibi_slopes=slopes)
    assert all(torch.equal(a, b) for a, b in zip(saved, (q, k, v, sinks, slopes)))


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(window=(2,)), ValueError, "window must be"),
    (dict(window=(-2, 0)), ValueError, "window must be"),
    (dict(window=(1.5, 0)), ValueError, "window must be"),
    (dict(softcap=-1.0), ValueError, "softcap must be"),
    (dict(softcap=float("inf")), ValueError, "softcap must be"),
    (dict(softcap=True), ValueError, "softcap must be"),
    (dict(sinks=torch.zeros(3)), ValueError, "sinks must have shape"),
    (dict(sinks=torch.zeros(4, dtype=torch.int64)), TypeError, "sinks must be a floating"),
    (dict(sinks=[0.0] * 4), TypeError, "sinks must be a floating"),
    (dict(alibi_slopes=torch.zeros(3, 4)), ValueError, "alibi_slopes must have shape"),
    (dict(alibi_slopes=torch.zeros(4, requires_grad=True)), ValueError, "alibi_slopes carry no gradient"),
    (dict(lower_right=1), TypeError, "lower_right must be a bool"),
], ids=lambda x: str(x)[:40] if not isinstance(x, (dict, type)) else None)
def test_bad_variant_arguments(kw, exc, msg):
    q, k, v = make_qkv(2, 4, 4, 6, 9, 8, 8)
    with pytest.raises(exc, match=msg):
        fastattn.scaled_dot_product_attention(q, k, v, **kw)


def test_opcheck_with_variants():
    """The op's schema, fake and autograd registrations with every variant on (torch.library.opcheck)."""
    from fastattn._ops.attention import attention_fwd
    q, k, v = make_qkv(2, 4, 2, 5, 7, 8, 8, requires_grad=True)
    q4, k4, v4 = q, k.repeat_interleave(2, 1).detach().requires_grad_(), v.repeat_interleave(2, 1).detach()
    seed = torch.zeros((), dtype=torch.int64)
    args = (q4, k4, v4, None, 0.3, True, True, 0.0, seed, "cpu", False, 3, 0, 2.0, torch.rand(2, 4),
            torch.randn(4, requires_grad=True))
    torch.library.opcheck(attention_fwd, args, test_utils=("test_schema", "test_faketensor",
                                                           "test_autograd_registration"))


def test_vmap_with_variants():
    """torch.func.vmap over calls with per-call ALiBi slopes and a shared sink vector: each mapped call as if
    run alone."""
    q, k, v = (torch.randn(3, 2, 4, 6, 8) for _ in range(3))
    slopes = torch.rand(3, 2, 4) * 0.3
    sinks = torch.randn(4)

    def f(q, k, v, a):
        return fastattn.scaled_dot_product_attention(q, k, v, window=(2, 1), alibi_slopes=a, sinks=sinks)

    got = torch.func.vmap(f)(q, k, v, slopes)
    want = torch.stack([f(q[n], k[n], v[n], slopes[n]) for n in range(3)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_lower_right_decoder_step_is_a_plain_call(eager_took):
    """lower_right=True with is_causal and one query row (a decoder step: the row sees every key), or without
    is_causal, reads no alignment: the call is a plain one and the C++ eager route takes it, with the numbers
    of lower-right causal attention."""
    q, k, v = make_qkv(2, 4, 2, 1, 40, 16, 16)
    mask = padding_mask([40, 31], 40)
    a = fastattn.scaled_dot_product_attention(q, k, v, mask, is_causal=True, lower_right=True, enable_gqa=True)
    b = fastattn.scaled_dot_product_attention(q, k, v, mask, lower_right=True, enable_gqa=True)
    assert eager_took == [True, True]
    ref, _ = _reference(q, k, v, dict(attn_mask=mask, is_causal=True, lower_right=True), True)
    assert_close("decoder step", a, ref)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
