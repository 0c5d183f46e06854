"""Shared cores: `fastattn bench --contend N` (fastattn/bench/contend.py) starts and stops its spinner processes,
and the CPU kernels give the same bits while other processes hold the cores (csrc/parallel.h)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import fastattn
from fastattn import _launchers, cli
from fastattn import bench as fb
from fastattn.bench import contend

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")

TINY = fb.Settings(warmup_s=0.0, min_round_s=0.001, rounds=3, min_rounds=3, max_case_s=0.2, ceiling_n=256)


def _gone(pid: int) -> bool:
    """No such process, or a zombie (exited, waiting for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _children() -> set[int]:
    """Live processes whose parent is this one."""
    me, out = str(os.getpid()), set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me and fields[0] != "Z":
                out.add(int(d))
    return out


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


# ------------------------------------------------------------------------------------------ spinners
def test_spinners_start_spin_and_stop():
    before = _children()
    t0 = time.monotonic()
    with contend.spinners(2) as pids:
        assert len(pids) == 2 and set(pids) <= _children()
        ticks = {p: _cpu_ticks(p) for p in pids}
        time.sleep(0.3)
        busy = [p for p in pids if _cpu_ticks(p) > ticks[p]]
        assert busy, "no spinner used any CPU time"
    assert all(_gone(p) for p in pids), "a spinner outlived the block"
    assert _children() <= before
    assert time.monotonic() - t0 < 10


def test_spinners_stop_when_the_block_raises():
    with pytest.raises(KeyError):
        with contend.spinners(1) as pids:
            raise KeyError("boom")
    assert all(_gone(p) for p in pids)


def test_zero_spinners_and_bad_counts():
    with contend.spinners(0) as pids:
        assert pids == []
    with pytest.raises(ValueError, match=">= 0"):
        with contend.spinners(-1):
            pass


_ORPHAN = """
import sys, time
from fastattn.bench import contend
with contend.spinners(2) as pids:
    print(*pids, flush=True)
    time.sleep(60)
"""


def test_spinners_end_when_their_parent_is_killed():
    """A benchmark killed with SIGKILL cannot stop its spinners: they notice the new parent and exit."""
    p = subprocess.Popen([sys.executable, "-c", _ORPHAN], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in p.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
    deadline = time.monotonic() + 10
    while not all(_gone(x) for x in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [x for x in pids if not _gone(x)]
    for x in left:  # do not leave them spinning if the check fails
        os.kill(x, signal.SIGKILL)
    assert not left, f"spinners {left} still running 10 s after their parent died"


def test_ideal_slowdown():
    assert contend.ideal_slowdown(2, 0, 2) == 1.0
    assert contend.ideal_slowdown(2, 1, 2) == pytest.approx(1.5)
    assert contend.ideal_slowdown(2, 2, 2) == pytest.approx(2.0)
    assert contend.ideal_slowdown(1, 1, 2) == 1.0  # a free core for the spinner
    assert contend.ideal_slowdown(4, 2, 2) == pytest.approx(1.5)  # oversubscribed already


# ------------------------------------------------------------------------------------------ the bench mode
def test_run_contended_report():
    case = fb.Case("sdpa", 2, 2, 16, 16, 8, suites=("quick",), family="test")
    report = contend.run_contended([case], 1, ["torch", "reference"], TINY, progress=False)
    rows = {r["provider"]: r for r in report["rows"]}
    assert set(rows) == {"torch", "reference"}
    for r in rows.values():
        assert r["status"] == "ok" and r["quiet_s"] > 0 and r["busy_s"] > 0
    assert report["spinners"] == 1 and report["ideal_slowdown"] >= 1.0
    table = contend.format_contend_table(report)
    assert "1 spinner" in table and "slowdown" in table and "B2 H2 L16 E8" in table
    assert "ideal slowdown" in contend.format_contend_summary(report)
    assert "|" in contend.format_contend_table(report, markdown=True)


def test_cli_contend(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fb.timing, "QUICK", TINY)
    before = _children()
    t0 = time.monotonic()
    out = str(tmp_path / "res")
    args = ["bench", "--contend", "1", "--filter", "sdpa-cpu-B16-H12-L64-E32-f32-fwd", "--mode", "fwd",
            "--provider", "torch", "--out", out]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "B16 H12 L64 E32" in text and "1 spinner" in text and "slowdown" in text and "load average" in text
    assert os.path.exists(os.path.join(out, "contend.json")) and os.path.exists(os.path.join(out, "contend.md"))
    assert _children() <= before, "spinner processes left behind"
    assert time.monotonic() - t0 < 60
    assert cli.main(["bench", "--contend", "-1", "--filter", "L64-E32-f32-fwd", "--out", out]) == 2


# ------------------------------------------------------------------------------------------ kernels
def _calls():
    """(name, fn) pairs: forward + backward of each CPU kernel on small awkward shapes; fn returns tensors."""
    g = torch.Generator().manual_seed(7)

    def r(*shape, grad=True):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    def grads(out, *leaves):
        return [out.detach(), *torch.autograd.grad(out, leaves, torch.ones_like(out))]

    q, k, v = r(3, 4, 97, 40), r(3, 2, 75, 40), r(3, 2, 75, 24)
    mask = torch.randn(3, 1, 97, 75, generator=g).requires_grad_()
    qv, kv, vv = r(70, 4, 32), r(90, 4, 32), r(90, 4, 32)
    cu_q, cu_k = torch.tensor([0, 30, 31, 70], dtype=torch.int32), torch.tensor([0, 50, 60, 90], dtype=torch.int32)
    qa, ka, va, w = r(2, 3, 40, 16), r(2, 3, 33, 16), r(2, 3, 33, 8), r(3, 16)
    qh, kh, vh = r(2, 4, 50, 32), r(2, 4, 61, 32), r(2, 4, 61, 32)
    return [
        ("sdpa", lambda: grads(fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True,
                                                                     backend="cpu"), q, k, v, mask)),
        ("sdpa-causal", lambda: grads(fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                                            backend="cpu"), q, k, v)),
        ("varlen", lambda: grads(fastattn.varlen_attention(qv, kv, vv, cu_q, cu_k, 40, 50, is_causal=True,
                                                           backend="cpu"), qv, kv, vv)),
        ("additive", lambda: grads(fastattn.additive_attention(qa, ka, va, w, backend="cpu"), qa, ka, va, w)),
        ("hard", lambda: grads(fastattn.hard_attention(qh, kh, vh, top_k=3, backend="cpu"), qh, kh, vh)),
    ]


@pytest.mark.skipif(not _launchers.cpu_available()[0], reason="the C++ CPU kernels are not built")
def test_kernels_give_the_same_bits_while_the_cores_are_busy():
    """Two kernel threads with two other processes spinning on the cores (threads descheduled, loops moved
    between teams, workers that never join) give the bits one thread gives on a quiet machine."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = {name: fn() for name, fn in _calls()}
        torch.set_num_threads(2)
        with contend.spinners(2):
            for _ in range(4):
                for name, fn in _calls():
                    got = fn()
                    for i, (a, b) in enumerate(zip(got, want[name])):
                        assert torch.equal(a, b), f"{name}: output {i} differs under contention"
    finally:
        torch.set_num_threads(before)


def _thread_affinities() -> dict[int, set[int]]:
    """Affinity of every thread of this process but the kernels' own workers (named fastattn-pool)."""
    out = {}
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                if f.read().strip() == "fastattn-pool":
                    continue
            out[int(t)] = os.sched_getaffinity(int(t))
        except OSError:  # the thread ended meanwhile
            pass
    return out


@pytest.mark.skipif(not _launchers.cpu_available()[0], reason="the C++ CPU kernels are not built")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_threads_the_kernels_do_not_own_keep_their_affinity():
    """With the cores shared, the kernels move a thread of a loop off the CPU where another thread of the same
    loop runs (csrc/parallel.h): their own workers for good, torch's OpenMP threads only for the loop. So the
    caller and torch's threads end every call with the affinity they had."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        x = torch.randn(512, 512)
        (x @ x).sum()  # torch's OpenMP team exists from here on
        theirs = _thread_affinities()
        with contend.spinners(2):
            for _ in range(6):
                for _name, fn in _calls():
                    fn()
                (x @ x).sum()
        after = _thread_affinities()
        for tid, cpus in theirs.items():
            if tid in after:
                assert after[tid] == cpus, f"thread {tid}: affinity {sorted(cpus)} became {sorted(after[tid])}"
    finally:
        torch.set_num_threads(before)
