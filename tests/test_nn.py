"""fastattn.attention_weights against fastattn.reference, and fastattn.nn.MultiheadAttention against
torch.nn.MultiheadAttention (every constructor and forward option)."""
from __future__ import annotations

import ctypes

import pytest
import torch

import fastattn
from conftest import DTYPE_IDS, padding_mask, randn_heads
from fastattn import reference
from fastattn.testing import assert_close


# ------------------------------------------------------------------------------- attention_weights
def _qk(B, H, Hk, L, S, E, dtype, *, bshd=False, requires_grad=False):
    """query and key from torch's global generator, drawn in ``dtype``."""
    return tuple(randn_heads(B, h, n, E, dtype, bshd=bshd, draw_dtype=dtype).requires_grad_(requires_grad)
                 for h, n in ((H, L), (Hk, S)))


def _mask(kind, B, H, L, S, dtype):
    g = torch.Generator().manual_seed(3)
    if kind is None:
        return None
    if kind == "bool":
        return torch.rand(B, H, L, S, generator=g) > 0.3
    if kind == "bool-pad":  # (B, 1, 1, S) padding mask, read through stride 0
        return padding_mask(torch.randint(1, S + 1, (B,), generator=g), S)
    if kind == "float":
        return torch.randn(B, 1, L, S, generator=g).to(dtype)
    if kind == "float32":  # float32 bias with low-precision inputs
        return torch.randn(1, 1, L, S, generator=g)
    if kind == "fully-masked":  # some rows see no key: zeros
        m = torch.rand(B, H, L, S, generator=g) > 0.3
        m[:, :, ::4] = False
        return m
    if kind == "float-inf":
        m = torch.randn(B, 1, L, S, generator=g).to(dtype)
        m[:, :, 1::5] = float("-inf")
        return m
    raise ValueError(kind)


WEIGHT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _check_weights(q, k, mask=None, is_causal=False, scale=None, enable_gqa=False):
    w = fastattn.attention_weights(q, k, mask, is_causal, scale, enable_gqa)
    ref64 = reference.attention_weights(q, k, mask, is_causal, scale, enable_gqa, upcast=True)
    ref_lp = reference.attention_weights(q, k, mask, is_causal, scale, enable_gqa, upcast=False)
    assert w.dtype == q.dtype and w.shape == ref64.shape
    assert torch.isfinite(w).all()
    assert_close("weights", w, ref64, ref_lp)
    return w


@pytest.mark.parametrize("mask_kind", [None, "bool", "bool-pad", "float", "fully-masked", "float-inf"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["nocausal", "causal"])
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=DTYPE_IDS.get)
def test_weights_masks(mask_kind, is_causal, dtype):
    B, H, L, S = 2, 3, 37, 53
    q, k = _qk(B, H, H, L, S, 40, dtype)
    w = _check_weights(q, k, _mask(mask_kind, B, H, L, S, dtype), is_causal)
    rows = w.double().sum(-1)
    live = rows > 0  # rows with a visible key sum to 1
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 3e-2)
    assert torch.all((rows[live] - 1).abs() < tol), (rows[live] - 1).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_weights_gqa_bshd_scale(dtype):
    q, k = _qk(2, 6, 2, 29, 70, 24, dtype, bshd=True)
    assert not q.is_contiguous()
    _check_weights(q, k, _mask("bool-pad", 2, 6, 29, 70, dtype), True, 0.3, enable_gqa=True)
    _check_weights(q, k, _mask("float32", 2, 6, 29, 70, dtype), False, None, enable_gqa=True)


@pytest.mark.parametrize("shape", [(5, 17, 32), (2, 3, 4, 17, 32)], ids=["3d", "5d"])
def test_weights_batch_dims(shape):
    q = torch.randn(*shape)
    k = torch.randn(*shape[:-2], 23, 32)
    mask = torch.rand(*shape[-3:-1], 23) > 0.2 if len(shape) == 3 else torch.rand(3, 1, 17, 23) > 0.2
    _check_weights(q, k, mask)


@pytest.mark.parametrize("L,S", [(1, 1), (1, 64), (64, 1), (0, 5), (5, 0)], ids=lambda x: str(x))
def test_weights_edge_lengths(L, S):
    q, k = _qk(1, 2, 2, L, S, 16, torch.float32)
    w = fastattn.attention_weights(q, k)
    assert w.shape == (1, 2, L, S)
    if L and S:
        _check_weights(q, k)
    else:
        assert w.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("is_causal", [False, True], ids=["nocausal", "causal"])
def test_weights_backward(dtype, is_causal):
    B, H, Hk, L, S = 2, 4, 2, 19, 33
    q, k = _qk(B, H, Hk, L, S, 24, dtype, requires_grad=True)
    mask = torch.randn(B, 1, L, S, dtype=dtype).requires_grad_(True)
    dw = torch.randn(B, H, L, S, dtype=dtype)
    args = (mask, is_causal, None, True)
    grads = torch.autograd.grad(fastattn.attention_weights(q, k, *args), (q, k, mask), dw)
    g64 = torch.autograd.grad(reference.attention_weights(q, k, *args, upcast=True), (q, k, mask), dw.double())
    glp = torch.autograd.grad(reference.attention_weights(q, k, *args, upcast=False), (q, k, mask), dw)
    for name, a, b, c in zip(["dq", "dk", "dmask"], grads, g64, glp):
        assert a.shape == b.shape
        assert_close(name, a, b, c, backward=True)


def test_weights_backward_fully_masked_rows_are_zero():
    q, k = _qk(1, 2, 2, 9, 12, 16, torch.float32, requires_grad=True)
    mask = torch.ones(1, 1, 9, 12, dtype=torch.bool)
    mask[..., 4, :] = False
    w = fastattn.attention_weights(q, k, mask)
    assert torch.equal(w[..., 4, :], torch.zeros_like(w[..., 4, :]))
    dq, dk = torch.autograd.grad(w, (q, k), torch.randn_like(w))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert torch.equal(dq[..., 4, :], torch.zeros_like(dq[..., 4, :]))


def test_weights_opcheck():
    from fastattn._ops.weights import attention_weights as attention_weights_op
    backend = "cpu"
    q, k = _qk(2, 4, 2, 7, 11, 8, torch.float32, requires_grad=True)
    mask = torch.randn(2, 1, 7, 11, requires_grad=True)
    torch.library.opcheck(attention_weights_op, (q, k, mask, 0.3, True, backend))
    torch.library.opcheck(attention_weights_op, (q.detach(), k.detach(), None, 0.3, False, backend))


def test_weights_bad_inputs():
    q, k = _qk(2, 4, 4, 8, 9, 16, torch.float32)
    with pytest.raises(ValueError, match="head dim"):
        fastattn.attention_weights(q, k[..., :8])
    with pytest.raises(ValueError, match="divisible"):
        fastattn.attention_weights(q, k[:, :3], enable_gqa=True)
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        fastattn.attention_weights(q, k, torch.ones(8, 9, dtype=torch.int32))
    with pytest.raises(TypeError, match="is_causal"):
        fastattn.attention_weights(q, k, None, 1)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.startswith(("VmRSS", "VmHWM"))}


def _peak_kib(fn) -> tuple[int, object]:
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _rss_kib()["VmRSS"]
    res = fn()
    return _rss_kib()["VmHWM"] - base, res


def test_weights_one_full_size_buffer():
    """No second (L, S) tensor: the peak above the inputs stays close to the output's size
    (a softmax over materialised scores needs at least twice that)."""
    try:
        _peak_kib(lambda: None)
    except OSError as e:
        pytest.skip(f"cannot measure the RSS high-water mark here ({e})")
    q, k = _qk(1, 2, 2, 2048, 2048, 32, torch.float32)
    mask = (torch.arange(2048) < 1900).view(1, 1, 1, 2048)
    fastattn.attention_weights(q[..., :16, :], k, mask, True)  # warm up (thread pools, one-time tables)
    peak, w = _peak_kib(lambda: fastattn.attention_weights(q, k, mask, True))
    out_kib = w.numel() * w.element_size() // 1024
    assert peak < 1.4 * out_kib, f"peak {peak} KiB for a {out_kib} KiB result"


# ----------------------------------------------------------------------------- MultiheadAttention
E_, H_ = 32, 4
CTOR = {
    "default": {},
    "nobias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "kvdim": {"kdim": 24, "vdim": 20},
    "bias_kv-zero_attn-kvdim": {"add_bias_kv": True, "add_zero_attn": True, "kdim": 16, "vdim": 40},
}
MASKS = ["none", "kpm-bool", "kpm-float", "attn2d-bool", "attn2d-float", "attn3d-bool", "attn3d-float",
         "kpm+attn-bool", "kpm-bool+attn-float", "causal", "causal+kpm"]


def _pair(ctor, batch_first, dtype=torch.float32, dropout=0.0):
    torch.manual_seed(1)
    ref = torch.nn.MultiheadAttention(E_, H_, dropout=dropout, batch_first=batch_first, dtype=dtype, **ctor)
    if ref.in_proj_bias is not None:  # torch initialises biases to 0: make them count
        with torch.no_grad():
            ref.in_proj_bias.normal_()
            ref.out_proj.bias.normal_()
    ours = fastattn.nn.MultiheadAttention(E_, H_, dropout=dropout, batch_first=batch_first, dtype=dtype, **ctor)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _inputs(ctor, batch_first, N=3, L=7, S=9, dtype=torch.float32, self_attn=False):
    def x(n, d):
        t = torch.randn(N, n, d, dtype=dtype)
        return t if batch_first else t.transpose(0, 1).contiguous()
    q = x(L, E_)
    if self_attn:
        return q, q, q
    return q, x(S, ctor.get("kdim", E_)), x(S, ctor.get("vdim", E_))


def _masks(kind, N, L, S, dtype):
    g = torch.Generator().manual_seed(5)
    kpm_b = torch.zeros(N, S, dtype=torch.bool)
    kpm_b[0, S - 3:] = True  # padding: True = ignored (torch's convention)
    kpm_b[1, S - 1] = True
    kpm_f = torch.zeros(N, S, dtype=dtype).masked_fill(kpm_b, float("-inf"))
    am2_b = torch.rand(L, S, generator=g) > 0.8
    am2_b[:, 0] = False  # every row keeps a key: no all-masked rows (torch gives NaN there)
    am3_b = torch.rand(N * H_, L, S, generator=g) > 0.8
    am3_b[..., 0] = False
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype)[:, :S] if L == S else None
    return {
        "none": {},
        "kpm-bool": {"key_padding_mask": kpm_b},
        "kpm-float": {"key_padding_mask": kpm_f},
        "attn2d-bool": {"attn_mask": am2_b},
        "attn2d-float": {"attn_mask": torch.randn(L, S, generator=g).to(dtype)},
        "attn3d-bool": {"attn_mask": am3_b},
        "attn3d-float": {"attn_mask": torch.randn(N * H_, L, S, generator=g).to(dtype)},
        "kpm+attn-bool": {"key_padding_mask": kpm_b, "attn_mask": am2_b},
        "kpm-bool+attn-float": {"key_padding_mask": kpm_b, "attn_mask": torch.randn(L, S, generator=g).to(dtype)},
        "causal": {"attn_mask": causal, "is_causal": True},
        "causal+kpm": {"attn_mask": causal, "is_causal": True, "key_padding_mask": kpm_b},
    }[kind]


def _close(name, got, want, atol):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err <= atol, f"{name}: max abs error {err:.3e} > {atol:.1e}"


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("ctor", list(CTOR), ids=str)
@pytest.mark.parametrize("batch_first", [False, True], ids=["seqfirst", "batchfirst"])
def test_mha_matches_torch(batch_first, ctor, mask_kind):
    ref, ours = _pair(CTOR[ctor], batch_first)
    L = S = 8 if mask_kind.startswith("causal") else None
    q, k, v = _inputs(CTOR[ctor], batch_first, L=L or 7, S=S or 9)
    masks = _masks(mask_kind, 3, L or 7, S or 9, torch.float32)
    for need_weights, average in [(False, True), (True, True), (True, False)]:
        kw = dict(masks, need_weights=need_weights, average_attn_weights=average)
        o_ref, w_ref = ref(q, k, v, **kw)
        o, w = ours(q, k, v, **kw)
        _close(f"output need_weights={need_weights}", o, o_ref, 1e-5)
        if need_weights:
            _close(f"weights average={average}", w, w_ref, 1e-5)
        else:
            assert w is None


@pytest.mark.parametrize("batch_first", [False, True], ids=["seqfirst", "batchfirst"])
def test_mha_self_attention_unbatched_float64(batch_first):
    ref, ours = _pair({"add_bias_kv": True}, batch_first, dtype=torch.float64)
    q, _, _ = _inputs({}, batch_first, dtype=torch.float64, self_attn=True)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[2, 4:] = True
    for kw in [{}, {"key_padding_mask": kpm}]:
        o_ref, w_ref = ref(q, q, q, **kw)
        o, w = ours(q, q, q, **kw)
        _close("self-attention output", o, o_ref, 1e-12)
        _close("self-attention weights", w, w_ref, 1e-12)
    x = torch.randn(7, E_, dtype=torch.float64)  # unbatched (L, E)
    m = torch.zeros(7, dtype=torch.bool)
    m[5:] = True
    for kw in [{}, {"key_padding_mask": m, "average_attn_weights": False}]:
        o_ref, w_ref = ref(x, x, x, **kw)
        o, w = ours(x, x, x, **kw)
        _close("unbatched output", o, o_ref, 1e-12)
        _close("unbatched weights", w, w_ref, 1e-12)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
def test_mha_gradients_match_torch():
    ref, ours = _pair(CTOR["bias_kv-zero_attn-kvdim"], True)
    ref.train(), ours.train()  # dropout 0: training mode without randomness
    q, k, v = _inputs(CTOR["bias_kv-zero_attn-kvdim"], True)
    masks = _masks("kpm-bool+attn-float", 3, 7, 9, torch.float32)
    for need_weights in [False, True]:
        losses = []
        for m in (ref, ours):
            m.zero_grad()
            qi, ki, vi = (t.clone().requires_grad_(True) for t in (q, k, v))
            o, w = m(qi, ki, vi, need_weights=need_weights, **masks)
            loss = (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum()
            if w is not None:
                loss = loss + (w * torch.linspace(0, 2, w.numel()).view_as(w)).sum()
            loss.backward()
            losses.append([qi.grad, ki.grad, vi.grad] + [p.grad for p in m.parameters()])
        for i, (a, b) in enumerate(zip(*losses)):
            _close(f"grad {i} need_weights={need_weights}", b, a, 1e-4)


def test_mha_dropout_train_vs_eval():
    p = 0.3
    ref, ours = _pair({}, True, dropout=p)
    q, k, v = _inputs({}, True)
    kpm = _masks("kpm-bool", 3, 7, 9, torch.float32)["key_padding_mask"]
    ours.train()
    torch.manual_seed(11)
    o, w = ours(q, k, v, key_padding_mask=kpm, average_attn_weights=False)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))  # what fastattn drew
    torch.manual_seed(11)
    o2, _ = ours(q, k, v, key_padding_mask=kpm, need_weights=False)
    assert torch.equal(o, o2)  # same seed, same mask, with or without the weights
    # Rebuild: the projections, fastattn's Philox mask, the reference attention.
    Wq, Wk, Wv = ours.in_proj_weight.chunk(3)
    bq, bk, bv = ours.in_proj_bias.chunk(3)
    heads = lambda t: t.view(3, -1, H_, E_ // H_).transpose(1, 2)  # noqa: E731
    qh, kh, vh = heads(q @ Wq.T + bq), heads(k @ Wk.T + bk), heads(v @ Wv.T + bv)
    keep = ~kpm.view(3, 1, 1, 9)
    att = reference.scaled_dot_product_attention(qh, kh, vh, keep, p, dropout_seed=seed, upcast=True)
    o_ref = ours.out_proj(att.transpose(1, 2).reshape(3, 7, E_).float())
    _close("train output vs reference with the rebuilt mask", o, o_ref, 2e-5)
    # The weights are the dropped-out probabilities (as torch returns them): their product with V is the output.
    w_ref = reference.dropout(reference.attention_weights(qh, kh, keep), p, seed)
    _close("train weights", w, w_ref, 1e-5)
    kept = (w > 0).float().sum() / (reference.attention_weights(qh, kh, keep) > 0).float().sum()
    assert abs(kept.item() - (1 - p)) < 0.08
    # eval: no dropout, equal to torch
    ours.eval(), ref.eval()
    o_eval, w_eval = ours(q, k, v, key_padding_mask=kpm)
    o_t, w_t = ref(q, k, v, key_padding_mask=kpm)
    _close("eval output", o_eval, o_t, 1e-5)
    _close("eval weights", w_eval, w_t, 1e-5)


def test_mha_state_dict_and_convert():
    layer = torch.nn.TransformerEncoderLayer(E_, H_, dim_feedforward=64, dropout=0.0, batch_first=True)
    x = torch.randn(2, 6, E_)
    src_mask = torch.zeros(2, 6, dtype=torch.bool)
    src_mask[1, 4:] = True
    layer.eval()
    with torch.no_grad():
        want = layer(x, src_key_padding_mask=src_mask)
    fastattn.nn.convert(layer)
    assert type(layer.self_attn) is fastattn.nn.MultiheadAttention
    assert isinstance(layer.self_attn, torch.nn.MultiheadAttention)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # torch's fused encoder path bypasses the module
    try:
        with torch.no_grad():
            got = layer(x, src_key_padding_mask=src_mask)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    real = ~src_mask
    _close("converted encoder layer", got[real], want[real], 1e-5)
    sd = layer.self_attn.state_dict()
    plain = torch.nn.MultiheadAttention(E_, H_, batch_first=True)
    plain.load_state_dict(sd)  # strict: same keys, same shapes
    assert sd.keys() == plain.state_dict().keys()


def test_mha_fully_masked_row_gives_zeros():
    _, ours = _pair({}, True)
    q, k, v = _inputs({}, True)
    am = torch.zeros(7, 9, dtype=torch.bool)
    am[2] = True  # query 2 may attend to nothing
    o, w = ours(q, k, v, attn_mask=am)
    assert torch.isfinite(o).all() and torch.isfinite(w).all()
    assert torch.equal(w[:, 2], torch.zeros_like(w[:, 2]))
    bias = ours.out_proj.bias.expand(3, E_)
    _close("fully masked row -> out_proj(0)", o[:, 2], bias, 1e-6)


def test_mha_errors_like_torch():
    _, ours = _pair({}, True)
    q, k, v = _inputs({}, True)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ours(q, k, v, is_causal=True)
    with pytest.raises(RuntimeError, match="2D attn_mask"):
        ours(q, k, v, attn_mask=torch.zeros(7, 8, dtype=torch.bool))
    with pytest.raises(AssertionError):
        ours(q, k[:, :, :5], v)
