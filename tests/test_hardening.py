"""Hardening: threads, forked workers, tensors over 2^31 elements, no leaks, non-finite inputs.

Extends tests/test_cpu_kernel.py (which has: 1 vs N threads agree for the forward, three Python threads
calling the forward, one fork after the pool was used) with backward, the public API, thread-count
sweeps, the GIL, DataLoader workers and forks while another thread is inside the kernel.
Shape legend: B batch, H query heads, Hk key/value heads, L query length, S key length, E head dim.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import sys
import threading
import time

import pytest
import torch

import fastattn
from fastattn import _cpu, reference, testing
from fastattn._ops import attention_fwd
from fastattn._normalise import needs_out_lo
from conftest import make_qkv, triton_kernels

F32, BF16 = torch.float32, torch.bfloat16
SANITIZED = os.environ.get("FASTATTN_SANITIZE", "0") == "1"


def _qkv(B, H, Hk, L, S, E, Ev, dtype=F32, seed=0, bshd=False):
    return make_qkv(B, H, Hk, L, S, E, Ev, dtype, gen=torch.Generator().manual_seed(seed), bshd=bshd)


def _fwd_bwd(q, k, v, mask=None, *, dropout_p=0.0, seed=0, backend="cpu", **kw):
    """(out, dq, dk, dv[, dmask]) through the public API with a fixed dout; dropout seeded by ``seed``."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    m = mask
    if mask is not None and mask.dtype != torch.bool:
        m = mask.detach().clone().requires_grad_()
    gen = torch.Generator().manual_seed(seed)
    if dropout_p > 0:
        # The public API draws the dropout seed from torch's global generator, which Python threads
        # share (a race by design): call the op with an explicit seed instead.
        scale = 1.0 / math.sqrt(q.shape[-1])
        out, _, _ = attention_fwd(*leaves, m, scale, kw.get("is_causal", False), False, dropout_p,
                                  torch.tensor(seed, dtype=torch.int64), backend,
                                  needs_out_lo(q.dtype, *leaves, m))  # as the public function sets it
    else:
        out = fastattn.scaled_dot_product_attention(*leaves, m, backend=backend, **kw)
    dout = torch.randn(out.shape, generator=gen).to(out.dtype)
    wrt = leaves + ([m] if m is not None and m.requires_grad else [])
    return (out.detach(), *torch.autograd.grad(out, wrt, dout))


def _same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"result {i} differs: max {(x.double() - y.double()).abs().max().item():.3e}"


# ============================================================================================ threads
_THREAD_CASES = [
    dict(shape=(2, 4, 2, 70, 90, 40, 24), dtype=F32, causal=True, gqa=True, mask="float", p=0.0),
    dict(shape=(1, 3, 3, 33, 130, 64, 64), dtype=BF16, causal=False, gqa=False, mask="bool", p=0.2),
    dict(shape=(3, 2, 1, 17, 17, 16, 8), dtype=F32, causal=False, gqa=True, mask=None, p=0.5),
]


def _thread_case(c, seed=0):
    B, H, Hk, L, S, E, Ev = c["shape"]
    q, k, v = _qkv(B, H, Hk, L, S, E, Ev, c["dtype"], seed=seed, bshd=seed % 2 == 1)
    g = torch.Generator().manual_seed(seed + 100)
    mask = None
    if c["mask"] == "float":
        mask = torch.randn(B, 1, L, S, generator=g)
    elif c["mask"] == "bool":
        mask = torch.rand(1, H, L, S, generator=g) > 0.3
    return (q, k, v, mask), dict(dropout_p=c["p"], seed=seed, is_causal=c["causal"], enable_gqa=c["gqa"])


def test_many_python_threads_fwd_bwd_match_single_thread():
    """Eight Python threads run forward + backward (all cases, several seeds) at once; every result is
    bit-identical to the same call made alone. Concurrent calls share one pool (the loser runs inline)."""
    jobs = [(c, s) for c in _THREAD_CASES for s in range(3)]
    want = [_fwd_bwd(*_thread_case(c, s)[0], **_thread_case(c, s)[1]) for c, s in jobs]
    errors, done = [], []

    def work(offset):
        try:
            for r in range(2):
                for n in range(len(jobs)):
                    i = (n + offset + r) % len(jobs)
                    args, kw = _thread_case(*jobs[i])
                    _same(_fwd_bwd(*args, **kw), want[i])
                    done.append(i)
        except BaseException as e:  # noqa: BLE001 - report in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    assert len(done) == 8 * 2 * len(jobs)


@pytest.mark.parametrize("nt", [1, 2, 3, 7])
def test_results_bit_identical_across_thread_counts(nt):
    """torch.set_num_threads(n): forward and backward give the same bits as one thread (the kernels split
    work, never reductions, across threads). 7 threads on 2 cores: oversubscribed still works."""
    before = torch.get_num_threads()
    try:
        for c in _THREAD_CASES:
            args, kw = _thread_case(c, 1)
            torch.set_num_threads(1)
            want = _fwd_bwd(*args, **kw)
            torch.set_num_threads(nt)
            _same(_fwd_bwd(*args, **kw), want)
    finally:
        torch.set_num_threads(before)


def test_params_follow_torch_num_threads():
    mod = _cpu.module()
    q, k, v = _qkv(1, 1, 1, 4, 4, 8, 8)
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 5):
            torch.set_num_threads(n)
            p = _cpu.make_params(mod, q, k, v, None, scale=1.0, is_causal=False, dropout_p=0.0, seed=0)
            assert p.num_threads == n
    finally:
        torch.set_num_threads(before)


def _task_cpu_ticks() -> dict[int, int]:
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks[int(tid)] = int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return ticks


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc for per-thread CPU time")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs")
def test_kernel_uses_the_threads_it_is_given():
    """With 2 threads, two OS threads accumulate CPU time during a long forward; with 1, only the caller."""
    q, k, v = _qkv(1, 4, 4, 1024, 1024, 64, 64)
    before = torch.get_num_threads()

    def busy_threads(n):
        torch.set_num_threads(n)
        fastattn.scaled_dot_product_attention(q[:, :, :64], k, v)  # warm-up: the pool exists
        t0, start = _task_cpu_ticks(), time.perf_counter()
        while time.perf_counter() - start < 0.6:
            fastattn.scaled_dot_product_attention(q, k, v)
        t1 = _task_cpu_ticks()
        return sorted((t1[t] - t0.get(t, 0) for t in t1), reverse=True)

    try:
        two = busy_threads(2)
        one = busy_threads(1)
    finally:
        torch.set_num_threads(before)
    hz = os.sysconf("SC_CLK_TCK")
    # Two threads each did a real share of the work (>= 20% of the busiest one's ticks, at least 30 ms).
    assert two[1] >= max(0.2 * two[0], 0.03 * hz), f"per-thread CPU ticks with 2 threads: {two[:4]}"
    assert one[1] <= 0.2 * one[0] + 0.02 * hz, f"per-thread CPU ticks with 1 thread: {one[:4]}"


def test_gil_is_released_during_the_kernel():
    """While one Python thread is inside a long kernel call, another Python thread keeps running."""
    q, k, v = _qkv(1, 4, 4, 4096, 4096, 64, 64)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        fastattn.scaled_dot_product_attention(q, k, v)
        call = time.perf_counter() - t0
        state = {"running": False, "done": False}

        def kernel():
            state["running"] = True
            fastattn.scaled_dot_product_attention(q, k, v)
            fastattn.scaled_dot_product_attention(q, k, v)
            state["done"] = True

        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        try:
            th = threading.Thread(target=kernel)
            th.start()
            while not state["running"]:
                time.sleep(0)
            gaps, last = [], time.perf_counter()
            while not state["done"]:
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
            th.join()
        finally:
            sys.setswitchinterval(old)
    finally:
        torch.set_num_threads(before)
    # Holding the GIL would freeze this loop for a whole call (~`call` seconds) at least once.
    assert len(gaps) > 100 and max(gaps) < 0.5 * call, f"longest stall {max(gaps):.3f}s, call {call:.3f}s"


def _mapped_openmp_runtimes() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f
                if any(n in line.rsplit("/", 1)[-1] for n in ("libgomp", "libiomp", "libomp"))}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")
def test_kernels_run_on_torchs_openmp_threads():
    """The kernels' threads are torch's OpenMP team (one runtime mapped), so a kernel called right after a
    torch op does not compete for the cores with torch's spin-waiting workers."""
    mod = _cpu.module()
    torch.mm(torch.randn(256, 256), torch.randn(256, 256))  # torch's OpenMP runtime is up
    fastattn.scaled_dot_product_attention(*_qkv(2, 4, 4, 64, 64, 32, 32))
    runtimes = _mapped_openmp_runtimes()
    if mod.pool() != "openmp":
        pytest.skip(f"the kernel module was built without OpenMP (pool {mod.pool()!r})")
    assert len(runtimes) == 1, f"more than one OpenMP runtime mapped: {sorted(runtimes)}"


_POOL_SCRIPT = """
import torch, fastattn
from fastattn import _cpu
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 4, 200, 40, generator=g).requires_grad_() for _ in range(3))
out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
out.backward(torch.randn(out.shape, generator=g))
torch.save([_cpu.module().pool(), out.detach(), q.grad, k.grad, v.grad], {path!r})
"""


@pytest.mark.parametrize("pool", ["own", "default"])
def test_pool_choice_gives_the_same_bits(tmp_path, pool):
    """FASTATTN_POOL=own (our own thread pool) and the default (torch's OpenMP threads) give the same bits."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "FASTATTN_POOL"}
    if pool == "own":
        env["FASTATTN_POOL"] = "own"
    path = str(tmp_path / "r.pt")
    subprocess.run([sys.executable, "-c", _POOL_SCRIPT.format(path=path)], check=True, env=env, timeout=300)
    name, *got = torch.load(path)
    if pool == "own":
        assert name == "own"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 4, 200, 40, generator=g).requires_grad_() for _ in range(3))
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(torch.randn(out.shape, generator=g))
    finally:
        torch.set_num_threads(before)
    _same(got, [out.detach(), q.grad, k.grad, v.grad])


def test_a_stalled_pool_thread_is_moved_to_a_free_cpu_and_gets_its_affinity_back():
    """ThreadPool::rescue: in a loop on the own pool where item 0 holds its thread for 20 ms (as a thread the
    scheduler took off its CPU would), the other thread, out of chunks, moves that thread onto its own CPU and
    sleeps. Every item runs once, and the caller's CPU affinity afterwards is what it was."""
    mod = _cpu.module()
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("a rescue needs two CPUs")
    if os.environ.get("FASTATTN_RESCUE") == "0" or os.environ.get("FASTATTN_SPIN_US") == "0":
        pytest.skip("FASTATTN_RESCUE=0 / FASTATTN_SPIN_US=0 turn the rescue off")
    r = mod.pool_rescue_probe(64, 20000, 50)
    assert r["ran"] == [1] * 64
    assert r["affinity_kept"]
    assert r["rescues"] == 1
    again = mod.pool_rescue_probe(64, 0, 50)  # no item holds its thread
    assert again["ran"] == [1] * 64
    assert again["affinity_kept"]


def test_contend_rounds_example_runs(monkeypatch, capsys):
    """examples/contend_rounds.py (the notes' own-pool figures) runs, with its spinner, and prints its cases."""
    import pathlib
    import runpy
    examples = pathlib.Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))
    monkeypatch.setattr(sys, "argv", ["contend_rounds.py", "--rounds", "1", "--ms", "1"])
    before = torch.get_num_threads()
    try:
        runpy.run_path(str(examples / "contend_rounds.py"), run_name="__main__")
    finally:
        torch.set_num_threads(before)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("1 spinner(s)")
    assert [ln.split()[0] for ln in lines[1:]] == ["B16", "B16", "B8"]


# ------------------------------------------------------------------------------------ forked workers
class _AttentionDataset(torch.utils.data.Dataset):
    """Item i: forward + backward of case i (with 2 kernel threads inside the worker)."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        worker = torch.utils.data.get_worker_info() is not None
        if worker:
            torch.set_num_threads(2)  # DataLoader sets 1 in workers: make the child's kernel pool start threads
        c = _THREAD_CASES[i % len(_THREAD_CASES)]
        args, kw = _thread_case(c, i)
        out = _fwd_bwd(*args, **kw)
        if worker:
            torch.set_num_threads(1)  # see _forked_child_job: torch's OpenMP copy to shared memory
        return out


def test_dataloader_workers_fork():
    """DataLoader(num_workers=2, fork) computes attention in the workers after the parent used the pool."""
    ds = _AttentionDataset()
    want = [ds[i] for i in range(len(ds))]  # the parent's pool has threads now
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", timeout=120)
    got = list(loader)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        _same(a, b)
    _same(ds[0], want[0])  # and the parent still works


def _child_job(i):
    torch.set_num_threads(2)
    c = _THREAD_CASES[i % len(_THREAD_CASES)]
    args, kw = _thread_case(c, i)
    return [t.clone() for t in _fwd_bwd(*args, **kw)]


def _forked_child_job(i):
    assert _cpu.module().pool() == "own"  # libgomp does not survive fork: the child uses our own pool
    out = _child_job(i)
    # Back to 1 before the results are pickled: torch copies them to shared memory with an OpenMP loop,
    # and libgomp hangs in a forked child once the parent has run OpenMP regions with several threads.
    torch.set_num_threads(1)
    return out


def test_fork_pool_after_the_parent_used_kernel_threads():
    """A multiprocessing fork pool after the parent ran forward + backward with 2 kernel threads: the
    children (2 threads each) agree with the parent bit for bit, and the parent still works afterwards.
    The children do not run torch's own OpenMP loops with 2 threads (see _forked_child_job)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = [_child_job(i) for i in range(3)]
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(2) as pool:
            got = pool.map_async(_forked_child_job, range(3)).get(120)
        _same(_child_job(0), want[0])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(got, want):
        _same(a, b)


# ======================================================================================= large tensors
def _mem_available_gib() -> float:
    try:
        import psutil
        return psutil.virtual_memory().available / 2**30
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


@pytest.mark.slow
@pytest.mark.skipif(SANITIZED, reason="too slow under the sanitizers")
@pytest.mark.skipif(_mem_available_gib() < 16, reason=f"needs 16 GiB of available memory "
                    f"(a 2 GiB mask plus temporaries), {_mem_available_gib():.1f} GiB available")
def test_mask_over_2_31_elements():
    """A bool mask (1, 1, 50000, 46341): 2,317,050,000 elements > 2^31, so element offsets i * S + j
    overflow int32 from row 46341 on. Each row is a rotation of a random key pattern (row i: key j visible
    iff pattern[(i + j) % S]), so a wrapped offset reads a different row. Forward and backward on small
    q/k/v heads; rows near the start, the middle, the 2^31 boundary and the end checked against the
    reference on those rows."""
    L, n, E = 50000, 46341, 4
    g = torch.Generator().manual_seed(0)
    pattern = torch.rand(n, generator=g) > 0.5
    base = torch.cat([pattern, pattern, pattern])[: L + n]
    mask = base.as_strided((L, n), (1, 1)).contiguous().view(1, 1, L, n)
    assert mask.numel() > 2**31 and not mask.all(dim=-1).any()
    q = torch.randn(1, 1, L, E, generator=g)
    k, v = (torch.randn(1, 1, n, E, generator=g) for _ in range(2))
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, mask, return_lse=True)
    boundary = 2**31 // n + 1  # the first row whose offsets i * S all pass 2^31
    rows = torch.tensor([0, 1, L // 2, boundary - 2, boundary - 1, boundary, boundary + 1, L - 2, L - 1])
    ref, ref_lse = reference.scaled_dot_product_attention(q[:, :, rows], k, v, mask[:, :, rows], return_lse=True)
    testing.assert_close("out rows", out[:, :, rows], ref)
    assert (lse[:, :, rows] - ref_lse).abs().max().item() < 1e-4

    # Backward with dout nonzero only on those rows: dq of the rows and all of dk, dv then equal the
    # reference on the row slice (other rows contribute exactly zero), dq elsewhere is zero.
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    dout = torch.zeros(1, 1, L, E)
    dout[:, :, rows] = torch.randn(1, 1, len(rows), E, generator=g)
    o = fastattn.scaled_dot_product_attention(*leaves, mask)
    dq, dk, dv = torch.autograd.grad(o, leaves, dout)
    del o
    refl = [x.clone().double().requires_grad_() for x in (q[:, :, rows], k, v)]
    r = reference.scaled_dot_product_attention(*refl, mask[:, :, rows])
    rdq, rdk, rdv = torch.autograd.grad(r, refl, dout[:, :, rows].double())
    testing.assert_close("dq rows", dq[:, :, rows], rdq, backward=True)
    others = torch.ones(L, dtype=torch.bool)
    others[rows] = False
    assert not dq[:, :, others].any()
    testing.assert_close("dk", dk, rdk, backward=True)
    testing.assert_close("dv", dv, rdv, backward=True)


# =============================================================================================== leaks
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
@pytest.mark.skipif(SANITIZED, reason="the sanitizers' quarantine grows the heap by design")
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_no_leak_over_thousands_of_calls():
    """3000 forward + backward calls (masks, dropout, GQA, shapes that grow the per-thread scratch) keep
    the resident set flat after a warm-up."""
    cases = []
    for i, (L, S, E) in enumerate([(8, 8, 16), (33, 17, 40), (70, 130, 64)]):
        q, k, v = _qkv(1, 4, 2, L, S, E, E, F32 if i != 1 else BF16, seed=i)
        mask = [None, torch.randn(1, 1, L, S), torch.rand(1, 4, L, S) > 0.2][i]
        cases.append(((q, k, v, mask), dict(dropout_p=[0.0, 0.1, 0.0][i], seed=i, is_causal=i == 2,
                                            enable_gqa=True)))

    def run(n):
        for j in range(n):
            args, kw = cases[j % len(cases)]
            _fwd_bwd(*args, **kw)
            o, _ = _cpu.attention_fwd(*args[:3], None, scale=0.1, is_causal=False, dropout_p=0.0, seed=0)
            del o

    run(300)
    import gc
    gc.collect()
    start = _rss_mib()
    run(3000)
    gc.collect()
    grown = _rss_mib() - start
    assert grown < 20, f"RSS grew by {grown:.1f} MiB over 3000 calls"


# ==================================================================================== non-finite inputs
def _backends():
    out = [pytest.param("cpu", id="cpu")]
    out.append(pytest.param("triton", id="triton", marks=pytest.mark.triton))
    return out


@pytest.fixture
def backend(request):
    name = request.param
    if name == "triton":
        triton_kernels("attention")
    return name


def _block_mask(L, S):
    """Rows [0, L/2) see keys [0, S/2); rows [L/2, L) see keys [S/2, S)."""
    i = torch.arange(L)[:, None] >= L // 2
    j = torch.arange(S)[None, :] >= S // 2
    return (i == j).view(1, 1, L, S)


def _ref_fwd_bwd(q, k, v, mask, dout, **kw):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = reference.scaled_dot_product_attention(*leaves, mask, **kw)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout.double()))


def _api_fwd_bwd(q, k, v, mask, dout, backend, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fastattn.scaled_dot_product_attention(*leaves, mask, backend=backend, **kw)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout))


def _check_region(name, got, ref, bad, free=None):
    """Inside ``bad`` got is NaN/Inf; outside it is finite and equal to ``ref`` (the clean inputs' result).
    ``free``: where either is allowed (a GEMM computes 0 * NaN = NaN for a hidden NaN key)."""
    if free is not None:
        free = free & ~bad
        got = torch.where(free, ref.to(got.dtype), got)
    assert (~torch.isfinite(got[bad])).all(), f"{name}: {int(torch.isfinite(got[bad]).sum())} finite values " \
                                              f"where the poison should reach"
    ok = ~bad
    assert torch.isfinite(got[ok]).all(), f"{name}: non-finite values leaked to " \
                                          f"{torch.nonzero(~torch.isfinite(got) & ok)[:5].tolist()}"
    testing.assert_close(name, torch.where(bad, torch.zeros_like(got), got),
                         torch.where(bad, torch.zeros_like(ref), ref), backward=name != "out")


SHAPE = dict(B=2, H=4, Hk=2, L=37, S=45, E=24)


@pytest.mark.parametrize("backend", _backends(), indirect=True)
def test_nan_key_reaches_only_rows_that_see_it(backend):
    """k[b=1, hk=0, j] NaN, block mask: in the forward only the rows of batch 1, heads {0, 1} (GQA group
    of hk 0) that see key j become non-finite. In the backward those rows' dq and the dk/dv of the keys
    they see are non-finite; the rest of that group's gradients may be (dQ = dS K multiplies the hidden NaN
    key by dS = 0; the poisoned rows' P is NaN on their hidden keys); every other head and batch item
    equals the reference on the clean inputs."""
    B, H, Hk, L, S, E = SHAPE.values()
    q, k, v = _qkv(B, H, Hk, L, S, E, E, seed=3)
    dout = torch.randn(B, H, L, E)
    mask = _block_mask(L, S)
    j = S - 3  # in the second half: seen by rows [L/2, L)
    kp = k.clone()
    kp[1, 0, j, 5] = float("nan")
    got = _api_fwd_bwd(q, kp, v, mask, dout, backend, enable_gqa=True)
    ref = _ref_fwd_bwd(q, k, v, mask, dout, enable_gqa=True)
    rows = torch.zeros(B, H, L, 1, dtype=torch.bool)
    rows[1, 0:2, L // 2:] = True
    keys = torch.zeros(B, Hk, S, 1, dtype=torch.bool)
    keys[1, 0, S // 2:] = True
    group = torch.zeros(B, H, L, E, dtype=torch.bool)
    group[1, 0:2] = True
    kv = torch.zeros(B, Hk, S, E, dtype=torch.bool)
    kv[1, 0] = True
    _check_region("out", got[0], ref[0], rows.expand(B, H, L, E))
    _check_region("dq", got[1], ref[1], rows.expand(B, H, L, E), free=group)
    _check_region("dk", got[2], ref[2], keys.expand(B, Hk, S, E), free=kv)
    _check_region("dv", got[3], ref[3], keys.expand(B, Hk, S, E), free=kv)


@pytest.mark.parametrize("backend", _backends(), indirect=True)
def test_nan_key_hidden_by_causality(backend):
    """Causal: a NaN key j reaches rows i >= j only (forward)."""
    B, H, Hk, L, S, E = SHAPE.values()
    q, k, v = _qkv(B, H, Hk, L, L, E, E, seed=4)
    j = 20
    kp = k.clone()
    kp[0, 1, j, 0] = float("nan")
    out = fastattn.scaled_dot_product_attention(q, kp, v, is_causal=True, enable_gqa=True, backend=backend)
    ref = reference.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    bad = torch.zeros(B, H, L, E, dtype=torch.bool)
    bad[0, 2:4, j:] = True
    _check_region("out", out, ref, bad)


@pytest.mark.parametrize("backend", _backends(), indirect=True)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_poisoned_query_row(backend, poison):
    """q[0, 2, i] poisoned: out and dq of that row only are non-finite; dk/dv of its kv head may be
    (it feeds every key's gradient), other kv heads and batch items equal the reference."""
    B, H, Hk, L, S, E = SHAPE.values()
    q, k, v = _qkv(B, H, Hk, L, S, E, E, seed=5)
    dout = torch.randn(B, H, L, E)
    i = 11
    qp = q.clone()
    qp[0, 2, i, 7] = poison
    got = _api_fwd_bwd(qp, k, v, None, dout, backend, enable_gqa=True)
    ref = _ref_fwd_bwd(q, k, v, None, dout, enable_gqa=True)
    row = torch.zeros(B, H, L, E, dtype=torch.bool)
    row[0, 2, i] = True
    _check_region("out", got[0], ref[0], row)
    _check_region("dq", got[1], ref[1], row)
    head = torch.zeros(B, Hk, S, E, dtype=torch.bool)
    head[0, 1] = True
    for name, g, r in (("dk", got[2], ref[2]), ("dv", got[3], ref[3])):
        _check_region(name, torch.where(head, torch.full_like(g, float("nan")), g), r, head)


@pytest.mark.parametrize("backend", _backends(), indirect=True)
def test_nan_value_column_and_poisoned_head_and_batch(backend):
    """v[1, 1, j, e] NaN: only column e of out can become NaN (and must, for rows that see j);
    a whole query head (inf) or batch item (nan) poisoned: other heads / batch items equal the reference."""
    B, H, Hk, L, S, E = SHAPE.values()
    q, k, v = _qkv(B, H, Hk, L, S, E, E, seed=6)
    vp = v.clone()
    vp[1, 1, 9, 4] = float("nan")
    out = fastattn.scaled_dot_product_attention(q, k, vp, enable_gqa=True, backend=backend)
    ref = reference.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    bad = torch.zeros(B, H, L, E, dtype=torch.bool)
    bad[1, 2:4, :, 4] = True  # every row sees key 9 (no mask)
    _check_region("out", out, ref, bad)

    qp = q.clone()
    qp[0, 3] = float("inf")
    qp[1] = float("nan")
    dout = torch.randn(B, H, L, E)
    got = _api_fwd_bwd(qp, k, v, None, dout, backend, enable_gqa=True)
    refs = _ref_fwd_bwd(q, k, v, None, dout, enable_gqa=True)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, refs):
        clean = torch.ones(g.shape[:2], dtype=torch.bool)
        clean[1] = False
        clean[0, 3 if name in ("out", "dq") else 1] = False
        assert torch.isnan(g[1]).all(), f"{name}: batch item 1 (all NaN queries) not all NaN"
        assert not torch.isfinite(g[0, 3 if name in ("out", "dq") else 1]).all(), name
        testing.assert_close(name, g[clean], r[clean], backward=name != "out")


@pytest.mark.parametrize("backend", _backends(), indirect=True)
@pytest.mark.parametrize("causal", [False, True], ids=["nocausal", "causal"])
def test_neg_inf_float_mask_behaves_like_false(backend, causal):
    """A float mask of 0 / -inf gives what the bool mask gives (forward and backward), with fully hidden
    rows (zeros, zero gradients) and fully hidden keys (zero dk/dv): no NaN anywhere, dmask finite."""
    B, H, Hk, L, S, E = SHAPE.values()
    q, k, v = _qkv(B, H, Hk, L, S, E, E, seed=7)
    g = torch.Generator().manual_seed(7)
    keep = torch.rand(B, 1, L, S, generator=g) > 0.4
    keep[:, :, 3] = False  # dead rows
    keep[1, :, :, 30:] = False  # dead keys in batch 1
    fmask = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    dout = torch.randn(B, H, L, E)
    kw = dict(is_causal=causal, enable_gqa=True)
    with_bool = _api_fwd_bwd(q, k, v, keep, dout, backend, **kw)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    fm = fmask.clone().requires_grad_()
    out = fastattn.scaled_dot_product_attention(*leaves, fm, backend=backend, **kw)
    with_float = (out.detach(), *torch.autograd.grad(out, leaves + [fm], dout))
    ref = _ref_fwd_bwd(q, k, v, keep, dout, **kw)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), with_bool, with_float, ref):
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), name
        testing.assert_close(name + " bool", a, r, backward=name != "out")
        testing.assert_close(name + " float", b, r, backward=name != "out")
    assert not with_float[0][:, :, 3].any() and not with_float[1][:, :, 3].any()
    assert not with_float[2][1, :, 30:].any() and not with_float[3][1, :, 30:].any()
    dmask = with_float[4]
    assert torch.isfinite(dmask).all() and not dmask[~keep].any()
