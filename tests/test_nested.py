"""fastattn.scaled_dot_product_attention on torch.nested jagged tensors (fastattn/nested.py): the varlen
kernels against a per-sequence float64 reference, forward and backward through the nested inputs, the
output's nested structure against torch's own nested SDPA, and the errors for what it does not take."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from fastattn.testing import assert_close
from conftest import DTYPE_IDS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _njt(lens, H, E, dtype=torch.float32, grad=False):
    """(B, H, j, E): the transpose of a jagged (B, j, H, E) tensor, as torch documents for SDPA."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "nested tensors are in prototype stage"
        nt = torch.nested.nested_tensor([torch.randn(n, H, E).to(dtype) for n in lens], layout=torch.jagged,
                                        requires_grad=grad)
    return nt, nt.transpose(1, 2)


def _seqs(njt_bhje):
    """Per-sequence dense (H, n, E) tensors of a (B, H, j, E) nested tensor."""
    return [t.transpose(0, 1) for t in njt_bhje.transpose(1, 2).unbind()]


def _ref(qs, ks, vs, upcast, **kw):
    return [reference.scaled_dot_product_attention(q, k, v, upcast=upcast, **kw) for q, k, v in zip(qs, ks, vs)]


CASES = [  # (q lengths, kv lengths, H, Hk, E, Ev, causal)
    ([5, 17, 1, 33], None, 4, 4, 32, 32, False),
    ([5, 17, 1, 33], None, 4, 4, 40, 24, True),
    ([9, 0, 70], [12, 3, 65], 6, 2, 16, 16, False),  # GQA, L != S, an empty sequence
    ([2, 130], [130, 2], 2, 1, 64, 64, True),  # one key/value head
]


def _id(c):
    lq, lk, H, Hk, E, Ev, causal = c
    return f"Lq{'-'.join(map(str, lq))}-S{'same' if lk is None else '-'.join(map(str, lk))}-H{H}-Hk{Hk}-E{E}-Ev{Ev}" + (
        "-causal" if causal else "")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_backward_match_per_sequence_reference(case, dtype):
    lq, lk, H, Hk, E, Ev, causal = case
    lk = lq if lk is None else lk
    q0, q = _njt(lq, H, E, dtype, grad=True)
    k0, k = _njt(lk, Hk, E, dtype, grad=True)
    v0, v = _njt(lk, Hk, Ev, dtype, grad=True)
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=Hk != H)
    assert out.is_nested and out.layout == torch.jagged and out.shape == (len(lq), H, q.shape[2], Ev)

    leaves = [t.detach().clone().requires_grad_(True) for t in (*_seqs(q), *_seqs(k), *_seqs(v))]
    B = len(lq)
    qs, ks, vs = leaves[:B], leaves[B:2 * B], leaves[2 * B:]
    kw = dict(is_causal=causal, enable_gqa=Hk != H)
    ref64, ref_lp = _ref(qs, ks, vs, True, **kw), _ref(qs, ks, vs, False, **kw)
    got = _seqs(out)
    for b in range(B):
        assert_close(f"out[{b}]", got[b], ref64[b], ref_lp[b])

    grads = [torch.randn(g.shape).to(dtype) for g in got]
    # Gradients reach the nested leaves through the values.
    torch.autograd.backward(out.transpose(1, 2).values(),
                            torch.cat([g.transpose(0, 1) for g in grads]) if grads else None)
    d64 = torch.autograd.grad([r for r in ref64 if r.numel()], [t for t in leaves],
                              [g.double() for g, r in zip(grads, ref64) if r.numel()], allow_unused=True)
    dlp = torch.autograd.grad([r for r in ref_lp if r.numel()], leaves,
                              [g for g, r in zip(grads, ref_lp) if r.numel()], allow_unused=True)
    for name, nt, off in (("dq", q0, 0), ("dk", k0, B), ("dv", v0, 2 * B)):
        assert nt.grad is not None and nt.grad.is_nested
        for b, g in enumerate(nt.grad.unbind()):
            want64, want_lp = d64[off + b], dlp[off + b]
            if want64 is None:
                assert g.abs().max().item() == 0 if g.numel() else True
                continue
            assert_close(f"{name}[{b}]", g.transpose(0, 1), want64, want_lp, backward=True)


def test_matches_torch_nested_sdpa_and_structure():
    """Where torch's CPU nested SDPA runs (no causal), the same numbers and the same nested structure."""
    _, q = _njt([3, 8, 1], 4, 16)
    _, k = _njt([6, 2, 9], 4, 16)
    _, v = _njt([6, 2, 9], 4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    got = fastattn.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert got.shape == want.shape  # same nested int: the query's offsets
    assert torch.equal(got.offsets(), want.offsets())
    torch.testing.assert_close(got.values(), want.values(), atol=2e-6, rtol=0)


def test_lse_and_three_dim():
    _, q = _njt([4, 11], 2, 8)
    _, k = _njt([7, 5], 2, 8)
    out, lse = fastattn.scaled_dot_product_attention(q, k, k, return_lse=True)
    assert lse.is_nested and lse.shape == (2, 2, q.shape[2]) and lse.dtype == torch.float32
    for b, (qb, kb, lb) in enumerate(zip(_seqs(q), _seqs(k), lse.transpose(1, 2).unbind())):
        want = reference.logsumexp(reference.scores(qb.double(), kb.double()))
        torch.testing.assert_close(lb.transpose(0, 1).double(), want, atol=1e-5, rtol=0)
    # 3-D (B, j, E): one head.
    q3 = torch.nested.nested_tensor([torch.randn(n, 8) for n in (3, 6)], layout=torch.jagged)
    out3 = fastattn.scaled_dot_product_attention(q3, q3, q3, is_causal=True)
    assert out3.shape == q3.shape
    for qb, ob in zip(q3.unbind(), out3.unbind()):
        torch.testing.assert_close(ob, reference.scaled_dot_product_attention(qb, qb, qb, is_causal=True).float(),
                                   atol=2e-5, rtol=0)


def test_ragged_batch_dim_runs_dense_as_torch():
    """4-D ragged on dim 1 (B, j, L, E): a ragged batch of dense problems, as torch's special path."""
    q, _ = _njt([2, 3], 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = F.scaled_dot_product_attention(q, q, q)
    got = fastattn.scaled_dot_product_attention(q, q, q)
    assert got.shape == want.shape
    torch.testing.assert_close(got.values(), want.values(), atol=2e-6, rtol=0)


def test_holes_are_compacted():
    base = torch.randn(3, 20, 2, 8)
    nt = torch.nested.narrow(base, 1, torch.tensor([0, 5, 12]), torch.tensor([3, 4, 6]), layout=torch.jagged)
    q = nt.transpose(1, 2)
    out = fastattn.scaled_dot_product_attention(q, q, q)
    for b, (s, n) in enumerate(zip((0, 5, 12), (3, 4, 6))):
        x = base[b, s:s + n].transpose(0, 1)
        torch.testing.assert_close(out.transpose(1, 2).unbind()[b].transpose(0, 1),
                                   reference.scaled_dot_product_attention(x, x, x).float(), atol=2e-5, rtol=0)


def test_dropout_draws_the_padded_bits():
    """Dropout coordinates are local to each sequence: the same seed drops what the padded call drops."""
    lens = [5, 12, 3]
    _, q = _njt(lens, 2, 16)
    p = 0.3
    torch.manual_seed(11)
    out = fastattn.scaled_dot_product_attention(q, q, q, dropout_p=p)
    B, S = len(lens), max(lens)
    dense = torch.zeros(B, 2, S, 16)
    for b, x in enumerate(_seqs(q)):
        dense[b, :, :lens[b]] = x
    keep = (torch.arange(S)[None, :] < torch.tensor(lens)[:, None])[:, None, None, :]
    torch.manual_seed(11)
    want = fastattn.scaled_dot_product_attention(dense, dense, dense, keep, dropout_p=p)
    for b, ob in enumerate(_seqs(out)):
        torch.testing.assert_close(ob, want[b, :, :lens[b]], atol=1e-6, rtol=0)


@pytest.mark.parametrize("what", ["mask", "dense-key", "strided-layout", "kv-lengths", "batch", "ragged-dim",
                                  "heads"])
def test_clear_errors(what):
    _, q = _njt([3, 4], 2, 8)
    k = v = q
    kw = {}
    if what == "mask":
        kw["attn_mask"], err, msg = torch.ones(1, dtype=torch.bool), ValueError, "attn_mask"
    elif what == "dense-key":
        k, err, msg = torch.randn(2, 2, 4, 8), TypeError, "key must be one too"
    elif what == "strided-layout":
        k = v = torch.nested.nested_tensor([torch.randn(2, 3, 8), torch.randn(2, 4, 8)])
        err, msg = TypeError, "torch.jagged"
    elif what == "kv-lengths":
        _, v = _njt([3, 5], 2, 8)
        err, msg = ValueError, "same sequence lengths"
    elif what == "batch":
        _, k = _njt([3, 4, 5], 2, 8)
        v = k
        err, msg = ValueError, "batch"
    elif what == "ragged-dim":
        q = k = v = q.transpose(2, 3)  # (B, H, E, j): ragged on the last dim
        err, msg = ValueError, "ragged along the sequence dim"
    else:
        _, k = _njt([3, 4], 3, 8)
        v = k
        err, msg = ValueError, "heads"
    with pytest.raises(err, match=msg):
        fastattn.scaled_dot_product_attention(q, k, v, **kw)
