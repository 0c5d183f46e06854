"""The custom ops: opcheck (schema, fake impl, autograd registration) and torch.compile."""
from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import _ops


def _samples():
    g = torch.Generator().manual_seed(0)
    r = lambda *s, dt=torch.float32: torch.randn(*s, generator=g, dtype=dt)  # noqa: E731
    seed = torch.tensor(1234, dtype=torch.int64)
    q, k, v = r(2, 4, 9, 16), r(2, 2, 11, 16), r(2, 2, 11, 8)
    yield (q, k, v, None, 0.25, False, 0.0, seed, "cpu", False)
    yield (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), torch.rand(2, 1, 1, 11, generator=g) > 0.2,
           0.25, True, 0.0, seed, "cpu", False)
    bias = r(1, 1, 9, 11).requires_grad_()
    yield (q, k, v, bias, 0.3, False, 0.0, seed, "cpu", False)
    qb = r(2, 9, 4, 16, dt=torch.bfloat16).transpose(1, 2).requires_grad_()
    kb, vb = r(2, 2, 11, 16, dt=torch.bfloat16), r(2, 2, 11, 8, dt=torch.bfloat16)
    # return_lo: the training forward of fp16 / bf16 (out_lo saved for the backward)
    yield (qb, kb, vb, None, 0.25, True, 0.2, seed, "cpu", True)
    yield (qb, kb, vb, None, 0.25, True, 0.2, seed, "cpu", False)
    qh = r(2, 4, 9, 16, dt=torch.float16).requires_grad_()
    yield (qh, r(2, 2, 11, 16, dt=torch.float16), r(2, 2, 11, 8, dt=torch.float16), r(2, 1, 9, 11, dt=torch.float16),
           0.25, False, 0.1, seed, "cpu", True)


@pytest.mark.parametrize("lower_right", [False, True], ids=["top-left", "lower-right"])
@pytest.mark.parametrize("i", range(6))
def test_opcheck_forward(i, lower_right):
    q, k, v, mask, scale, causal, *rest = list(_samples())[i]
    torch.library.opcheck(_ops.attention_fwd, (q, k, v, mask, scale, causal, lower_right, *rest))


def test_vmap_of_the_forward_op():
    """torch.func.vmap folds the mapped dim into the batch: one call, the same numbers as a loop."""
    q, k, v = torch.randn(3, 2, 4, 9, 16), torch.randn(3, 2, 2, 11, 16), torch.randn(2, 2, 11, 8)
    mask = torch.rand(2, 1, 9, 11) > 0.2
    seed = torch.tensor(0, dtype=torch.int64)

    def f(q, k):
        return _ops.attention_fwd(q, k, v, mask, 0.25, True, True, 0.0, seed, "cpu", False)[:2]

    out, lse = torch.func.vmap(f)(q, k)
    for i in range(3):
        o, l, _ = _ops.attention_fwd(q[i], k[i], v, mask, 0.25, True, True, 0.0, seed, "cpu", False)
        assert torch.equal(out[i], o) and torch.equal(lse[i], l)


def test_opcheck_backward():
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 8)
    seed = torch.tensor(5, dtype=torch.int64)
    mask = torch.randn(2, 1, 9, 11)
    out, lse, _ = _ops.attention_fwd(q, k, v, mask, 0.25, True, False, 0.1, seed, "cpu", False)
    dout = torch.randn_like(out)
    torch.library.opcheck(_ops.attention_bwd, (dout, q, k, v, out, lse, None, mask, 0.25, True, False, 0.1, seed, "cpu",
                                               True))


def test_opcheck_backward_out_lo():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(*s, generator=g).to(torch.bfloat16) for s in ((2, 4, 9, 16), (2, 2, 11, 16), (2, 2, 11, 8)))
    seed = torch.tensor(5, dtype=torch.int64)
    mask = torch.randn(2, 1, 9, 11, generator=g).to(torch.bfloat16)
    out, lse, lo = _ops.attention_fwd(q, k, v, mask, 0.25, True, False, 0.1, seed, "cpu", True)
    assert lo.dtype == torch.int16 and lo.shape == out.shape and lo.stride() == out.stride()
    dout = torch.randn(out.shape, generator=g).to(torch.bfloat16)
    torch.library.opcheck(_ops.attention_bwd, (dout, q, k, v, out, lse, lo, mask, 0.25, True, False, 0.1, seed, "cpu",
                                               True))


class _Layer(torch.nn.Module):
    """A BERT-style self-attention block (projections, padding mask, output projection)."""

    def __init__(self, d=64, h=4):
        super().__init__()
        self.h = h
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.o = torch.nn.Linear(d, d)

    def forward(self, x, mask):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        y = fastattn.scaled_dot_product_attention(q, k, v, mask)
        return self.o(y.transpose(1, 2).reshape(B, L, D))


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    layer = _Layer()
    x = torch.randn(3, 20, 64, requires_grad=True)
    mask = (torch.arange(20)[None] < torch.tensor([20, 11, 5])[:, None]).view(3, 1, 1, 20)
    eager = layer(x, mask)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, mask)
    torch.testing.assert_close(compiled, eager)
    g1 = torch.autograd.grad(eager.sum(), x)[0]
    g2 = torch.autograd.grad(compiled.sum(), x)[0]
    torch.testing.assert_close(g1, g2)


def test_compile_bf16_training_matches_eager():
    """The training forward's out_lo through torch.compile: fake impl, saved for the backward."""
    torch.manual_seed(0)
    layer = _Layer().to(torch.bfloat16)
    x = torch.randn(2, 12, 64, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    eager = layer(x, mask)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, mask)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    g1 = torch.autograd.grad(eager.float().sum(), x)[0]
    g2 = torch.autograd.grad(compiled.float().sum(), x)[0]
    torch.testing.assert_close(g1, g2, atol=0, rtol=0)


@pytest.mark.parametrize("dtype,grad,no_grad_mode,want", [
    (torch.bfloat16, "qkv", False, True), (torch.float16, "mask", False, True),
    (torch.bfloat16, "none", False, False), (torch.bfloat16, "qkv", True, False),
    (torch.float32, "qkv", False, False), (torch.float64, "qkv", False, False)],
    ids=["bf16-train", "f16-mask-grad", "bf16-no-requires-grad", "bf16-no-grad", "f32-train", "f64-train"])
def test_out_lo_only_for_low_precision_training(monkeypatch, eager_took, dtype, grad, no_grad_mode, want):
    """out_lo is allocated and saved only by fp16 / bf16 forwards whose output will be differentiated:
    inference, float32 and float64 pay nothing for it (no argument, no buffer, nothing saved)."""
    from fastattn import _cpu
    asked, real = [], _cpu.attention_fwd

    def spy(*args, **kw):
        asked.append(kw.get("return_lo", False))
        return real(*args, **kw)
    monkeypatch.setattr(_cpu, "attention_fwd", spy)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g).to(dtype) for _ in range(3))
    mask = torch.randn(1, 1, 5, 5, generator=g).to(dtype)
    for t in {"qkv": (q, k, v), "mask": (mask,), "none": ()}[grad]:
        t.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.set_grad_enabled(not no_grad_mode):
        out = fastattn.scaled_dot_product_attention(q, k, v, mask, backend="cpu")
    # the C++ eager entry never writes out_lo: taking the call is a "no" too
    assert asked == [want] or (not want and asked == [] and eager_took == [True])
    lo = [t for t in saved if t.dtype == torch.int16]
    assert len(lo) == int(want)
    if want:
        assert lo[0].shape == out.shape and lo[0].stride() == out.stride()  # as many bytes as out


def test_export():
    layer = _Layer()
    x = torch.randn(2, 16, 64)
    mask = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    ep = torch.export.export(layer, (x, mask))
    torch.testing.assert_close(ep.module()(x, mask), layer(x, mask))
