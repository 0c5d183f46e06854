"""A tiny hierarchical attention network (Yang et al. 2016) on synthetic documents, with
``fastattn.nn.HierarchicalAttention`` on packed variable-length input. Runs in seconds on CPU:

    python examples/hierarchical_classification.py [--steps 40] [--seed 0]

Data: documents of 2-6 sentences of 2-9 words drawn from a vocabulary of "noise" words; exactly one
word of one sentence is one of ``--classes`` signal words, and the label is which one. Nothing in the
data says where the signal is, so a classifier must find it: the word level has to put its weight on
the signal word, and the sentence level on the sentence holding it.

Model: word embeddings -> HierarchicalAttention (packed: ``cu_seqlens`` of words per sentence and of
sentences per document, no padding) -> linear classifier. Prints the loss and accuracy during training
and, at the end, on held-out documents: the accuracy and how often the largest word / sentence weight
falls on the signal word / sentence (chance: about 1 / 5 and 1 / 4).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

try:
    import fastattn  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastattn  # noqa: E402
import _common  # noqa: E402


def make_batch(n_docs: int, vocab: int, classes: int, g: torch.Generator):
    """Packed batch: (word ids (T,), cu_seqlens_words, cu_seqlens_sentences, labels (N,),
    signal word index (N,) into T, signal sentence index (N,) into n)."""
    ids, word_lens, sent_lens, labels, sig_word, sig_sent = [], [], [], [], [], []
    t = 0
    for _ in range(n_docs):
        n_s = int(torch.randint(2, 7, (), generator=g))
        lens = torch.randint(2, 10, (n_s,), generator=g).tolist()
        label = int(torch.randint(classes, (), generator=g))
        where_s = int(torch.randint(n_s, (), generator=g))
        where_w = int(torch.randint(lens[where_s], (), generator=g))
        sig_sent.append(len(word_lens) + where_s)
        for s, n in enumerate(lens):
            words = torch.randint(classes, vocab, (n,), generator=g)  # ids >= classes: noise words
            if s == where_s:
                words[where_w] = label
                sig_word.append(t + where_w)
            ids.append(words)
            t += n
        word_lens += lens
        sent_lens.append(n_s)
        labels.append(label)

    def cu(lengths):
        return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)

    return (torch.cat(ids), cu(word_lens), cu(sent_lens), torch.tensor(labels), torch.tensor(sig_word),
            torch.tensor(sig_sent))


class HAN(nn.Module):
    def __init__(self, vocab: int, classes: int, dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = fastattn.nn.HierarchicalAttention(dim, word_hidden=dim, sentence_hidden=dim, sentence_dim=dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids, cu_words, cu_sents):
        docs, word_w, sent_w = self.attn(self.embed(ids), cu_words, cu_sents)
        return self.head(docs), word_w, sent_w


def argmax_per_segment(w: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Index (into w) of the largest value of each segment cu[i]:cu[i+1]."""
    return torch.stack([cu[i] + w[cu[i]:cu[i + 1]].argmax() for i in range(cu.numel() - 1)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=200)
    ap.add_argument("--classes", type=int, default=4)
    args = _common.parse_args(ap)
    g = torch.Generator().manual_seed(args.seed)
    model = HAN(args.vocab, args.classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, cu_w, cu_s, y, _, _ = make_batch(args.batch, args.vocab, args.classes, g)
        logits, _, _ = model(ids, cu_w, cu_s)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == 1:
            acc = (logits.argmax(-1) == y).float().mean().item()
            print(f"step {step:4d}  loss {loss.item():.3f}  batch accuracy {acc:.2f}")
    print(f"training: {time.perf_counter() - t0:.1f} s")

    model.eval()
    ids, cu_w, cu_s, y, sig_w, sig_s = make_batch(256, args.vocab, args.classes,
                                                  torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        logits, word_w, sent_w = model(ids, cu_w, cu_s)
    acc = (logits.argmax(-1) == y).float().mean().item()
    # The signal sentence's largest word weight should sit on the signal word; each document's largest
    # sentence weight on the signal sentence.
    sent_of_signal = torch.searchsorted(cu_w, sig_w, right=True) - 1
    word_hit = (argmax_per_segment(word_w, cu_w)[sent_of_signal] == sig_w).float().mean().item()
    sent_hit = (argmax_per_segment(sent_w, cu_s) == sig_s).float().mean().item()
    print(f"held-out (256 documents): accuracy {acc:.3f}; largest word weight on the signal word {word_hit:.3f}; "
          f"largest sentence weight on the signal sentence {sent_hit:.3f}")


if __name__ == "__main__":
    main()
