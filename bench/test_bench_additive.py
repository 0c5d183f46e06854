"""Benchmarks of ``additive_attention``: the cases and providers of ``fastattn.bench``'s "additive" operation
(fastattn/bench/ops/additive.py: the fused CPU kernel against the naive reference, which builds the
(B, H, L, S, D) tanh tensor).

    pytest bench/test_bench_additive.py                                  # L = S = 512, 2048
    pytest bench/test_bench_additive.py --bench-suite full               # and 8192
    pytest -s bench/test_bench_additive.py --bench-suite memory          # peak memory, fresh process per call
"""
from fastattn.bench import MIB

OPERATION = "additive"


def test_additive(bench_case, provider, run_bench):
    run_bench(bench_case, provider)


def test_additive_memory(bench_case, provider, run_memory, record_property):
    """Peak memory above the inputs of one call (fresh process); the fused kernel's working memory is
    O(L + S): a few copies of the inputs plus the per-thread row buffers, never anything like L * S * D."""
    row = run_memory(bench_case, provider)
    figures = dict(peak_mib=row.peak_bytes / MIB, kept_mib=row.kept_bytes / MIB, seconds=row.median_s)
    for k, v in figures.items():
        record_property(k, v)
    print(f"\n{bench_case.id} {provider}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    if provider.startswith("fastattn"):
        c = bench_case
        io = c.B * c.H * (c.L + c.S) * (c.E + c.ev) * 4
        assert row.peak_bytes < 8 * io + 32 * MIB, f"fused peak {row.peak_bytes / MIB:.1f} MiB for L=S={c.L}"
