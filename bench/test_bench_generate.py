"""HuggingFace ``generate()`` on a random Llama-style decoder, CPU: fastattn vs sdpa vs eager.

    pip install transformers
    pytest bench/test_bench_generate.py --benchmark-only [--benchmark-json out.json]

The model, prompts and timing rule are examples/generate_speed.py's (its functions, imported here): 4 layers,
hidden 256, 8 heads / 2 key-value heads, fp32; a 1024-token prompt (batch 4: rows 64 tokens shorter each,
left-padded); greedy decoding of exactly 32 new tokens. pytest-benchmark times the whole ``generate()``
(prefill + 32 tokens); ``extra_info`` adds the medians of the prefill time and of the time per new token
(the decode steps alone), timed inside each run as ``python examples/generate_speed.py`` times them and
prints them as a table. Skipped (not failed) when transformers is missing.
"""
from __future__ import annotations

import importlib.util
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location(
    "generate_speed", Path(__file__).resolve().parents[1] / "examples" / "generate_speed.py")
gs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gs)

PROMPT, NEW_TOKENS, ROUNDS = 1024, 32, 3


@pytest.fixture(scope="module")
def models():
    return {p: gs.build_model(p) for p in gs.PROVIDERS}


@pytest.mark.parametrize("provider", gs.PROVIDERS)
@pytest.mark.parametrize("batch", [1, 4], ids=lambda b: f"B{b}")
def test_generate(benchmark, models, batch, provider):
    model = models[provider]
    inputs = gs.prompt_batch(batch, PROMPT)
    clocks = []

    def run():
        clocks.append(gs._StepClock())
        clocks[-1].start = time.perf_counter()
        return gs.generate(model, inputs, NEW_TOKENS, clocks[-1])

    benchmark.group = f"generate-P{PROMPT}-N{NEW_TOKENS}-B{batch}"
    ids = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    timed = clocks[1:]  # the warm-up round first
    benchmark.extra_info.update(
        provider=provider, batch=batch, prompt=PROMPT, new_tokens=NEW_TOKENS, torch_threads=torch.get_num_threads(),
        prefill_s=statistics.median(c.times[0] - c.start for c in timed),
        per_new_token_s=statistics.median((c.times[-1] - c.times[0]) / (len(c.times) - 1) for c in timed))
    assert ids.shape == (batch, PROMPT + NEW_TOKENS)
