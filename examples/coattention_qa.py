"""Span prediction with ``fastattn.nn.CoAttention`` on a synthetic reading task. Runs in seconds on CPU:

    python examples/coattention_qa.py [--steps 150] [--seed 0]

Data: a question is 2-4 distinct token ids; its passage (12-30 tokens of other ids) contains those
tokens, shuffled, as one contiguous span, the answer. Questions and passages have different lengths
in a batch: both are padded, and the padding masks go to the layer (``mask_a`` / ``mask_b``).

Model: embeddings -> CoAttention(question, passage) (bilinear affinity) -> for every passage token
[its embedding, its attended question summary, their product] -> a width-3 convolution (to see span
boundaries) -> start and end logits. Prints the loss during training and, on held-out batches, exact
match of the predicted (start, end) and the share of the co-attention weight that question tokens put
on the answer span.
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

PAD = 0


def make_batch(n: int, vocab: int, g: torch.Generator):
    """(question ids (n, Lq), question mask, passage ids (n, Lp), passage mask, start (n,), end (n,))."""
    qs, ps, spans = [], [], []
    for _ in range(n):
        perm = torch.randperm(vocab - 1, generator=g) + 1  # ids 1..vocab-1, distinct
        lq = int(torch.randint(2, 5, (), generator=g))
        lp = int(torch.randint(12, 31, (), generator=g))
        q = perm[:lq]
        start = int(torch.randint(0, lp - lq + 1, (), generator=g))
        noise = perm[lq:][torch.randint(0, vocab - 1 - lq, (lp,), generator=g)]
        p = noise.clone()
        p[start:start + lq] = q[torch.randperm(lq, generator=g)]
        qs.append(q)
        ps.append(p)
        spans.append((start, start + lq - 1))

    def padded(seqs):
        x = nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=PAD)
        return x, x != PAD

    q, qm = padded(qs)
    p, pm = padded(ps)
    s, e = torch.tensor(spans).unbind(1)
    return q, qm, p, pm, s, e


class Reader(nn.Module):
    def __init__(self, vocab: int, dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.coattn = fastattn.nn.CoAttention(dim, dim)
        self.conv = nn.Conv1d(3 * dim, dim, kernel_size=3, padding=1)
        self.out = nn.Linear(dim, 2)

    def forward(self, q, qm, p, pm, need_weights=False):
        eq, ep = self.embed(q), self.embed(p)
        # a = question, b = passage: b_attended[j] is the question summary passage token j attends to.
        res = self.coattn(eq, ep, mask_a=qm, mask_b=pm, need_weights=need_weights)
        h = torch.cat([ep, res.b_attended, ep * res.b_attended], dim=-1)
        h = torch.relu(self.conv(h.transpose(1, 2))).transpose(1, 2)
        logits = self.out(h).masked_fill(~pm.unsqueeze(-1), float("-inf"))
        return logits[..., 0], logits[..., 1], res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=100)
    args = _common.parse_args(ap)
    g = torch.Generator().manual_seed(args.seed)
    model = Reader(args.vocab)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ce = nn.functional.cross_entropy
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        q, qm, p, pm, s, e = make_batch(args.batch, args.vocab, g)
        ls, le, _ = model(q, qm, p, pm)
        loss = ce(ls, s) + ce(le, e)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    print(f"training: {time.perf_counter() - t0:.1f} s")

    model.eval()
    q, qm, p, pm, s, e = make_batch(512, args.vocab, torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        ls, le, res = model(q, qm, p, pm, need_weights=True)
    em = ((ls.argmax(-1) == s) & (le.argmax(-1) == e)).float().mean().item()
    # a_weights (B, Lq, Lp): each question token's distribution over the passage; its mass on the answer.
    pos = torch.arange(p.shape[1])
    in_span = (pos >= s[:, None]) & (pos <= e[:, None])
    mass = (res.a_weights * in_span[:, None, :]).sum(-1)  # (B, Lq)
    mass = mass[qm].mean().item()
    print(f"held-out (512 questions): span exact match {em:.3f}; question-to-passage attention mass on the "
          f"answer span {mass:.3f}")


if __name__ == "__main__":
    main()
