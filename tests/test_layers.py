"""fastattn.nn.MultiplicativeAttention, HierarchicalAttention and CoAttention against the naive formulas of
fastattn.reference.layers (float64 ground truth; the same formulas in low precision for the bf16 bound):
outputs, weights and the gradients of inputs and parameters, masks (fully masked rows), length-1 and
empty segments, padded vs packed input, state_dict, bad input, torch.compile."""
from __future__ import annotations

import pytest
import torch

import fastattn
from conftest import DTYPE_IDS
from fastattn.reference import layers as ref
from fastattn.testing import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


# ------------------------------------------------------------------------------------------ helpers
def _leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def _grads(out, leaves, cot, retain=False):
    g = torch.autograd.grad((out.double() * cot).sum(), leaves, allow_unused=True, retain_graph=retain)
    return [torch.zeros_like(x) if d is None else d for x, d in zip(leaves, g)]


def _cot(o, i):
    return torch.randn(o.shape, generator=torch.Generator().manual_seed(7 + i), dtype=torch.float64)


def _compare(names, outs, fn_ref, leaves, grad_names):
    """Check the layer's outputs ``outs`` (computed from ``leaves``) against the reference ``fn_ref(leaves,
    upcast)`` in float64 and in the leaves' precision, then the gradients of every leaf, one output at a
    time (the vector-Jacobian product of ``sum(out_i * cot_i)``). One output at a time, because the naive
    reference merges the paths of several outputs before rounding (e.g. both reach the same softmax), so
    the error of a summed gradient can cancel by chance there and not in the layer."""
    dt = leaves[0].dtype
    l64 = [_leaf(x, torch.float64) for x in leaves]
    llp = [_leaf(x) for x in leaves]
    o64, olp = fn_ref(l64, True), fn_ref(llp, False)
    for name, g, r, rl in zip(names, outs, o64, olp):
        assert g.dtype == dt, (name, g.dtype)
        assert torch.isfinite(g).all(), name
        assert_close(name, g, r, rl)
    for i, (name, o) in enumerate(zip(names, outs)):
        cot = _cot(o, i)
        got = _grads(o, leaves, cot, retain=True)
        g64 = _grads(o64[i], l64, cot, retain=True)
        glp = _grads(olp[i], llp, cot, retain=True)
        for gname, g, r, rl in zip(grad_names, got, g64, glp):
            assert torch.isfinite(g).all(), f"d{gname} (from {name}) not finite"
            assert_close(f"d{gname} (from {name})", g, r, rl, backward=True)


# ------------------------------------------------------------------------------------ multiplicative
def _mult_masks(kind, B, L, S, dtype):
    g = torch.Generator().manual_seed(3)
    kpm = (torch.arange(S)[None] < torch.tensor([S, 3])[:, None]) if "kpm" in kind else None
    am = None
    if kind.startswith("bool"):
        am = torch.rand(B, L, S, generator=g) > 0.3
    elif kind.startswith("float"):
        am = torch.randn(L, S, generator=g).to(dtype)  # (L, S): every batch item
        am[1, 2] = float("-inf")
    elif kind == "fully-masked":
        am = torch.rand(B, L, S, generator=g) > 0.3
        am[0, ::3] = False
    return am, kpm


MULT_MASKS = ["none", "bool", "float", "kpm", "bool+kpm", "float+kpm", "fully-masked"]


@pytest.mark.parametrize("mask_kind", MULT_MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_multiplicative(mask_kind, dtype):
    B, L, S, Eq, Ek, Ev = 2, 7, 11, 5, 6, 9
    bias = mask_kind in ("kpm", "float")
    layer = fastattn.nn.MultiplicativeAttention(Eq, Ek, bias=bias, dtype=dtype)
    if bias:
        torch.nn.init.normal_(layer.bias)
    q, k, v = torch.randn(B, L, Eq, dtype=dtype), torch.randn(B, S, Ek, dtype=dtype), torch.randn(B, S, Ev, dtype=dtype)
    am, kpm = _mult_masks(mask_kind, B, L, S, dtype)
    clones = [x.clone() for x in (q, k, v)]
    leaves = [_leaf(q), _leaf(k), _leaf(v), layer.weight] + ([layer.bias] if bias else [])
    out, w = layer(*leaves[:3], am, kpm, need_weights=True)
    assert out.shape == (B, L, Ev) and w.shape == (B, L, S)

    def fn_ref(xs, upcast):
        return ref.multiplicative_attention(xs[0], xs[1], xs[2], xs[3], xs[4] if bias else None, am, kpm,
                                            upcast=upcast)

    _compare(["out", "weights"], [out, w], fn_ref, leaves, ["query", "key", "value", "weight", "bias"][:len(leaves)])
    for x, c in zip((q, k, v), clones):
        assert torch.equal(x, c)  # inputs not modified
    if mask_kind == "fully-masked":
        assert torch.all(out[0, ::3] == 0) and torch.all(w[0, ::3] == 0)
    if kpm is not None:
        assert torch.all(w[1, :, 3:] == 0)  # padded keys get no weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_multiplicative_length1_and_output_only(dtype):
    layer = fastattn.nn.MultiplicativeAttention(3, 4, dtype=dtype)
    q, k, v = torch.randn(3, 1, 3, dtype=dtype), torch.randn(3, 1, 4, dtype=dtype), torch.randn(3, 1, 2, dtype=dtype)
    out = layer(q, k, v)  # need_weights=False: a tensor, not a tuple
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, v)  # one key: weight 1
    _, w = layer(q, k, v, need_weights=True)
    torch.testing.assert_close(w, torch.ones_like(w))


# -------------------------------------------------------------------------------------- hierarchical
def _lengths(n, lo, hi, seed):
    return torch.randint(lo, hi + 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# name: (words per sentence, sentences per document). Enough segments that the maximum errors the
# tolerance policy compares are not decided by the rounding of a handful of values.
HIER_CASES = {
    "basic": (_lengths(48, 1, 11, 1), [5, 9, 1, 7, 2, 8, 3, 13]),
    "len1": ([1] * 24 + _lengths(8, 2, 6, 2), [1] * 12 + [3, 5, 4, 8]),  # one-word sentences, one-sentence docs
    "empty": ([4, 0, 2, 3] + _lengths(36, 0, 7, 3), [2, 0, 2] + [6] * 6),  # empty sentences, a doc with none
}


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist() if lengths else [0], dtype=torch.int32)


def _hier_params(layer):
    p = [layer.word_proj.weight, layer.word_proj.bias, layer.word_context, layer.sentence_attn_proj.weight,
         layer.sentence_attn_proj.bias, layer.sentence_context]
    if layer.sentence_proj is not None:
        p += [layer.sentence_proj.weight, layer.sentence_proj.bias]
    return p


def _hier_ref(wl, sl):
    def fn_ref(xs, upcast):
        return ref.hierarchical_attention(xs[0], wl, sl, *xs[1:], upcast=upcast)
    return fn_ref


@pytest.mark.parametrize("proj", [False, True], ids=["noproj", "proj"])
@pytest.mark.parametrize("case", list(HIER_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_hierarchical(case, proj, dtype):
    wl, sl = HIER_CASES[case]
    D, Dp = 40, 35  # parameters of a few elements make the policy's max-error ratios noisy
    layer = fastattn.nn.HierarchicalAttention(D, word_hidden=29, sentence_hidden=27, sentence_dim=Dp if proj else None,
                                              dtype=dtype)
    torch.nn.init.normal_(layer.word_context, std=0.5)  # scores of a few units: non-uniform weights
    torch.nn.init.normal_(layer.sentence_context, std=0.5)
    words = torch.randn(sum(wl), D, dtype=dtype)
    cu_w, cu_s = _cu(wl), _cu(sl)
    leaves = [_leaf(words)] + _hier_params(layer)
    docs, ww, sw = layer(leaves[0], cu_w, cu_s)
    assert docs.shape == (len(sl), Dp if proj else D) and ww.shape == (sum(wl),) and sw.shape == (len(wl),)
    names = ["words", "W_w", "b_w", "u_w", "W_s", "b_s", "u_s", "W_p", "b_p"]
    _compare(["docs", "word_weights", "sentence_weights"], [docs, ww, sw], _hier_ref(wl, sl), leaves,
             names[:len(leaves)])
    # Weights of each non-empty segment sum to 1.
    tol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 2e-2)
    for lengths, w in ((wl, ww), (sl, sw)):
        sums = torch.zeros(len(lengths), dtype=torch.float64).index_add_(
            0, torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)), w.double())
        live = torch.tensor(lengths) > 0
        assert torch.all((sums[live] - 1).abs() < tol)
    if case == "empty":
        assert torch.all(docs[1] == 0)  # document without sentences


def _padded(words, wl, sl):
    """Packed (T, D) -> (N, S, W, D) with its word mask, the layout forward_padded takes."""
    N, S, W, D = len(sl), max(sl), max(wl), words.shape[1]
    out = words.new_zeros(N, S, W, D)
    mask = torch.zeros(N, S, W, dtype=torch.bool)
    smask = torch.zeros(N, S, dtype=torch.bool)
    cw, si = 0, 0
    for d, ns in enumerate(sl):
        for s in range(ns):
            n = wl[si]
            out[d, s, :n] = words[cw:cw + n]
            mask[d, s, :n] = True
            smask[d, s] = True
            cw += n
            si += 1
    return out, mask, smask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_hierarchical_padded_matches_packed(dtype):
    wl, sl = [3, 5, 1, 7, 2, 4, 1], [2, 4, 1]
    layer = fastattn.nn.HierarchicalAttention(8, sentence_dim=6, dtype=dtype)
    words = torch.randn(sum(wl), 8, dtype=dtype)
    docs, ww, sw = layer(words, _cu(wl), _cu(sl))
    padded, mask, smask = _padded(words, wl, sl)
    pw = _leaf(padded)
    docs_p, ww_p, sw_p = layer.forward_padded(pw, mask)
    torch.testing.assert_close(docs_p, docs, rtol=0, atol=0)
    torch.testing.assert_close(ww_p[mask], ww, rtol=0, atol=0)
    torch.testing.assert_close(sw_p[smask], sw, rtol=0, atol=0)
    assert torch.all(ww_p[~mask] == 0) and torch.all(sw_p[~smask] == 0)
    # Gradients reach the real words only.
    g = torch.autograd.grad(docs_p.float().sum(), pw)[0]
    assert torch.all(g[~mask] == 0) and g[mask].abs().sum() > 0
    # An explicit sentence mask equal to the default gives the same result; 0/1 integer masks work too.
    docs_i, _, _ = layer.forward_padded(padded, mask.int(), smask.int())
    torch.testing.assert_close(docs_i, docs, rtol=0, atol=0)


def test_hierarchical_max_seqlen_given():
    wl, sl = [3, 5, 1], [1, 2]
    layer = fastattn.nn.HierarchicalAttention(4)
    words = torch.randn(9, 4)
    a = layer(words, _cu(wl), _cu(sl))
    b = layer(words, _cu(wl), _cu(sl), max_seqlen_words=8, max_seqlen_sentences=2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# --------------------------------------------------------------------------------------- coattention
def _co_masks(kind, B, La, Lb):
    ma = mb = None
    if kind in ("a", "both", "fully-masked"):
        ma = torch.arange(La)[None] < torch.tensor([La, 2, 5])[:, None]
    if kind in ("b", "both", "fully-masked"):
        mb = torch.arange(Lb)[None] < torch.tensor([4, Lb, 1])[:, None]
    if kind == "fully-masked":
        ma[1] = False  # b's rows of item 1 see no a token
        mb[2] = False
    return ma, mb


@pytest.mark.parametrize("bilinear", [True, False], ids=["bilinear", "dot"])
@pytest.mark.parametrize("mask_kind", ["none", "a", "b", "both", "fully-masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_coattention(mask_kind, bilinear, dtype):
    B, La, Lb, Da = 3, 9, 6, 5
    Db = 7 if bilinear else Da
    layer = fastattn.nn.CoAttention(Da, Db, bilinear=bilinear, dtype=dtype)
    a, b = torch.randn(B, La, Da, dtype=dtype), torch.randn(B, Lb, Db, dtype=dtype)
    ma, mb = _co_masks(mask_kind, B, La, Lb)
    leaves = [_leaf(a), _leaf(b)] + ([layer.weight] if bilinear else [])
    res = layer(leaves[0], leaves[1], ma, mb, need_weights=True)
    assert isinstance(res, fastattn.nn.CoAttentionOutput)
    assert res.a_attended.shape == (B, La, Db) and res.b_attended.shape == (B, Lb, Da)
    assert res.a_weights.shape == (B, La, Lb) and res.b_weights.shape == (B, Lb, La)
    outs = list(res)

    def fn_ref(xs, upcast):
        return ref.coattention(xs[0], xs[1], xs[2] if bilinear else None, ma, mb, upcast=upcast)

    _compare(["a_attended", "b_attended", "a_weights", "b_weights"], outs, fn_ref, leaves,
             ["a", "b", "weight"][:len(leaves)])
    if mask_kind == "fully-masked":
        assert torch.all(res.b_attended[1] == 0) and torch.all(res.a_attended[2] == 0)
        assert torch.all(res.b_weights[1] == 0) and torch.all(res.a_weights[2] == 0)
    # Without need_weights: the same outputs, no weights.
    a2, b2, wa, wb = layer(a, b, ma, mb)
    assert wa is None and wb is None
    torch.testing.assert_close(a2, res.a_attended.detach(), rtol=0, atol=0)
    torch.testing.assert_close(b2, res.b_attended.detach(), rtol=0, atol=0)


def test_coattention_affinity_and_length1():
    layer = fastattn.nn.CoAttention(4, 3)
    a, b = torch.randn(2, 1, 4), torch.randn(2, 1, 3)
    A = layer.affinity(a, b)
    torch.testing.assert_close(A, a @ layer.weight @ b.transpose(1, 2))
    a_att, b_att, _, _ = layer(a, b)
    torch.testing.assert_close(a_att, b)  # one token on each side: weight 1
    torch.testing.assert_close(b_att, a)


# ------------------------------------------------------------------------------ views, gradcheck, empty
def test_noncontiguous_inputs():
    m = fastattn.nn.MultiplicativeAttention(5, 6, bias=True)
    c = fastattn.nn.CoAttention(5, 6)
    # sequence-first tensors viewed batch-first: strided, not contiguous
    q, k = torch.randn(3, 2, 5).transpose(0, 1), torch.randn(4, 2, 6).transpose(0, 1)
    v = torch.randn(4, 2, 7)[..., ::2].transpose(0, 1)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    contiguous = [x.contiguous() for x in (q, k, v)]
    for got, exp in zip(m(q, k, v, need_weights=True), m(*contiguous, need_weights=True)):
        torch.testing.assert_close(got, exp)
    for got, exp in zip(c(q, k, need_weights=True), c(q.contiguous(), k.contiguous(), need_weights=True)):
        torch.testing.assert_close(got, exp)
    h = fastattn.nn.HierarchicalAttention(5)
    w = torch.randn(5, 9).T  # (9, 5), strided
    for got, exp in zip(h(w, _cu([3, 5, 1]), _cu([1, 2])), h(w.contiguous(), _cu([3, 5, 1]), _cu([1, 2]))):
        torch.testing.assert_close(got, exp)


def _gradcheck(layer, inputs):
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    nin = len(inputs)

    def f(*xs):
        out = torch.func.functional_call(layer, dict(zip(names, xs[nin:])), xs[:nin])
        return tuple(o for o in (out if isinstance(out, tuple) else (out,)) if o is not None)

    assert torch.autograd.gradcheck(f, (*inputs, *params), fast_mode=True)


def test_gradcheck_float64():
    d = torch.float64
    m = fastattn.nn.MultiplicativeAttention(3, 4, bias=True, dtype=d)
    q, k, v = (torch.randn(2, 3, 3, dtype=d, requires_grad=True), torch.randn(2, 3, 4, dtype=d, requires_grad=True),
               torch.randn(2, 3, 2, dtype=d, requires_grad=True))

    class M(torch.nn.Module):  # need_weights and a key padding mask, as a module for functional_call
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, q, k, v):
            return self.m(q, k, v, key_padding_mask=torch.tensor([[True, True, False], [True, False, False]]),
                          need_weights=True)

    _gradcheck(M(), (q, k, v))
    c = fastattn.nn.CoAttention(3, 4, dtype=d)

    class C(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = c

        def forward(self, a, b):
            return tuple(self.c(a, b, mask_b=torch.tensor([[True, True, False], [True, True, True]]),
                                need_weights=True))

    _gradcheck(C(), (q, k))
    h = fastattn.nn.HierarchicalAttention(3, 2, 2, sentence_dim=2, dtype=d)

    class H(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.h = h

        def forward(self, w):
            return self.h(w, _cu([2, 1, 3]), _cu([1, 2]))

    _gradcheck(H(), (torch.randn(6, 3, dtype=d, requires_grad=True),))


def test_hierarchical_empty_batch():
    h = fastattn.nn.HierarchicalAttention(6)
    z = torch.zeros(1, dtype=torch.int32)
    docs, ww, sw = h(torch.randn(0, 6), z, z)
    assert docs.shape == (0, 6) and ww.shape == (0,) and sw.shape == (0,)


# ------------------------------------------------------------------------------------- module plumbing
def _layers():
    return {
        "multiplicative": (lambda: fastattn.nn.MultiplicativeAttention(5, 6, bias=True),
                           lambda: (torch.randn(2, 3, 5), torch.randn(2, 4, 6), torch.randn(2, 4, 2))),
        "hierarchical": (lambda: fastattn.nn.HierarchicalAttention(5, 4, 3, sentence_dim=6),
                         lambda: (torch.randn(9, 5), _cu([3, 5, 1]), _cu([1, 2]))),
        "coattention": (lambda: fastattn.nn.CoAttention(5, 6),
                        lambda: (torch.randn(2, 3, 5), torch.randn(2, 4, 6))),
    }


@pytest.mark.parametrize("name", list(_layers()))
def test_state_dict_round_trip(name):
    make, inputs = _layers()[name]
    x = inputs()
    src = make()
    torch.manual_seed(123)
    dst = make()
    out_src = src(*x)
    dst.load_state_dict(src.state_dict())
    assert list(dst.state_dict()) == list(src.state_dict())
    out_dst = dst(*x)
    for p, q in zip(out_src if isinstance(out_src, tuple) else [out_src],
                    out_dst if isinstance(out_dst, tuple) else [out_dst]):
        if p is not None:
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_parameter_names_and_shapes():
    m = fastattn.nn.MultiplicativeAttention(5, 6)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {"weight": (5, 6)}
    h = fastattn.nn.HierarchicalAttention(5, 4, 3, sentence_dim=6)
    assert {k: tuple(v.shape) for k, v in h.state_dict().items()} == {
        "word_proj.weight": (4, 5), "word_proj.bias": (4,), "word_context": (4,),
        "sentence_proj.weight": (6, 5), "sentence_proj.bias": (6,),
        "sentence_attn_proj.weight": (3, 6), "sentence_attn_proj.bias": (3,), "sentence_context": (3,)}
    assert h.output_dim == 6
    assert list(fastattn.nn.CoAttention(4, 4, bilinear=False).state_dict()) == []


def _raises(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


def test_bad_input_multiplicative():
    m = fastattn.nn.MultiplicativeAttention(5, 6)
    q, k, v = torch.randn(2, 3, 5), torch.randn(2, 4, 6), torch.randn(2, 4, 2)
    _raises(ValueError, "query must be", m, q[0], k, v)
    _raises(ValueError, "last dim 5", m, torch.randn(2, 3, 4), k, v)
    _raises(ValueError, "last dim 6", m, q, torch.randn(2, 4, 5), v)
    _raises(TypeError, "dtype torch.float64 does not match", m, q.double(), k, v)
    _raises(ValueError, "batch sizes differ", m, q, k[:1], v[:1])
    _raises(ValueError, "key length 4 does not match value length 3", m, q, k, v[:, :3])
    _raises(ValueError, "does not broadcast", m, q, k, v, torch.ones(2, 4, dtype=torch.bool))
    _raises(TypeError, "attn_mask must be bool", m, q, k, v, torch.ones(3, 4, dtype=torch.int64))
    _raises(ValueError, r"key_padding_mask must have shape \(2, 4\)", m, q, k, v, None, torch.ones(4, dtype=torch.bool))
    _raises(TypeError, "key_padding_mask must be bool", m, q, k, v, None, torch.ones(2, 4))
    _raises(ValueError, "query_dim must be a positive int", fastattn.nn.MultiplicativeAttention, 0, 3)


def test_bad_input_hierarchical():
    h = fastattn.nn.HierarchicalAttention(5)
    w, cw, cs = torch.randn(9, 5), _cu([3, 5, 1]), _cu([1, 2])
    _raises(ValueError, "words must be", h, w[None], cw, cs)
    _raises(ValueError, "last dim 5", h, torch.randn(9, 4), cw, cs)
    _raises(TypeError, "dtype torch.bfloat16", h, w.bfloat16(), cw, cs)
    _raises(TypeError, "cu_seqlens_words must be int32", h, w, cw.float(), cs)
    _raises(ValueError, "cu_seqlens_words must be non-decreasing.*from 0 to the number of words", h, w,
            torch.tensor([0, 3, 8], dtype=torch.int32), cs)
    _raises(ValueError, "cu_seqlens_words must be non-decreasing", h, w,
            torch.tensor([0, 5, 3, 9], dtype=torch.int32), cs)
    _raises(ValueError, "cu_seqlens_words must be non-decreasing", h, w,
            torch.tensor([1, 3, 8, 9], dtype=torch.int32), cs)
    _raises(ValueError, "cu_seqlens_sentences must be .*number of sentences \\(3\\)", h, w, cw, _cu([1, 1]))
    _raises(ValueError, "cu_seqlens_sentences must be 1-D", h, w, cw, cs[None])
    _raises(ValueError, "longest segment has 5 words", h, w, cw, cs, max_seqlen_words=4)
    _raises(ValueError, r"word_mask must have shape \(2, 3, 4\)", h.forward_padded, torch.randn(2, 3, 4, 5),
            torch.ones(2, 3, 5, dtype=torch.bool))
    _raises(ValueError, "words must be", h.forward_padded, w, torch.ones(9, dtype=torch.bool))
    _raises(ValueError, "sentence_dim must be a positive int or None", fastattn.nn.HierarchicalAttention, 5,
            sentence_dim=0)


def test_bad_input_coattention():
    c = fastattn.nn.CoAttention(5, 6)
    a, b = torch.randn(2, 3, 5), torch.randn(2, 4, 6)
    _raises(ValueError, "a must be", c, a[0], b)
    _raises(ValueError, "last dim 6", c, a, torch.randn(2, 4, 5))
    _raises(ValueError, "batch sizes differ", c, a, b[:1])
    _raises(TypeError, "b dtype torch.float64", c, a, b.double())
    _raises(ValueError, r"mask_b must have shape \(2, 4\)", c, a, b, None, torch.ones(2, 3, dtype=torch.bool))
    _raises(TypeError, "mask_a must be bool", c, a, b, torch.ones(2, 3))
    _raises(ValueError, "needs dim_a == dim_b", fastattn.nn.CoAttention, 5, 6, bilinear=False)
    _raises(TypeError, "a must be float", fastattn.nn.CoAttention(5, 5, bilinear=False), a.long(), a.long())


# -------------------------------------------------------------------------------------------- compile
def test_compile_fullgraph_matches_eager():
    m = fastattn.nn.MultiplicativeAttention(5, 6, bias=True)
    c = fastattn.nn.CoAttention(5, 6)
    q, k, v = torch.randn(2, 3, 5), torch.randn(2, 4, 6), torch.randn(2, 4, 2)
    kpm = torch.tensor([[True] * 4, [True, True, False, False]])

    def f(q, k, v, kpm):
        out, w = m(q, k, v, key_padding_mask=kpm, need_weights=True)
        res = c(q, k, None, kpm, need_weights=True)
        return out, w, res.a_attended, res.b_attended, res.a_weights

    eager = f(q, k, v, kpm)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, kpm)
    for e, g in zip(eager, compiled):
        torch.testing.assert_close(g, e)
