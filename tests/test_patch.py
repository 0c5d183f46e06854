"""fastattn.patch(): torch.nn.functional.scaled_dot_product_attention routed to fastattn, then restored."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from fastattn.patch import is_patched

TORCH_SDPA = F.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _restored():
    yield
    assert F.scaled_dot_product_attention is TORCH_SDPA, "a test left the patch on"


def _qkv(B=2, H=4, L=13, S=21, E=16, requires_grad=False):
    t = lambda n: torch.randn(B, H, n, E, requires_grad=requires_grad)  # noqa: E731
    return t(L), t(S), t(S)


def test_context_manager_routes_and_restores():
    q, k, v = _qkv()
    mask = torch.rand(2, 1, 13, 21) > 0.2
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with fastattn.patch() as p:
        assert is_patched() and F.scaled_dot_product_attention is not TORCH_SDPA
        assert not torch.backends.mha.get_fastpath_enabled()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out_c = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2)
    assert p.calls == 2 and p.fallbacks == 0
    assert not is_patched() and torch.backends.mha.get_fastpath_enabled() == fastpath
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, attn_mask=mask), atol=1e-5, rtol=0)
    torch.testing.assert_close(out_c, TORCH_SDPA(q, k, v, is_causal=True, scale=0.2), atol=1e-5, rtol=0)


def test_switch_and_nesting():
    p = fastattn.patch(True)
    try:
        assert is_patched()
        with fastattn.patch(False):
            assert not is_patched()
        assert is_patched()
        with fastattn.patch() as inner:
            F.scaled_dot_product_attention(*_qkv())
        assert inner.calls == 1 and p.calls == 0 and is_patched()
    finally:
        fastattn.patch(False)
    assert not is_patched()
    p._restore()  # back to what was there before patch(True): torch's
    assert F.scaled_dot_product_attention is TORCH_SDPA
    with pytest.raises(TypeError):
        fastattn.patch("yes")


def test_gradients_and_dropout():
    q, k, v = _qkv(requires_grad=True)
    with fastattn.patch():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(TORCH_SDPA(q, k, v, is_causal=True).sum(), (q, k, v))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    torch.manual_seed(3)
    with fastattn.patch():
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))  # what fastattn drew
    ref = reference.scaled_dot_product_attention(q, k, v, None, 0.25, dropout_seed=seed)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=0)


def test_unsupported_calls_fall_back_to_torch():
    q, k, v = _qkv()
    with fastattn.patch() as p:
        # batch dims that broadcast between query and key: fastattn's (stride-0 views), as torch broadcasts
        out = F.scaled_dot_product_attention(q, k[:1], v[:1])
        # an integer mask is an error in both: torch raises its own
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(13, 21, dtype=torch.int32))
    assert p.calls == 1 and p.fallbacks == 1
    torch.testing.assert_close(out, TORCH_SDPA(q, k[:1], v[:1]), atol=2e-5, rtol=0)


def test_torch_layers_run_on_fastattn():
    """nn.MultiheadAttention (need_weights=False) and nn.TransformerEncoderLayer, including its
    inference fast path, which the patch turns off."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True).eval()
    x = torch.randn(3, 10, 32)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 7:] = True
    with torch.no_grad():
        want = layer(x, src_key_padding_mask=pad)
        with fastattn.patch() as p:
            got = layer(x, src_key_padding_mask=pad)
            mha_out, _ = layer.self_attn(x, x, x, need_weights=False)
    assert p.calls == 2
    real = ~pad
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(mha_out, layer.self_attn(x, x, x, need_weights=False)[0], atol=1e-5, rtol=0)


def test_compile_through_the_patch():
    q, k, v = _qkv()

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    with fastattn.patch():
        got = torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    torch.testing.assert_close(got, TORCH_SDPA(q, k, v, is_causal=True), atol=1e-5, rtol=0)


def test_jagged_nested_tensors_run_on_fastattn():
    """torch.nested jagged (B, H, j, E) inputs go to fastattn's varlen kernels while patched."""
    seqs = [torch.randn(n, 2, 8) for n in (3, 7, 5)]
    q, k, v = (torch.nested.nested_tensor([s + i for s in seqs], layout=torch.jagged).transpose(1, 2)
               for i in range(3))
    with fastattn.patch() as p:
        out = F.scaled_dot_product_attention(q, k, v)
    assert p.calls == 1 and p.fallbacks == 0 and out.is_nested
    for o, s in zip(out.transpose(1, 2).unbind(), seqs):
        want = TORCH_SDPA(s.transpose(0, 1)[None], (s + 1).transpose(0, 1)[None], (s + 2).transpose(0, 1)[None])[0]
        torch.testing.assert_close(o.transpose(0, 1), want, atol=2e-5, rtol=0)
