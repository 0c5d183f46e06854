"""What one call of ``fastattn.attention_with_kvcache`` costs on CPU, short caches, where the per-call work
(argument checks, the append, allocations) weighs as much as the kernel.

    python examples/kvcache_call_cost.py [--threads 2] [--rounds 400]

Each case: q (B, 1, 32, 128) bf16 against a (B, S, 8, 128) cache (GQA 32/8), one new key and value appended per
call (the cache has room; the lengths stay S, so every call does the same work). Providers, interleaved call by
call in one process:

- ``fastattn``: the public function, a plain eager call (its C++ entry, csrc/eager.cpp ``kvcache_fwd``);
- ``fastattn-python``: the same function with the C++ entry switched off (its Python checks and append, then
  the kernel);
- ``torch``: torch's SDPA on the same keys after the same append done with torch indexing (a
  (B, Hk, S + 1, E) view of the cache, ``enable_gqa``).

Printed: the median time per call and the median of the per-round ratios against ``fastattn``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import _common
import fastattn
from fastattn import _launchers

CASES = ((1, 64), (1, 1024), (8, 256))  # (B, S)
H, HK, E = 32, 8, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=400)
    args = _common.parse_args(ap)
    entry = _launchers.cpu_kvcache
    print(f"threads {torch.get_num_threads()}, bf16, H{H}/{HK} E{E}, one new key per call; median us per call "
          f"(x = per-round ratio to fastattn)")
    for B, S in CASES:
        dt = torch.bfloat16
        q = torch.randn(B, 1, H, E, dtype=dt)
        kc, vc = torch.randn(B, S + 1, HK, E, dtype=dt), torch.randn(B, S + 1, HK, E, dtype=dt)
        k, v = torch.randn(B, 1, HK, E, dtype=dt), torch.randn(B, 1, HK, E, dtype=dt)
        lens = torch.full((B,), S, dtype=torch.int32)
        rows = torch.arange(B)

        def torch_call():
            kc[rows, lens.long()] = k[:, 0]
            vc[rows, lens.long()] = v[:, 0]
            torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), kc.transpose(1, 2),
                                                             vc.transpose(1, 2), enable_gqa=True)

        def fastattn_call():
            fastattn.attention_with_kvcache(q, kc, vc, lens, k, v)

        def python_call():
            _launchers.cpu_kvcache = lambda: None
            try:
                fastattn.attention_with_kvcache(q, kc, vc, lens, k, v)
            finally:
                _launchers.cpu_kvcache = entry

        calls = {"fastattn": fastattn_call, "fastattn-python": python_call, "torch": torch_call}
        times = {name: [] for name in calls}
        for r in range(args.rounds + 20):
            for name, f in calls.items():
                t0 = time.perf_counter()
                f()
                if r >= 20:  # warm-up rounds
                    times[name].append(time.perf_counter() - t0)
        line = []
        for name, ts in times.items():
            ratio = statistics.median(t / f for t, f in zip(ts, times["fastattn"]))
            line.append(f"{name} {statistics.median(ts) * 1e6:7.0f} us ({ratio:.2f}x)")
        print(f"B{B} S{S}: " + "  ".join(line), flush=True)


if __name__ == "__main__":
    main()
