"""The C++ eager entry (csrc/eager.cpp): fastattn.scaled_dot_product_attention's plain CPU inference calls
run from C++ without the Python path. It must give bit-identical results to the path it replaces (the same
kernel, through fastattn._cpu.attention_fwd), and decline (None) every call it does not fully understand, so
that the Python path and its errors take those."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from fastattn import _cpu, _launchers
from conftest import DTYPE_IDS, make_qkv, padding_mask

ALL = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _eager(q, k, v, mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, backend=None,
           return_lse=False):
    return _launchers.cpu_eager()(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, backend, return_lse)


def _qkv(B=2, H=4, Hk=4, L=19, S=23, E=40, Ev=24, dtype=torch.float32, bshd=False):
    """Drawn in the (B, N, H, D) layout either way (the same values); made contiguous unless ``bshd``."""
    qkv = make_qkv(B, H, Hk, L, S, E, Ev, dtype, bshd=True)
    return qkv if bshd else tuple(x.contiguous() for x in qkv)


def _launcher(q, k, v, mask, is_causal, scale, enable_gqa):
    """The same call through the Python path's launcher (GQA and mask broadcast done the Python way)."""
    from fastattn._normalise import mask_to_4d
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    m4 = None if mask is None else mask_to_4d(mask, tuple(q.shape[:2]))
    return _cpu.attention_fwd(q, k, v, m4, scale=scale, is_causal=is_causal, dropout_p=0.0, seed=0)


MASKS = {
    "none": lambda B, H, L, S, dt: None,
    "bool-pad": lambda B, H, L, S, dt: (torch.arange(S) < torch.tensor([S, S // 3]).view(2, 1)).view(B, 1, 1, S),
    "bool-LS": lambda B, H, L, S, dt: torch.rand(L, S) > 0.4,
    "float-full": lambda B, H, L, S, dt: torch.randn(B, H, L, S).to(dt),
    "float-1HLS": lambda B, H, L, S, dt: torch.randn(1, H, L, S).to(dt),
    "float-3d": lambda B, H, L, S, dt: torch.randn(H, 1, S).to(dt),
    "f32-mask": lambda B, H, L, S, dt: torch.randn(B, 1, L, S),
    "float-inf": lambda B, H, L, S, dt: torch.randn(B, 1, L, S).masked_fill(torch.rand(B, 1, L, S) > 0.5,
                                                                           float("-inf")).to(dt),
}


@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("dtype", ALL, ids=DTYPE_IDS.get)
def test_same_bits_as_python_path(dtype, mask_kind):
    q, k, v = _qkv(dtype=dtype, bshd=True)
    mask = MASKS[mask_kind](2, 4, 19, 23, dtype)
    for is_causal, scale in [(False, None), (True, 0.3)]:
        out = _eager(q, k, v, mask, is_causal=is_causal, scale=scale)
        assert out is not None, "the eager entry declined a plain call"
        want, _ = _launcher(q, k, v, mask, is_causal, scale, False)
        assert out.dtype == dtype and out.shape == want.shape and out.stride() == want.stride()
        assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", ALL, ids=DTYPE_IDS.get)
def test_return_lse_gqa_and_backend_cpu(dtype):
    q, k, v = _qkv(H=6, Hk=2, dtype=dtype)
    mask = MASKS["float-inf"](2, 6, 19, 23, dtype)
    mask[0, 0, 4] = float("-inf")  # a row that sees no key: out 0, lse -inf
    res = _eager(q, k, v, mask, is_causal=True, enable_gqa=True, backend="cpu", return_lse=True)
    assert isinstance(res, tuple) and len(res) == 2
    out, lse = res
    want, want_lse = _launcher(q, k, v, mask, True, None, True)
    assert torch.equal(out, want)
    assert lse.dtype == torch.float32 and lse.shape == (2, 6, 19) and lse.is_contiguous()
    assert torch.equal(lse, want_lse)
    assert torch.isneginf(lse[0, :3, 4]).all() and (out[0, :3, 4] == 0).all()
    # and through the public function (which takes the eager entry for this call)
    out2, lse2 = fastattn.scaled_dot_product_attention(q, k, v, mask, is_causal=True, enable_gqa=True,
                                                       return_lse=True)
    assert torch.equal(out2, want) and torch.equal(lse2, want_lse)


def test_public_function_takes_it(eager_took):
    q, k, v = _qkv()
    fastattn.scaled_dot_product_attention(q, k, v)
    fastattn.scaled_dot_product_attention(q, k, v, backend="cpu", is_causal=True)
    with torch.inference_mode():
        fastattn.scaled_dot_product_attention(q, k, v)
    fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.1)  # declined: dropout draws a seed in Python
    assert eager_took == [True, True, True, False]


class _Sub(torch.Tensor):
    pass


class _Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_declines_what_it_does_not_take():
    q, k, v = _qkv()
    declined = {
        "requires_grad": lambda: _eager(q.clone().requires_grad_(), k, v),
        "mask requires_grad": lambda: _eager(q, k, v, torch.zeros(19, 23).requires_grad_()),
        "subclass": lambda: _eager(q.as_subclass(_Sub), k, v),
        "meta": lambda: _eager(q.to("meta"), k.to("meta"), v.to("meta")),
        "dropout": lambda: _eager(q, k, v, dropout_p=0.1),
        "int dropout": lambda: _eager(q, k, v, dropout_p=0),
        "3-D": lambda: _eager(q[0], k[0], v[0]),
        "5-D": lambda: _eager(q[None], k[None], v[None]),
        "empty L": lambda: _eager(q[:, :, :0], k, v),
        "empty S": lambda: _eager(q, k[:, :, :0], v[:, :, :0]),
        "int is_causal": lambda: _eager(q, k, v, is_causal=1),
        "int scale": lambda: _eager(q, k, v, scale=1),
        "inf scale": lambda: _eager(q, k, v, scale=float("inf")),
        "reference backend": lambda: _eager(q, k, v, backend="reference"),
        "dtype mismatch": lambda: _eager(q, k.double(), v),
        "int tensors": lambda: _eager(q.int(), k.int(), v.int()),
        "bool tensors": lambda: _eager(q > 0, k > 0, v > 0),
        "head dim": lambda: _eager(q, k[..., :8], v),
        "heads": lambda: _eager(q, k[:, :2], v[:, :2]),
        "gqa not divisible": lambda: _eager(q, k[:, :3], v[:, :3], enable_gqa=True),
        "batch": lambda: _eager(q, k[:1], v[:1]),
        "kv length": lambda: _eager(q, k, v[:, :, :5]),
        "mask shape": lambda: _eager(q, k, v, torch.ones(3, 19, 23, dtype=torch.bool)),
        "mask dims": lambda: _eager(q, k, v, torch.ones(1, 1, 1, 19, 23, dtype=torch.bool)),
        "mask dtype": lambda: _eager(q, k, v, torch.ones(19, 23, dtype=torch.float16)),
        "mask not a tensor": lambda: _eager(q, k, v, [[True]]),
        "not a tensor": lambda: _eager(q.numpy(), k, v),
    }
    for name, call in declined.items():
        assert call() is None, name
    with _Mode():
        assert _eager(q, k, v) is None
    # grad mode on but nothing requires grad: taken; a mask that requires grad under no_grad: taken
    assert _eager(q, k, v) is not None
    with torch.no_grad():
        assert _eager(q.clone().requires_grad_(), k, v, torch.zeros(19, 23).requires_grad_()) is not None


def test_inputs_not_modified_and_fresh_output():
    q, k, v = _qkv(dtype=torch.bfloat16)
    mask = MASKS["float-inf"](2, 4, 19, 23, torch.bfloat16)
    before = [t.clone() for t in (q, k, v, mask)]
    a = _eager(q, k, v, mask)
    b = _eager(q, k, v, mask)
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)
    for t, t0 in zip((q, k, v, mask), before):
        assert torch.equal(t, t0)


# ------------------------------------------------------------------------------------------ decode shapes
def _python_route(monkeypatch, *args, **kw):
    """fastattn.scaled_dot_product_attention with the eager entry switched off: the Python path, whose decode
    route runs the op fastattn::decode_fwd."""
    with monkeypatch.context() as m:
        m.setattr(_launchers, "cpu_eager", lambda: None)
        return fastattn.scaled_dot_product_attention(*args, **kw)


DECODE_SHAPES = {  # (B, H, Hk, L, S, E, Ev)
    "L1-gqa4": (2, 8, 2, 1, 77, 40, 24),
    "L3-mha-odd": (2, 3, 3, 3, 37, 17, 33),
    "L16-S64": (1, 4, 2, 16, 64, 64, 64),
    "L1-split": (1, 4, 2, 1, 2100, 32, 32),  # B * Hk items < 4 threads each: the keys are split (and merged)
}


@pytest.mark.parametrize("mask_kind", ["none", "bool-pad", "float-full", "float-inf"])
@pytest.mark.parametrize("shape", list(DECODE_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_decode_shaped_same_bits_as_decode_route(monkeypatch, eager_took, dtype, shape, mask_kind):
    """A decode-shaped call (L <= 16, S >= 4 L) runs the decode kernel from C++ with the launcher's views, scale,
    threads and key splits: the same bits as the Python path's decode route (the op fastattn::decode_fwd),
    output strides and lse included, with or without a mask, causal (top-left: the first L keys) or not, for
    (B, N, H, D)-strided views."""
    B, H, Hk, L, S, E, Ev = DECODE_SHAPES[shape]
    q, k, v = make_qkv(B, H, Hk, L, S, E, Ev, dtype, bshd=True)
    mask = (padding_mask([S // 3, S][:B], S) if mask_kind == "bool-pad"  # B = 1: a short sequence
            else MASKS[mask_kind](B, H, L, S, dtype))
    for is_causal, scale in [(False, None), (True, 0.3)]:
        out, lse = fastattn.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, scale=scale,
                                                         enable_gqa=Hk != H, return_lse=True)
        assert eager_took[-1] is True, "the eager entry declined a plain decode-shaped call"
        want, want_lse = _python_route(monkeypatch, q, k, v, mask, is_causal=is_causal, scale=scale,
                                       enable_gqa=Hk != H, return_lse=True)
        assert out.dtype == dtype and out.shape == want.shape and out.stride() == want.stride()
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
        plain = fastattn.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, scale=scale,
                                                      enable_gqa=Hk != H)  # no lse asked: scratch lse
        assert torch.equal(plain, want)
    # contiguous inputs: the output takes the query's layout
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    out = fastattn.scaled_dot_product_attention(qc, kc, vc, mask, enable_gqa=Hk != H)
    want = _python_route(monkeypatch, qc, kc, vc, mask, enable_gqa=Hk != H)
    assert out.stride() == want.stride() and torch.equal(out, want)


def test_decode_shaped_route_matches_the_reference():
    """The eager decode path computes attention (fastattn.reference in float64, the tolerance policy)."""
    from fastattn import reference, testing
    q, k, v = make_qkv(1, 8, 2, 2, 300, 64, 64, torch.bfloat16)
    mask = torch.rand(1, 1, 2, 300) > 0.2
    out = _eager(q, k, v, mask, enable_gqa=True)
    assert out is not None
    ref64 = reference.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), mask, enable_gqa=True)
    ref_lp = reference.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, upcast=False)
    testing.assert_close("eager decode", out, ref64, ref_lp)


def test_decode_shaped_calls_the_decode_route_declines(monkeypatch):
    """Decode-shaped calls outside the decode rule (float64, head dim > 256) run the attention kernel from C++,
    as the Python path runs the attention op for them; requires_grad still declines."""
    for dtype, E in [(torch.float64, 32), (torch.float32, 264)]:
        q, k, v = make_qkv(1, 2, 2, 1, 40, E, E, dtype)
        out = _eager(q, k, v)
        assert out is not None
        assert torch.equal(out, _python_route(monkeypatch, q, k, v))
    q, k, v = make_qkv(1, 2, 2, 1, 40, 32, 32)
    assert _eager(q.requires_grad_(), k, v) is None
