"""Benchmarks of ``scaled_dot_product_attention``: every case of ``fastattn.bench``'s "sdpa" operation
against every provider (fastattn's backends, torch SDPA, the naive reference, flash_attn / xformers
when installed). See bench/README.md."""
from fastattn.bench import MIB

OPERATION = "sdpa"


def test_sdpa(bench_case, provider, run_bench):
    run_bench(bench_case, provider)


def test_sdpa_memory(bench_case, provider, run_memory, record_property):
    """Peak memory above the inputs for one long causal call (collected with --bench-suite memory or
    full); fastattn must stay within the case's budget. Figures: printed (-s) and in junit properties."""
    row = run_memory(bench_case, provider)
    figures = dict(peak_mib=row.peak_bytes / MIB, kept_mib=row.kept_bytes / MIB,
                   extra_mib=row.extra_bytes / MIB, seconds=row.median_s)
    for k, v in figures.items():
        record_property(k, v)
    print(f"\n{bench_case.id} {provider}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    limit = bench_case.mem_limit_mib
    if provider.startswith("fastattn") and limit is not None:
        assert row.extra_bytes < limit * MIB, (
            f"{bench_case.id} {provider}: {row.extra_bytes / MIB:.1f} MiB extra (peak {row.peak_bytes / MIB:.1f} "
            f"- returned {row.kept_bytes / MIB:.1f}) >= {limit} MiB")
