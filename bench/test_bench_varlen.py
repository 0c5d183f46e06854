"""Benchmarks of ``varlen_attention`` (packed batches) against padding: the cases and providers of
``fastattn.bench``'s "varlen" operation (fastattn/bench/ops/varlen.py: B=16 sequences of at most 512
tokens, H=12, E=64; varlen on the packed tokens, fastattn and torch SDPA on the padded batch).

    pytest bench/test_bench_varlen.py --benchmark-columns=median,iqr -q
"""
OPERATION = "varlen"


def test_varlen(bench_case, provider, run_bench):
    run_bench(bench_case, provider)
