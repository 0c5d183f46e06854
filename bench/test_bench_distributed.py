"""Scaling of context-parallel attention (``fastattn.distributed``): world sizes 1, 2, 4 as gloo processes.

Each case spawns its own processes, so this does not use the pytest-benchmark fixture; the rows are
printed (-s) and stored as junit properties. Same code as ``python -m fastattn.distributed --bench``
(see fastattn/distributed/README.md); ``--bench-suite full`` runs the longer sequence.
"""
from __future__ import annotations

import pytest

from fastattn import _launchers
from fastattn.distributed import bench as db

SUITES = {
    "quick": [db.Config(N=2048, mode="fwd+bwd", rounds=3), db.Config(N=2048, mode="fwd", causal=False, rounds=3)],
    "full": [db.Config(N=8192, mode="fwd+bwd", rounds=5), db.Config(N=8192, H=8, Hk=2, mode="fwd+bwd", rounds=5)],
}


def _configs(suite: str):
    return SUITES["quick"] + (SUITES["full"] if suite == "full" else [])


@pytest.mark.parametrize("i", range(len(SUITES["quick"]) + len(SUITES["full"])))
def test_distributed_scaling(i, request, record_property):
    ok, why = _launchers.cpu_available()
    if not ok:
        pytest.skip(why)
    suite = request.config.getoption("--bench-suite", default="quick")
    configs = _configs(suite if suite in SUITES else "quick")
    if i >= len(configs):
        pytest.skip(f"config {i} runs with --bench-suite full")
    cfg = configs[i]
    rows = db.run(cfg, worlds=(1, 2, 4))
    print("\n" + db.table(cfg, rows))
    for r in rows:
        record_property(f"{r.strategy}-W{r.world}-median_ms", round(r.median_s * 1e3, 3))
        record_property(f"{r.strategy}-W{r.world}-speedup", round(r.speedup, 3))
        assert r.median_s > 0
