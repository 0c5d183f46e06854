"""Benchmarks of ``hard_attention`` (forward): the cases and providers of ``fastattn.bench``'s "hard"
operation (fastattn/bench/ops/hard.py: the fused CPU kernel, the naive reference, and torch's SDPA for the
cost of ordinary attention at the same shape).

    pytest -s bench/test_bench_hard.py                          # B=8 H=12 E=64 L=512, top_k 1 and 8
    pytest -s bench/test_bench_hard.py --bench-suite full       # and L=2048 (the naive reference: ~a minute a call)
    pytest -s bench/test_bench_hard.py --bench-suite memory     # peak memory at L=2048, top_k=8, fresh process
"""
from fastattn.bench import MIB

OPERATION = "hard"


def test_hard(bench_case, provider, run_bench):
    run_bench(bench_case, provider)


def test_hard_memory(bench_case, provider, run_memory, record_property):
    """Peak memory above the inputs of one call (fused: the output and the saved indices/probabilities;
    naive: the (B, H, L, S) scores and their sort)."""
    row = run_memory(bench_case, provider)
    print(f"\n{bench_case.id} {provider}: peak {row.peak_bytes / MIB:.1f} MiB, returned {row.kept_bytes / MIB:.1f} MiB, "
          f"one call {row.median_s:.2f} s")
    record_property("peak_mib", row.peak_bytes / MIB)
