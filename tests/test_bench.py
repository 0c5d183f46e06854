"""The benchmark machinery (fastattn.bench, `fastattn bench`) on tiny shapes, so it cannot rot:
FLOP formula, timing, JSON round trip, --compare, tables, plots, the CLI, adding an operation, and one tiny
case of every registered operation through fastattn's own provider (the plumbing, never a timing)."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from fastattn import _launchers, cli, reference
from fastattn import bench as fb
from fastattn.bench.ops import sdpa as bench_sdpa

TINY = fb.Settings(warmup_s=0.0, min_round_s=0.001, rounds=3, min_rounds=3, max_case_s=0.2, ceiling_n=256)


def tiny_case(**kw) -> fb.Case:
    base = dict(op="sdpa", B=2, H=2, L=16, S=16, E=8, suites=("quick",), family="test")
    base.update(kw)
    return fb.Case(**base)


# ------------------------------------------------------------------------------------------ FLOPs
@pytest.mark.parametrize("L,S", [(1, 1), (5, 5), (7, 3), (3, 7), (16, 16), (0, 4)], ids=lambda v: str(v))
def test_visible_pairs_counts_the_causal_mask(L, S):
    visible = torch.ones(L, S, dtype=torch.bool).tril()
    assert fb.visible_pairs(L, S, causal=True) == int(visible.sum())
    assert fb.visible_pairs(L, S, causal=False) == L * S


def test_flop_formula():
    B, H, L, S, E = 8, 12, 512, 384, 64
    fwd = fb.attention_flops(H, E, E, [L] * B, [S] * B)
    assert fwd == 4 * B * H * L * S * E
    assert fb.attention_flops(H, E, E, [L] * B, [S] * B, mode="bwd") == 2.5 * fwd
    assert fb.attention_flops(H, E, E, [L] * B, [S] * B, mode="fwd+bwd") == 3.5 * fwd
    assert fb.attention_flops(H, E, 32, [L] * B, [S] * B) == 2 * (E + 32) * B * H * L * S
    causal = fb.attention_flops(H, E, E, [L] * B, [L] * B, causal=True)
    assert causal == 4 * B * H * E * L * (L + 1) // 2
    with pytest.raises(ValueError, match="one entry per batch element"):
        fb.attention_flops(H, E, E, [L] * B, [S] * (B - 1))


def test_padded_case_counts_real_keys_only():
    c = tiny_case(B=8, L=64, S=64, mask="pad")
    assert c.key_lengths() == [64] * 4 + [16] * 4
    assert fb.case_flops(c) == 4 * c.H * c.E * 64 * (4 * 64 + 4 * 16)
    x = fb.OPERATIONS["sdpa"].inputs(c, False)
    assert x["attn_mask"].shape == (8, 1, 1, 64)
    assert x["attn_mask"].sum(-1).flatten().tolist() == c.key_lengths()


def test_case_ids_and_round_trip():
    c = tiny_case(dtype="bf16", mode="fwd+bwd", causal=True, mask="pad", Hk=1, Ev=4)
    assert c.id == "sdpa-cpu-B2-H2_1-L16-E8_4-bf16-fwd+bwd-causal-pad"
    assert c.shape == "B2 H2/1 L16 E8/4" and c.variant == "fwd+bwd causal pad"
    assert fb.Case.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    ids = [c.id for c in fb.OPERATIONS["sdpa"].cases()]
    assert len(ids) == len(set(ids)), "case ids must be unique (they key --compare)"


def test_quick_suite_covers_issue2_targets():
    quick = fb.select_cases(["sdpa"], ["quick"], devices=["cpu"])
    for B, H, L, E in bench_sdpa.CPU_TARGET_SHAPES:
        got = {(c.dtype, c.variant) for c in quick if (c.B, c.H, c.L, c.E) == (B, H, L, E)}
        assert {("f32", "fwd"), ("bf16", "fwd"), ("f32", "fwd pad"), ("f32", "fwd+bwd")} <= got
    mem = fb.select_cases(["sdpa"], ["memory"], devices=["cpu"])
    assert any(c.L == 16384 and c.causal and c.mem_limit_mib == 64 for c in mem)


# ------------------------------------------------------------------------------------ measuring
def test_time_interleaved_orders_calls():
    import time
    t = fb.time_interleaved({"fast": lambda: None, "slow": lambda: time.sleep(0.002)}, TINY)
    assert t["slow"].median > t["fast"].median
    assert t["slow"].rounds >= 3 and t["slow"].q1 <= t["slow"].median <= t["slow"].q3


def test_providers_agree_on_a_tiny_case():
    op = fb.OPERATIONS["sdpa"]
    c = tiny_case(causal=True, mask="pad")
    x = op.inputs(c, False)
    want = reference.scaled_dot_product_attention(**x, upcast=True)
    for name in ("torch", "reference"):
        got = op.provider(name).fn(x)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


@pytest.mark.skipif(fb.cpu_memory_supported() is not None, reason="needs Linux RSS high-water mark")
def test_peak_memory_sees_an_allocation():
    peak, kept = fb.peak_memory(lambda: torch.ones(16 * fb.MIB // 4), "cpu")
    assert kept == 16 * fb.MIB
    assert 15 * fb.MIB <= peak <= 20 * fb.MIB


@pytest.fixture(scope="module")
def report():
    cases = [tiny_case(), tiny_case(mode="fwd+bwd"), tiny_case(mask="pad", dtype="bf16")]
    return fb.run(cases, ["torch", "reference", "fastattn-triton"], TINY, progress=False, command="test")


def test_run_report(report):
    rows = fb.results_of(report)
    assert {(r.provider, r.status) for r in rows if r.ok} == {("torch", "ok"), ("reference", "ok")}
    assert not [r for r in rows if r.provider == "fastattn-triton"], "GPU providers have no rows for CPU cases"
    naive = fb.run_case(tiny_case(B=64, H=64, L=512, S=512), ["reference"], TINY)  # too big: skipped, not run
    assert naive[0].status.startswith("skipped: naive scores would need")
    for r in rows:
        if r.ok:
            assert r.median_s > 0 and r.flops_per_s == pytest.approx(r.flops / r.median_s)
            assert r.speedup is not None and r.ceiling_frac is not None
    assert {r.speedup for r in rows if r.provider == "torch"} == {1.0}
    assert set(report["ceilings"]) == {"cpu/f32", "cpu/bf16"}
    assert report["machine"]["torch_threads"] == torch.get_num_threads()


def test_json_round_trip_and_compare(report, tmp_path):
    path = str(tmp_path / "r.json")
    fb.save_report(report, path)
    back = fb.load_report(path)
    assert back == json.loads(json.dumps(report))
    assert fb.results_of(back) == fb.results_of(report)
    same = fb.compare_reports(back, report)
    assert same and all(c.verdict == "same" for c in same if c.kind == "time")
    # Noise-free copies: a baseline measured on a busy machine can have an IQR wider than 3x its median,
    # and compare_reports rightly calls a change inside the noise "same".
    base = json.loads(json.dumps(report))
    for r in base["results"]:
        if r["median_s"]:
            r["q1_s"], r["q3_s"] = r["median_s"], r["median_s"]
    slower = json.loads(json.dumps(base))
    for r in slower["results"]:
        if r["provider"] == "torch" and r["median_s"]:
            r["median_s"] *= 3
            r["q1_s"], r["q3_s"] = r["median_s"], r["median_s"]
    changes = fb.compare_reports(base, slower)
    assert {c.verdict for c in changes if c.provider == "torch" and c.kind == "time"} == {"regression"}
    text = fb.format_compare(changes)
    assert "regression" in text and "+200.0%" in text
    with pytest.raises(ValueError, match="not a fastattn bench report"):
        (tmp_path / "bad.json").write_text("{}")
        fb.load_report(str(tmp_path / "bad.json"))


def test_report_formats(report, tmp_path):
    """Reports are written in format 2 (rows with read_bw); format-1 files (before read_bw) still load and compare,
    and an unknown format is turned away by name."""
    assert report["format"] == 2
    old = json.loads(json.dumps(report))
    old["format"] = 1
    for r in old["results"]:
        del r["read_bw"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    back = fb.load_report(str(path))
    assert [r.read_bw for r in fb.results_of(back)] == [None] * len(back["results"])
    assert fb.compare_reports(back, report)
    newer = dict(old, format=3)
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    with pytest.raises(ValueError, match=r"format 1 or 2"):
        fb.load_report(str(tmp_path / "newer.json"))


def test_tables(report):
    text = fb.format_table(report)
    header = text.splitlines()[0].split()
    assert header[:6] == ["op", "dev", "shape", "dtype", "variant", "provider"]
    assert "GFLOP/s" in header and "x" in header and "torch" in header
    assert "B2 H2 L16 E8" in text and "reference" in text and "1.00x" in text
    md = fb.format_table(report, markdown=True)
    assert md.startswith("| op | dev |") and md.count("\n") >= 3
    assert "geomean" in fb.format_summary(report)
    assert "threads" in fb.format_header(report) and "matmul ceiling" in fb.format_header(report)


def test_plots(report, tmp_path):
    pytest.importorskip("matplotlib")
    files = fb.plot(report, str(tmp_path))
    assert [os.path.basename(f) for f in files] == ["throughput.png", "speedup.png"]
    assert all(os.path.getsize(f) > 1000 for f in files)


def test_memory_table_verdict():
    c = tiny_case(mem_limit_mib=64.0, suites=("memory",))
    r = fb.Result(c.to_dict(), c.id, "fastattn-cpu", kind="memory", median_s=1.0, peak_bytes=80 * fb.MIB,
                  kept_bytes=20 * fb.MIB)
    text = fb.format_memory_table({"results": [dataclasses.asdict(r)]})
    assert "60.0 MiB" in text and "ok" in text.split()


# ------------------------------------------------------------------------- fastattn's own providers
# (op, Case fields over tiny_case's, the provider fastattn-cpu's output is checked against, in float32)
TINY_OPS = [
    ("sdpa", dict(causal=True, mask="pad"), "reference"),
    ("sdpa", dict(mode="fwd+bwd", Hk=1), "reference"),
    ("additive", dict(E=8, Ev=16), "reference"),
    ("additive", dict(E=8, Ev=16, mode="fwd+bwd"), "reference"),
    ("varlen", dict(B=4, L=32, S=32, mask="bert"), None),
    ("varlen", dict(B=4, L=32, S=32, mask="short", mode="fwd+bwd"), None),
    ("hard", dict(top_k=3), "reference"),
    ("decode", dict(H=4, Hk=2, L=1, S=77, E=8), "reference"),
    ("decode", dict(B=1, H=2, L=1, S=40, E=16, dtype="bf16"), "reference"),
]


@pytest.mark.skipif(not _launchers.cpu_available()[0], reason="the C++ CPU kernels are not built")
@pytest.mark.parametrize("op,fields,against", TINY_OPS, ids=[tiny_case(op=o, **f).id for o, f, _ in TINY_OPS])
def test_fastattn_provider_runs_a_tiny_case(op, fields, against):
    """Every provider of the operation runs the case through run_case (timing, backward for fwd+bwd, memory),
    and fastattn-cpu computes what the provider it is checked against computes on the same inputs."""
    c = tiny_case(op=op, **fields)
    rows = {r.provider: r for r in fb.run_case(c, None, TINY)}
    assert "fastattn-cpu" in rows, f"{op} has no fastattn-cpu provider"
    for name, r in rows.items():
        assert r.ok, f"{c.id} {name}: {r.status}"
        assert r.median_s > 0 and r.flops > 0
        assert r.peak_bytes is not None or fb.cpu_memory_supported() is not None
    o = fb.OPERATIONS[op]
    x = o.inputs(c, False)
    got = o.provider("fastattn-cpu").fn(x)
    if against is not None:
        tol = 1e-5 if c.dtype == "f32" else 1e-2
        torch.testing.assert_close(got.float(), o.provider(against).fn(x).float(), atol=tol, rtol=tol)
        if op == "decode":  # the kv-cache layouts hold the same keys: the same rows, (B, L, H, Ev)
            for name in ("fastattn-kvcache", "fastattn-paged"):
                torch.testing.assert_close(o.provider(name).fn(x).transpose(1, 2).float(), got.float(),
                                           atol=tol, rtol=tol)
    else:  # varlen: the packed output holds the padded batch's real rows
        padded = o.provider("fastattn-cpu-padded").fn(x)
        torch.testing.assert_close(padded, o.provider("torch").fn(x), atol=1e-5, rtol=1e-5)
        real = x["attn_mask"].view(c.B, c.S)
        torch.testing.assert_close(got, padded.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not _launchers.cpu_available()[0], reason="the C++ CPU kernels are not built")
def test_decode_rows_report_bytes_and_read_bandwidth(capsys, monkeypatch, tmp_path):
    """The decode family's rows carry the bytes of K and V read, GB/s and the share of the read bandwidth
    probed in the case's own rounds (one value per case, the same for its rows); the tables and the summary
    show them."""
    c = tiny_case(op="decode", H=4, Hk=2, L=1, S=64, E=8)
    assert fb.OPERATIONS["decode"].bytes_read(c) == c.B * 2 * 64 * (8 + 8) * 4
    rep = fb.run([c], None, TINY, progress=False, measure_memory=False, command="test")
    assert rep["read_bandwidth"]["cpu"] > 0
    rows = {r.provider: r for r in fb.results_of(rep)}
    assert {"torch", "fastattn-cpu", "fastattn-kvcache", "fastattn-paged", "reference"} <= set(rows)
    for r in rows.values():
        assert r.ok and r.bytes_read == c.B * 2 * 64 * 16 * 4
        assert r.bytes_per_s == pytest.approx(r.bytes_read / r.median_s)
        assert r.read_bw == rows["torch"].read_bw and r.read_bw > 0
        assert r.bandwidth_frac == pytest.approx(r.bytes_per_s / r.read_bw)
    assert "read bandwidth probe" not in rows
    table = fb.format_bandwidth_table(rep)
    assert "% read bw" in table.splitlines()[0] and "fastattn-cpu" in table
    assert "read bandwidth" in fb.format_summary(rep) and "read bandwidth cpu" in fb.format_header(rep)
    assert fb.format_bandwidth_table(fb.run([tiny_case()], ["torch"], TINY, progress=False,
                                            measure_memory=False)) == ""
    # The CLI runs the family when named (it is not in the default run) and prints the bandwidth table.
    monkeypatch.setattr(fb.timing, "QUICK", TINY)
    assert cli.main(["bench", "--op", "decode", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "decode-cpu-B1-H32_8-L1-S4096-E128-bf16-fwd" in listed and "5 case(s)" in listed


@pytest.mark.skipif(not _launchers.cpu_available()[0], reason="the C++ CPU kernels are not built")
def test_read_probe_is_timed_beside_the_providers(monkeypatch):
    """With a probe for the device, a memory-bound case times it in its own rounds and compares every row with
    it (not with the run's figure), and the probe never becomes a row; without one, the run's figure is used; a
    failure in the rounds is reported in the rows."""
    import time

    bench_run = sys.modules["fastattn.bench.run"]  # the module (fastattn.bench.run is also the function's name)

    class SlowProbe:  # reads 1 GB in at least 2 ms: at most 500 GB/s
        nbytes = 1e9

        def call(self):
            time.sleep(0.002)

    c = tiny_case(op="decode", H=4, Hk=2, L=1, S=64, E=8)
    rows = fb.run_case(c, ["torch", "fastattn-cpu"], TINY, measure_memory=False, bandwidths={"cpu": 1.0},
                       probes={"cpu": SlowProbe()})
    assert [r.provider for r in rows] == ["torch", "fastattn-cpu"]
    for r in rows:
        assert r.ok and 1e9 / 0.5 <= r.read_bw <= 1e9 / 0.002 and r.read_bw == rows[0].read_bw
        assert r.bandwidth_frac == pytest.approx(r.bytes_per_s / r.read_bw)
    rows = fb.run_case(c, ["torch"], TINY, measure_memory=False, bandwidths={"cpu": 2e10})
    assert rows[0].read_bw == 2e10 and rows[0].bandwidth_frac == pytest.approx(rows[0].bytes_per_s / 2e10)

    def broken(calls, *a, **k):
        assert "read bandwidth probe" in calls
        raise RuntimeError("rounds failed")
    monkeypatch.setattr(bench_run, "time_interleaved", broken)
    rows = fb.run_case(c, ["torch", "fastattn-cpu"], TINY, measure_memory=False, probes={"cpu": SlowProbe()})
    assert [(r.provider, r.status) for r in rows] == [(p, "error: RuntimeError: rounds failed")
                                                     for p in ("torch", "fastattn-cpu")]


def test_default_run_is_sdpa_and_case_ids_are_unique():
    assert {c.op for c in fb.select_cases(None, ["quick", "full", "memory"])} == {"sdpa"}
    for name in fb.OPERATIONS:
        for suites in (["quick", "full"], ["memory"]):
            ids = [c.id for c in fb.select_cases([name], suites)]
            assert len(ids) == len(set(ids)), f"{name}: case ids must be unique (they key --compare)"


# ---------------------------------------------------------------------------------- extensibility
def test_adding_an_operation_takes_a_few_lines():
    def cases():
        return [fb.Case("toy_matmul", 1, 1, 8, 8, 4, suites=("quick",))]

    op = fb.Operation(
        name="toy_matmul", description="q @ k^T", cases=cases,
        inputs=lambda c, rg: dict(q=torch.randn(c.L, c.E, requires_grad=rg), k=torch.randn(c.S, c.E, requires_grad=rg)),
        providers=[fb.Provider("torch", lambda x: x["q"] @ x["k"].T)],
        flops=lambda c: 2.0 * c.L * c.S * c.E, grad_inputs=("q", "k"))
    fb.register(op)
    try:
        rep = fb.run(fb.select_cases(["toy_matmul"], ["quick"]), settings=TINY, progress=False, measure_memory=False)
        (row,) = fb.results_of(rep)
        assert row.ok and row.flops == 2 * 8 * 8 * 4 and row.speedup == 1.0
    finally:
        del fb.OPERATIONS["toy_matmul"]


# ------------------------------------------------------------------------------------------ CLI
def test_cli_bench(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fb.timing, "QUICK", TINY)
    out = str(tmp_path / "res")
    args = ["bench", "--filter", "sdpa-cpu-B16-H12-L64-E32-f32-fwd", "--mode", "fwd", "--provider", "torch",
            "--provider", "reference", "--out", out, "--no-plot"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "B16 H12 L64 E32" in text and "x torch" in text and "matmul ceiling" in text
    assert os.path.exists(os.path.join(out, "results.json")) and os.path.exists(os.path.join(out, "table.md"))
    assert cli.main(args + ["--compare", os.path.join(out, "results.json")]) == 0
    assert "compared" in capsys.readouterr().out
    assert cli.main(["bench", "--list", "--full"]) == 0
    assert "sdpa-cpu-B1-H4-L16384-E64-f32-fwd-causal" in capsys.readouterr().out


def test_import_is_lazy():
    # torch itself may import tqdm (torch.hub does when it is installed): only count what we add.
    code = ("import sys, torch; before = set(sys.modules); import fastattn.bench, fastattn.cli; "
            "new = set(sys.modules) - before; "
            "assert not any(m.split('.')[0] in ('matplotlib', 'tqdm') for m in new), new; "
            "assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
